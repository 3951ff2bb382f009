"""The typed errors of checkpointing; callers tell them apart by class, never by text."""

from __future__ import annotations

from typing import Any


class CheckpointStoreError(RuntimeError):
    """Base class of the store's errors."""


class CheckpointUploadError(CheckpointStoreError):
    """Uploading or committing a checkpoint failed (after botocore's retries).

    The caller logs it, counts it and trains on; the next save tries again.
    ``stats`` holds the figures measured up to the failure (a ``TransferStats``).
    """

    def __init__(self, message: str, *, stats: Any = None):
        super().__init__(message)
        self.stats = stats


class CheckpointCommitConflict(CheckpointUploadError):
    """The COMMITTED marker of this step already exists (written by someone else)."""


class CheckpointVerifyError(CheckpointStoreError):
    """A checkpoint does not match its manifest (missing file, size or sha256)."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems

    def __reduce__(self):  # picklable: DCP sends a rank's read error to every rank
        return type(self), (str(self), self.problems)


class CheckpointNotFound(CheckpointStoreError, FileNotFoundError):
    """A checkpoint URI names nothing committed (or nothing loadable)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored, or the final one could not be committed."""


class WorkerGroupConflict(CheckpointError):
    """Another worker group committed a step this group is saving. torchrun's c10d rendezvous
    can drop a node whose heartbeats stall without telling it, and a replacement then forms a
    second group that trains the same stage; the dropped group stops here, before it writes
    over the other's files, so that torchrun restarts it into the current round."""
