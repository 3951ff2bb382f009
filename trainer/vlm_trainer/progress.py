"""Machine-readable progress for local runners: JSON lines at ``$VLM_PROGRESS_FILE``.

Written by global rank 0 only, appended (a restarted worker appends to the same file),
one object per line, flushed per line. Every object has ``event``, ``time`` (unix
seconds), ``run`` and ``stage``. Events:

* ``start``: ``step`` (resumed step, 0 when fresh), ``total_steps``, ``world_size``,
  ``global_batch`` (nominal sequences), ``seq_length``, ``packing``, ``global_batch_tokens``,
  ``tokens_stated`` (the recipe's tokens for the stage), ``metrics_port``, ``restart_count``;
* ``step`` (every step): ``step`` (completed steps), ``total_steps``, ``loss``, ``lr``,
  ``grad_norm``, ``tokens`` (stage total, real tokens), ``text_tokens``, ``image_tokens``
  (this step), ``image_token_ratio`` (recent, measured), ``tokens_per_s``, ``step_s``,
  ``data_wait_s``, ``positions`` (computed, padding included), ``sequences`` (rows),
  ``samples``, ``samples_per_sequence``, ``padding_fraction`` (this step), ``pack_buffer``
  (packed: samples waiting in the look-ahead buffer);
* ``eval``: ``step``, ``losses`` {modality: loss}, ``sources`` {source: loss};
* ``checkpoint`` (written by the checkpoint manager): ``step``, ``uri``, ...;
* ``end``: ``status`` (``completed`` | ``stopped`` | ``failed``), ``step``, ``tokens``,
  ``elapsed_s``, ``error`` (when failed).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time


class ProgressFile:
    def __init__(self, path: str | None, *, run: str, stage: str, enabled: bool = True):
        self.path = path if enabled else None
        self.base = {"run": run, "stage": stage}
        self._lock = threading.Lock()
        self._fh = None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._fh = open(self.path, "a", buffering=1, encoding="utf-8")

    @classmethod
    def from_env(cls, *, run: str, stage: str, enabled: bool) -> "ProgressFile":
        return cls(os.environ.get("VLM_PROGRESS_FILE") or None, run=run, stage=stage, enabled=enabled)

    def write(self, event: str, **fields) -> None:
        if self._fh is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **self.base, **fields}
        line = json.dumps(_sanitise(record), default=_jsonable)
        with self._lock:
            self._fh.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _sanitise(value):
    """NaN/inf -> null (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _sanitise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitise(v) for v in value]
    return value
