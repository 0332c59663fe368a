#!/usr/bin/env bash
# One training run as several local processes on this machine's CPU (each with fake devices), joined by
# jax.distributed over 127.0.0.1: the multi-host code path without a cluster.
#
#   bash launch/train_local.sh PROCESSES DEVICES_PER_PROCESS --config configs/tiny.py --workdir /tmp/run [...]
#
# Every process runs `python -m sparse_context_jax train ARGS --coordinator 127.0.0.1:PORT --num-processes N
# --process-id I`. Process 0 prints to this terminal, the others to PROCESS.log files in a temporary folder (their
# tail is printed if one fails). The first process to fail stops the others; SIGINT / SIGTERM are passed on to
# every process (each saves a checkpoint, then exits with status 75, which this script then returns: a run preempted
# and saved, to be resumed by the same command). SCJ_PYTHON picks the interpreter (default: the runtime
# environment); SCJ_PORT the coordinator port (default: a free one).
set -euo pipefail
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ && $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/train_local.sh PROCESSES DEVICES_PER_PROCESS TRAIN_ARGS..." >&2
  exit 2
fi
processes=$1 devices=$2
shift 2
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python=${SCJ_PYTHON:-$(scj_venv runtime requirements.txt)/bin/python}
cd "$(scj_root)"
port=${SCJ_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logs=$(mktemp -d "${TMPDIR:-/tmp}/scj-train-local.XXXXXX")
pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
for ((i = 0; i < processes; i++)); do
  args=(-m sparse_context_jax train "$@" --coordinator "127.0.0.1:$port" --num-processes "$processes" --process-id "$i")
  if [ "$i" -eq 0 ]; then
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu "$python" "${args[@]}" &
  else
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu "$python" "${args[@]}" \
        >"$logs/$i.log" 2>&1 &
  fi
  pids+=($!)
done
# Poll (not `wait -n`, which a trapped signal interrupts): reap each process once, keep the first failure.
status=0 preempted=0 done=()
while [ "${#done[@]}" -lt "$processes" ]; do
  for ((i = 0; i < processes; i++)); do
    if [ -z "${done[$i]:-}" ] && ! kill -0 "${pids[$i]}" 2>/dev/null; then
      rc=0
      wait "${pids[$i]}" || rc=$?
      done[$i]=1
      if [ "$rc" -eq 75 ]; then
        preempted=1   # saved at the agreed step; every process stops there by itself
      elif [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
        echo "process $i exited with status $rc; stopping the others" >&2
        for ((j = 1; j < processes; j++)); do
          if [ -s "$logs/$j.log" ]; then echo "--- process $j ($logs/$j.log) ---" >&2; tail -n 20 "$logs/$j.log" >&2; fi
        done
        stop
      fi
    fi
  done
  sleep 0.2
done
[ "$status" -eq 0 ] && rm -rf "$logs"
[ "$status" -eq 0 ] && [ "$preempted" -eq 1 ] && status=75
exit "$status"
