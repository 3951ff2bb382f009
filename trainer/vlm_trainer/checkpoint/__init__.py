"""Trainer checkpoints: layout and manifest (``layout.py``), typed errors (``errors.py``),
the store and its local / S3 backends (``store.py``, ``backends/``), the save/commit
protocol (``manager.py``), restore I/O (``restore.py``), the saved components (``state.py``)
and models read back from a checkpoint (``model_io.py``)."""

from .backends import open_step_uri, open_store
from .errors import (CheckpointCommitConflict, CheckpointError, CheckpointNotFound, CheckpointStoreError,
                     CheckpointUploadError, CheckpointVerifyError, WorkerGroupConflict)
from .layout import CONFIG_NAME, MANIFEST_NAME, CheckpointRef, parse_step_dirname, split_checkpoint_uri, step_dirname
from .settings import CheckpointSettings, RetrySettings, SaveOutcome, TransferSettings, TransferStats
from .store import CheckpointStore

__all__ = [
    "open_store", "open_step_uri", "CheckpointStore", "CheckpointRef", "CheckpointSettings", "RetrySettings",
    "TransferSettings", "TransferStats", "SaveOutcome", "CONFIG_NAME", "MANIFEST_NAME", "parse_step_dirname",
    "split_checkpoint_uri", "step_dirname", "CheckpointCommitConflict", "CheckpointError", "CheckpointNotFound",
    "CheckpointStoreError", "CheckpointUploadError", "CheckpointVerifyError", "WorkerGroupConflict",
]
