import sys

from sparse_context_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
