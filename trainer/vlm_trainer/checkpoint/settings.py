"""Checkpoint settings (interval, retention, transfer tuning, retry policy) and the figures
one upload or download reports."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .layout import MiB


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    """Tuning for uploads/downloads. Defaults fit multi-GB DCP shards: 16 MiB parts, 8 in
    flight per file, 4 files at once (up to 32 parallel part uploads per node). s3transfer
    raises the part size by itself when a file would need more than 10,000 parts (> 160 GB).
    Against moto on a shared 2-core machine 8/16/32/64 MiB parts were within the noise of each
    other and of boto3's own defaults (benchmarks/checkpoint.py: upload_throughput_ratio);
    16 MiB keeps many parts in flight per shard, which is what a real S3 endpoint rewards."""

    multipart_threshold: int = 16 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 8  # parts in flight per file (s3transfer threads)
    file_concurrency: int = 4  # files hashed/uploaded at once

    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        # the classic (python) transfer manager, not the CRT one
        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize, max_concurrency=self.max_concurrency,
                              use_threads=True, preferred_transfer_client="classic")


@dataclasses.dataclass(frozen=True)
class RetrySettings:
    """The one retry policy of S3 requests: botocore's (``standard`` or ``adaptive`` mode).
    botocore retries what is transient (5xx, throttling, timeouts, dropped connections) per
    request, multipart parts included; what still fails raises."""

    mode: str = "standard"
    max_attempts: int = 5  # attempts per request, the first included (1 = no retry)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def botocore_retries(self) -> dict[str, Any]:
        # total_max_attempts counts the first try; botocore's "max_attempts" key counts retries only
        return {"mode": self.mode, "total_max_attempts": max(1, self.max_attempts)}


@dataclasses.dataclass
class CheckpointSettings:
    uri: str
    interval: int | str = "30m"  # steps (int) or a duration string
    keep: int = 3
    endpoint: str = ""
    region: str = ""
    local_dir: Optional[str] = None  # node-local staging; default $VLM_CKPT_LOCAL_DIR or <tmp>/vlm-ckpt
    async_save: bool = True
    decide_every: int = 1  # steps between collective decisions of a time interval
    final_attempts: int = 3  # tries of the final (synchronous) checkpoint
    final_backoff_s: float = 2.0
    save_timeout_s: float = 1800.0  # collectives of saves/restores (uploads and downloads wait inside)
    ctl_timeout_s: float = 60.0  # the interval decision's all-reduce
    transfer: Optional[TransferSettings] = None
    retry: Optional[RetrySettings] = None

    @classmethod
    def from_spec(cls, ckpt, **overrides) -> "CheckpointSettings":
        """From ``vlm_api.schema.Checkpoint``."""
        kw = dict(uri=ckpt.uri, interval=ckpt.interval, keep=ckpt.keep, endpoint=ckpt.endpoint or "",
                  region=ckpt.region or "")
        kw.update(overrides)
        return cls(**kw)

    def store_kwargs(self, uri: str) -> dict[str, Any]:
        """``backends.open_store`` keyword arguments for a store at ``uri`` (this run's or another's)."""
        kw: dict[str, Any] = {"transfer": self.transfer, "retry": self.retry}
        if uri.startswith("s3://"):
            kw["endpoint_url"] = self.endpoint or None
            if self.region:
                kw["region"] = self.region
        return kw


@dataclasses.dataclass
class TransferStats:
    """Figures for one upload or download; the trainer exports them as metrics."""

    stage: str
    step: int
    files: int = 0
    bytes: int = 0
    hash_seconds: float = 0.0  # summed over files (may overlap in time)
    upload_seconds: float = 0.0  # wall time of the data transfer (0 for downloads)
    download_seconds: float = 0.0
    commit_seconds: float = 0.0  # wall time of the manifest write
    total_seconds: float = 0.0
    sdk_retries: int = 0  # request retries done by botocore (S3 only)


@dataclasses.dataclass
class SaveOutcome:
    stage: str
    step: int
    ok: bool
    final: bool = False
    uri: str = ""
    time: str = ""
    phase: str = ""  # failing phase when not ok
    error: str = ""
    bytes: int = 0
    save_seconds: float = 0.0  # start of the save -> all files written (DCP)
    upload_seconds: float = 0.0  # slowest node's upload
    commit_seconds: float = 0.0
    blocking_seconds: float = 0.0  # how long training waited
    pruned: list[int] = dataclasses.field(default_factory=list)
    conflict: bool = False  # another worker group committed this step (WorkerGroupConflict)


@dataclasses.dataclass
class UploadResult:
    ref: Any  # layout.CheckpointRef
    stats: TransferStats


@dataclasses.dataclass
class PruneResult:
    kept: list[int] = dataclasses.field(default_factory=list)  # committed steps kept
    deleted: list[int] = dataclasses.field(default_factory=list)  # committed steps deleted
    garbage: list[int] = dataclasses.field(default_factory=list)  # uncommitted dirs removed
    skipped_inflight: list[int] = dataclasses.field(default_factory=list)  # uncommitted, newer: left
