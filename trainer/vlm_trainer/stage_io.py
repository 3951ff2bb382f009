"""What a stage step's process reads and writes around its work (the trainer's
``python -m vlm_trainer`` and the pruning step's ``python -m vlm_trainer.visual_region.prune``):
its TrainerConfig file, its log format, and its termination message, where global rank 0
confirms the step's final checkpoint (`vlm_api.stage_policy.confirmation`)."""

from __future__ import annotations

import logging
import os
import sys

import yaml

from vlm_api import stage_policy
from vlm_api.schema import TrainerConfig

log = logging.getLogger(__name__)


def load_config(path: str) -> TrainerConfig:
    with open(path, encoding="utf-8") as f:
        return TrainerConfig.model_validate(yaml.safe_load(f))


def setup_logging(rank: int) -> None:
    level = os.environ.get("VLM_LOG_LEVEL", "INFO").upper() if rank == 0 else "WARNING"
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")


def termination_log_path() -> str | None:
    """Where rank 0 confirms a finished step: ``$VLM_TERMINATION_LOG``; else Kubernetes'
    ``/dev/termination-log`` when it exists and is writable; else None (nowhere)."""
    path = os.environ.get(stage_policy.TERMINATION_LOG_ENV)
    if path:
        return path
    default = stage_policy.TERMINATION_LOG
    if os.path.exists(default) and os.access(default, os.W_OK):
        return default
    return None


def write_termination_log(text: str, path: str | None = None) -> str | None:
    """Write the (small) termination message: truncate, write, flush, fsync. Returns the path,
    or None when there is nowhere to write (no Kubernetes, no ``$VLM_TERMINATION_LOG``)."""
    path = path or termination_log_path()
    if path is None:
        log.debug("no termination log (%s unset, %s absent or not writable): confirmation not written",
                  stage_policy.TERMINATION_LOG_ENV, stage_policy.TERMINATION_LOG)
        return None
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path
