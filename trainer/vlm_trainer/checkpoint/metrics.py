"""The ``vlmtrain_checkpoint_*`` Prometheus series (names are the contract with dashboards,
alerts and the operator)."""

from __future__ import annotations

import datetime
import threading

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
BLOCKING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05) + DURATION_BUCKETS
FAILURE_PHASES = ("save", "upload", "commit", "prune", "load")


class CheckpointMetrics:
    """The series on one registry (created once per registry: :meth:`for_registry`)."""

    _lock = threading.Lock()

    def __init__(self, reg):
        from prometheus_client import Counter, Gauge, Histogram

        def hist(name, doc, buckets=DURATION_BUCKETS):
            return Histogram(name, doc, buckets=buckets, registry=reg)

        self.last_step = Gauge("vlmtrain_checkpoint_last_step", "Step of the newest committed checkpoint.",
                               registry=reg)
        self.last_success = Gauge("vlmtrain_checkpoint_last_success_timestamp_seconds",
                                  "Unix time the newest checkpoint was committed.", registry=reg)
        self.interval = Gauge("vlmtrain_checkpoint_interval_seconds",
                              "Configured checkpoint interval in seconds (0 when it is given in steps).",
                              registry=reg)
        self.interval_steps = Gauge("vlmtrain_checkpoint_interval_steps",
                                    "Configured checkpoint interval in steps (0 when it is a duration).",
                                    registry=reg)
        self.save = hist("vlmtrain_checkpoint_save_duration_seconds",
                         "Start of a save until every rank's files are written (DCP).")
        self.upload = hist("vlmtrain_checkpoint_upload_duration_seconds",
                           "Upload of a checkpoint's files (slowest node).")
        self.commit = hist("vlmtrain_checkpoint_commit_duration_seconds", "Writing the COMMITTED manifest.")
        self.load = hist("vlmtrain_checkpoint_load_duration_seconds",
                         "Restore: choose, download, verify and load a checkpoint.")
        self.blocking = hist("vlmtrain_checkpoint_blocking_seconds", "Time training was blocked by a checkpoint save.",
                             BLOCKING_BUCKETS)
        self.bytes = Gauge("vlmtrain_checkpoint_bytes", "Size of the newest committed checkpoint.", registry=reg)
        self.failures = Counter("vlmtrain_checkpoint_failures", "Checkpoint saves or restores that failed, by phase.",
                                ["phase"], registry=reg)
        self.in_flight = Gauge("vlmtrain_checkpoint_in_flight", "1 while a save is being written or uploaded.",
                               registry=reg)
        self.last_info = Gauge("vlmtrain_checkpoint_last_info", "The newest committed checkpoint (value 1).", ["uri"],
                               registry=reg)
        for phase in FAILURE_PHASES:
            self.failures.labels(phase=phase)

    @classmethod
    def for_registry(cls, reg) -> "CheckpointMetrics":
        with cls._lock:
            m = getattr(reg, "_vlm_checkpoint_metrics", None)
            if m is None:
                m = cls(reg)
                reg._vlm_checkpoint_metrics = m
            return m

    def committed(self, step: int, uri: str, when: float, nbytes: int) -> None:
        self.last_step.set(step)
        self.last_success.set(when)
        if nbytes:
            self.bytes.set(nbytes)
        self.last_info.clear()
        self.last_info.labels(uri=uri).set(1)


def iso_to_unix(s: str | None) -> float:
    if not s:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(s).timestamp()
    except ValueError:
        return 0.0
