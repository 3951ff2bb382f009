"""`python -m vlm_trainer --config FILE` (torchrun -m vlm_trainer --config FILE)."""

import logging
import os
import sys

from .main import main

if __name__ == "__main__":
    rc = main()
    if rc != 0 and os.environ.get("TORCHELASTIC_RUN_ID"):
        # A failed torchrun worker may still have threads inside collectives with a hung
        # peer (an async checkpoint save on its own group, whose timeout is the save
        # timeout, not processGroupTimeout); interpreter exit would join them. Exit now so
        # the agent restarts the group (measured: tests/test_rdzv_store.py, SIGSTOP case).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
