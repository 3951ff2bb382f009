"""`python -m vlm_trainer --config FILE` (torchrun -m vlm_trainer --config FILE)."""

import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main())
