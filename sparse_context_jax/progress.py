"""Progress of long commands: a bar on a terminal, plain periodic lines otherwise (log files get no carriage returns).

    with progress(total=n, desc="convert ae.safetensors", unit="B") as bar:
      bar.update(k)
      bar.set_postfix(tensors="3/40")

Both forms take the same calls (`update`, `set_postfix`, `close`); the line form prints at most one line every
`every` seconds and one at the end, to stdout (stderr stays for errors and warnings, one line each).
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

EVERY_SECONDS = 10.0


def _amount(x: float, unit: str) -> str:
  if unit != "B":
    return f"{x:g}" if x != int(x) else f"{int(x)}"
  for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
    if x >= scale:
      return f"{x / scale:.1f} {name}"
  return f"{int(x)} B"


class ProgressLines:
  """`tqdm`'s calls, printed as plain lines: `desc: 41% 400/975 img (12.3 img/s) loss=0.12`."""

  def __init__(self, total: float | None, desc: str, unit: str = "it", initial: float = 0, file=None,
               every: float = EVERY_SECONDS):
    self.total, self.desc, self.unit, self.n, self.every = total, desc, unit, initial, every
    self.file = file or sys.stdout
    self.postfix = ""
    self._start_n, self._t0 = initial, time.monotonic()
    self._last = self._t0
    self._closed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def update(self, n: float = 1) -> None:
    self.n += n
    if time.monotonic() - self._last >= self.every:
      self._print()

  def set_postfix(self, **kw) -> None:
    self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      if self.n != self._start_n:
        self._print()

  def _print(self) -> None:
    now = time.monotonic()
    self._last = now
    rate = (self.n - self._start_n) / max(now - self._t0, 1e-9)
    done = _amount(self.n, self.unit)
    share = f"{100 * self.n / self.total:.0f}% " if self.total else ""
    of = f"/{_amount(self.total, self.unit)}" if self.total else ""
    unit = "" if self.unit == "B" else f" {self.unit}"
    line = f"{self.desc}: {share}{done}{of}{unit} ({_amount(round(rate, 1), self.unit)}{unit}/s)"
    print(line + (f" {self.postfix}" if self.postfix else ""), file=self.file, flush=True)


def progress(total: float | None, desc: str, unit: str = "it", *, initial: float = 0, enabled: bool | None = None):
  """A progress bar when stderr is a terminal, `ProgressLines` when it is not; a silent one when `enabled` is
  False (None: decide by the terminal only)."""
  if enabled is False:
    return tqdm(total=total, initial=initial, disable=True)
  if sys.stderr.isatty():
    scale = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, **scale)
  return ProgressLines(total, desc, unit, initial)
