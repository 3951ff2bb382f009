"""Checkpoint storage: S3 (boto3) or a local directory, with a COMMITTED manifest.

Pure storage, no torch. The trainer writes a checkpoint directory with
``torch.distributed.checkpoint`` (``.metadata`` + ``__<rank>_<n>.distcp`` shards, maybe
more files) and hands it to :meth:`CheckpointStore.upload`, which

1. uploads every file (S3: ``upload_file`` with a multipart ``TransferConfig``),
2. then writes the ``COMMITTED`` manifest LAST and exclusively
   (S3: ``PutObject(IfNoneMatch="*")``; local: temp file + ``os.link``).

A checkpoint counts only when its manifest exists and parses. Layout::

    <uri>/<stage>/step-000001200/.metadata
    <uri>/<stage>/step-000001200/__0_0.distcp
    <uri>/<stage>/step-000001200/COMMITTED

Manifest (JSON)::

    {"format": "vlm-ckpt/1", "stage": "pretrain", "step": 1200, "world_size": 16,
     "time": "2025-01-01T12:00:00.123456+00:00", "final": false,
     "total_bytes": 123, "files": [{"path": ".metadata", "size": 123, "sha256": "..."}],
     "extra": {...}}

Retention (:meth:`CheckpointStore.prune`) deletes the marker before the shards, never
the newest committed checkpoint, never a ``final`` one. Transient S3 errors are
retried by botocore (``retries={"mode": ..., "max_attempts": ...}``) and, for whole
files, by a bounded exponential backoff with full jitter here; what still fails
raises :class:`CheckpointUploadError`.

Credentials come from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, or boto3's default chain) and are
never accepted as arguments, stored on the object, or logged.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Optional
from urllib.parse import urlparse

log = logging.getLogger(__name__)

MANIFEST_NAME = "COMMITTED"
MANIFEST_FORMAT = "vlm-ckpt/1"
STEP_DIGITS = 9
MiB = 1024 * 1024

_STEP_RE = re.compile(r"^step-(\d+)$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HASH_CHUNK = 4 * MiB
_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{32}$")  # our local temp files


# --------------------------------------------------------------------------- errors


class CheckpointStoreError(RuntimeError):
    """Base class of this module's errors."""


class CheckpointUploadError(CheckpointStoreError):
    """Uploading or committing a checkpoint failed after retries.

    The caller logs it, counts it and trains on; the next save tries again.
    ``stats`` holds the figures measured up to the failure.
    """

    def __init__(self, message: str, *, stats: "TransferStats | None" = None):
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


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
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

        kwargs: dict[str, Any] = dict(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            use_threads=True,
        )
        try:  # boto3 >= 1.33: stay on the classic (python) transfer manager
            return TransferConfig(preferred_transfer_client="classic", **kwargs)
        except TypeError:  # pragma: no cover - old boto3
            return TransferConfig(**kwargs)


@dataclass(frozen=True)
class RetrySettings:
    """Retries: botocore's per request, and ours around a whole file / the commit."""

    mode: str = "standard"  # botocore retry mode: "standard" or "adaptive"
    max_attempts: int = 5  # botocore attempts per request, first included (1 = no retry)
    file_attempts: int = 3  # our attempts per whole file (after botocore gave up)
    backoff_base: float = 0.5  # seconds; delay = uniform(0, min(cap, base * 2**n))
    backoff_cap: float = 20.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff for our attempt ``attempt`` (1-based)."""
        return random.uniform(0.0, min(self.backoff_cap, self.backoff_base * (2 ** (attempt - 1))))


# --------------------------------------------------------------------------- results


@dataclass
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
    file_retries: int = 0  # whole-file retries done here
    sdk_retries: int = 0  # request retries done by botocore (S3 only)


@dataclass(frozen=True)
class CheckpointRef:
    """One ``<stage>/step-<N>`` directory in a store."""

    stage: str
    step: int
    uri: str  # of the directory, with a trailing '/'
    manifest: Optional[dict] = None  # parsed COMMITTED manifest, None if uncommitted

    @property
    def committed(self) -> bool:
        return self.manifest is not None

    @property
    def final(self) -> bool:
        return bool(self.manifest and self.manifest.get("final"))

    @property
    def world_size(self) -> Optional[int]:
        return self.manifest.get("world_size") if self.manifest else None

    @property
    def time(self) -> Optional[str]:
        return self.manifest.get("time") if self.manifest else None

    @property
    def files(self) -> list[dict]:
        return list(self.manifest.get("files", [])) if self.manifest else []

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files)

    @property
    def extra(self) -> dict:
        return dict(self.manifest.get("extra", {})) if self.manifest else {}


@dataclass
class UploadResult:
    ref: CheckpointRef
    stats: TransferStats


@dataclass
class PruneResult:
    kept: list[int] = field(default_factory=list)  # committed steps kept
    deleted: list[int] = field(default_factory=list)  # committed steps deleted
    garbage: list[int] = field(default_factory=list)  # uncommitted dirs removed
    skipped_inflight: list[int] = field(default_factory=list)  # uncommitted, newer: left


# --------------------------------------------------------------------------- helpers


def step_dirname(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dirname(name: str) -> Optional[int]:
    """``step-000000120`` -> 120 (any number of digits); anything else -> None."""
    m = _STEP_RE.match(name.rstrip("/"))
    return int(m.group(1)) if m else None


def _check_stage(stage: str) -> str:
    if not isinstance(stage, str) or not _STAGE_RE.match(stage):
        raise ValueError(f"invalid stage name {stage!r} (letters, digits, '.', '_', '-')")
    return stage


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_HASH_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _iter_local_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, absolute path) of every regular file under root, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            p = Path(dirpath) / fn
            if p.is_symlink() or not p.is_file():
                continue
            rel = p.relative_to(root).as_posix()
            out.append((rel, p))
    out.sort()
    return iter(out)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def validate_manifest(m: Any, *, stage: str | None = None, step: int | None = None) -> list[str]:
    """Problems with a parsed manifest ([] when fine)."""
    if not isinstance(m, dict):
        return ["manifest is not a JSON object"]
    problems = []
    for k, t in (("step", int), ("stage", str), ("world_size", int), ("time", str), ("files", list)):
        if not isinstance(m.get(k), t) or isinstance(m.get(k), bool):
            problems.append(f"manifest field {k!r} missing or not {t.__name__}")
    if problems:
        return problems
    if stage is not None and m["stage"] != stage:
        problems.append(f"manifest stage {m['stage']!r} != directory stage {stage!r}")
    if step is not None and m["step"] != step:
        problems.append(f"manifest step {m['step']} != directory step {step}")
    for f in m["files"]:
        if not (
            isinstance(f, dict)
            and isinstance(f.get("path"), str)
            and isinstance(f.get("size"), int)
            and isinstance(f.get("sha256"), str)
        ):
            problems.append(f"bad file entry {f!r}")
            continue
        p = f["path"]
        if p.startswith("/") or ".." in p.split("/") or p == MANIFEST_NAME:
            problems.append(f"unsafe file path {p!r}")
    return problems


# --------------------------------------------------------------------------- transient errors

_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "BadDigest",
    "IncompleteBody",
    "XAmzContentSHA256Mismatch",
    "NoSuchUpload",  # a multipart upload lost between a retried Complete and its reply
    "OperationAborted",
    "ConditionalRequestConflict",  # 409: a concurrent conditional write; retry, then 412 decides
}


def _exc_chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(exc: BaseException) -> bool:
    """True for errors worth another try: 5xx, throttling, timeouts, dropped connections."""
    try:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover
        ClientError = BotoConnectionError = HTTPClientError = ()  # type: ignore
    for e in _exc_chain(exc):
        if ClientError and isinstance(e, ClientError):
            err = e.response.get("Error", {}) or {}
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            return code in _TRANSIENT_CODES or status >= 500 or status in (408, 429)
        if BotoConnectionError and isinstance(e, (BotoConnectionError, HTTPClientError)):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        name = type(e).__name__
        if name in ("ProtocolError", "ReadTimeoutError", "IncompleteRead", "RemoteDisconnected"):
            return True
    # s3transfer wraps the cause into a message string in some versions
    msg = str(exc)
    return any(c in msg for c in ("SlowDown", "InternalError", "ServiceUnavailable", "Connection was closed",
                                  "Connection reset", "(500)", "(502)", "(503)", "(504)"))


def _retry(fn: Callable[[], Any], what: str, rs: RetrySettings, on_retry: Callable[[], None]) -> Any:
    """Call fn; on a transient error back off (full jitter) and retry, at most rs.file_attempts times."""
    attempts = max(1, rs.file_attempts)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except CheckpointStoreError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if attempt >= attempts or not is_transient(e):
                raise
            d = rs.delay(attempt)
            log.warning("%s: transient error (attempt %d/%d), retrying in %.2fs: %s",
                        what, attempt, attempts, d, _short(e))
            on_retry()
            time.sleep(d)
    raise AssertionError("unreachable")  # pragma: no cover


def _short(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 500 else s[:500] + "..."


# --------------------------------------------------------------------------- the store


class CheckpointStore(abc.ABC):
    """Checkpoints under one URI. Use :func:`open_store` / :meth:`from_uri`.

    Subclasses implement the small storage primitives (``_list``, ``_put_file``,
    ``_put_exclusive``, ``_get_bytes``, ``_get_file``, ``_hash_object``,
    ``_delete_keys``); all policy (layout, manifest, listing, verification, resume,
    retention, retries) lives here.
    """

    uri: str

    def __init__(self, uri: str, *, transfer: TransferSettings | None = None,
                 retry: RetrySettings | None = None):
        self.uri = uri if uri.endswith("/") else uri + "/"
        self.transfer = transfer or TransferSettings()
        self.retry = retry or RetrySettings()
        self.last_stats: Optional[TransferStats] = None
        self._stats_lock = threading.Lock()

    # ---- construction
    @staticmethod
    def from_uri(uri: str, **kwargs) -> "CheckpointStore":
        return open_store(uri, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # ---- primitives (keys are relative to the store root, '/'-separated)
    @abc.abstractmethod
    def _list(self, prefix: str) -> dict[str, int]:
        """All objects under prefix: {key: size}."""

    @abc.abstractmethod
    def _put_file(self, local: Path, key: str) -> None:
        """Store a local file under key (complete once visible)."""

    @abc.abstractmethod
    def _put_exclusive(self, key: str, data: bytes) -> bool:
        """Create key with data unless it exists. False if it already existed."""

    @abc.abstractmethod
    def _put_overwrite(self, key: str, data: bytes) -> None:
        """Create or atomically replace key with data."""

    @abc.abstractmethod
    def _get_bytes(self, key: str) -> Optional[bytes]:
        """Object content, None when missing."""

    @abc.abstractmethod
    def _get_file(self, key: str, local: Path) -> None:
        """Download key into the local path."""

    @abc.abstractmethod
    def _hash_object(self, key: str) -> tuple[int, str]:
        """(size, sha256) by streaming the object."""

    @abc.abstractmethod
    def _delete_keys(self, keys: list[str]) -> None:
        """Delete keys; missing ones are not an error."""

    def _sdk_retry_count(self) -> int:
        return 0

    # ---- layout
    def step_key(self, stage: str, step: int) -> str:
        return f"{_check_stage(stage)}/{step_dirname(step)}/"

    def step_uri(self, stage: str, step: int) -> str:
        return self.uri + self.step_key(stage, step)

    def _ref(self, stage: str, step: int, manifest: Optional[dict] = None) -> CheckpointRef:
        return CheckpointRef(stage=stage, step=step, uri=self.step_uri(stage, step), manifest=manifest)

    # ---- upload + commit
    def upload(self, local_dir: str | os.PathLike, stage: str, step: int, *, world_size: int,
               final: bool = False, extra: Optional[dict] = None) -> UploadResult:
        """Upload every file of ``local_dir`` then write the COMMITTED manifest last.

        Raises :class:`CheckpointUploadError` (``CheckpointCommitConflict`` when this
        step is already committed) after retries; nothing is committed then.
        Equivalent to :meth:`upload_files` followed by :meth:`commit`.
        """
        t0 = time.perf_counter()
        entries, stats = self.upload_files(local_dir, stage, step)
        res = self.commit(stage, step, entries, world_size=world_size, final=final, extra=extra, stats=stats,
                          check_listing=False)
        res.stats.total_seconds = time.perf_counter() - t0
        return res

    def upload_files(self, local_dir: str | os.PathLike, stage: str, step: int, *,
                     files: Optional[list[str]] = None) -> tuple[list[dict], TransferStats]:
        """Upload files of ``local_dir`` (all of them, or the relative paths ``files``) into
        the step directory WITHOUT committing. Returns the manifest entries
        (``{"path", "size", "sha256"}``) and the transfer figures.

        Several uploaders (one per node, each with its node's files) may upload into the
        same step; one of them then calls :meth:`commit` with all entries.
        """
        t0 = time.perf_counter()
        root = Path(local_dir)
        prefix = self.step_key(stage, step)
        stats = TransferStats(stage=stage, step=step)
        sdk0 = self._sdk_retry_count()
        if not root.is_dir():
            raise CheckpointUploadError(f"checkpoint directory {root} does not exist", stats=stats)
        found = [(rel, p) for rel, p in _iter_local_files(root) if rel != MANIFEST_NAME]
        if files is not None:
            wanted = set(files)
            found = [(rel, p) for rel, p in found if rel in wanted]
            missing = sorted(wanted - {rel for rel, _ in found})
            if missing:
                raise CheckpointUploadError(f"files missing in {root}: {missing[:5]}", stats=stats)
        if not found:
            raise CheckpointUploadError(f"checkpoint directory {root} is empty", stats=stats)
        lock = threading.Lock()

        def bump_retry():
            with lock:
                stats.file_retries += 1

        def timed_hash(p: Path) -> tuple[str, float]:
            th = time.perf_counter()
            return sha256_file(p), time.perf_counter() - th

        def one(item: tuple[str, Path]) -> dict:
            rel, p = item
            size = p.stat().st_size
            # the manifest's checksum, computed while the file uploads (hashlib and the
            # socket writes release the GIL; the second read comes from the page cache)
            hashing = hasher.submit(timed_hash, p)
            _retry(lambda: self._put_file(p, prefix + rel), f"upload {self.uri}{prefix}{rel}",
                   self.retry, bump_retry)
            digest, dt = hashing.result()
            with lock:
                stats.hash_seconds += dt
                stats.files += 1
                stats.bytes += size
            return {"path": rel, "size": size, "sha256": digest}

        tu = time.perf_counter()
        try:
            workers = max(1, min(self.transfer.file_concurrency, len(found)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-upload") as pool, \
                    ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-hash") as hasher:
                entries = list(pool.map(one, found))
        except CheckpointStoreError:
            raise
        except Exception as e:  # noqa: BLE001
            stats.upload_seconds = time.perf_counter() - tu
            stats.total_seconds = time.perf_counter() - t0
            stats.sdk_retries = self._sdk_retry_count() - sdk0
            raise CheckpointUploadError(
                f"upload of {stage} step {step} to {self.uri} failed: {_short(e)}", stats=stats) from e
        stats.upload_seconds = time.perf_counter() - tu
        stats.total_seconds = time.perf_counter() - t0
        stats.sdk_retries = self._sdk_retry_count() - sdk0
        return entries, stats

    def commit(self, stage: str, step: int, entries: list[dict], *, world_size: int, final: bool = False,
               extra: Optional[dict] = None, stats: Optional[TransferStats] = None,
               check_listing: bool = True) -> UploadResult:
        """Write the COMMITTED manifest over ``entries`` (from :meth:`upload_files`, maybe
        several uploaders' lists joined). With ``check_listing`` every entry must first be
        present in the store with its size (one listing); a path listed twice must agree.
        Raises :class:`CheckpointUploadError` / :class:`CheckpointCommitConflict`."""
        t0 = time.perf_counter()
        prefix = self.step_key(stage, step)
        stats = stats if stats is not None else TransferStats(stage=stage, step=step)
        sdk0 = self._sdk_retry_count()
        merged: dict[str, dict] = {}
        for e in entries:
            old = merged.get(e["path"])
            if old is not None and (old["size"], old["sha256"]) != (e["size"], e["sha256"]):
                raise CheckpointUploadError(f"{stage} step {step}: two different files named {e['path']!r}",
                                            stats=stats)
            merged[e["path"]] = {"path": e["path"], "size": int(e["size"]), "sha256": e["sha256"]}
        files = [merged[k] for k in sorted(merged)]
        if not files:
            raise CheckpointUploadError(f"{stage} step {step}: nothing to commit", stats=stats)
        bad = validate_manifest({"step": int(step), "stage": stage, "world_size": int(world_size), "time": "x",
                                 "files": files})
        if bad:
            raise CheckpointUploadError(f"{stage} step {step}: bad file entries: {'; '.join(bad[:5])}", stats=stats)
        if check_listing:
            try:
                listing = _retry(lambda: self._stage_index(stage).get(step, {}), f"list {self.uri}{prefix}",
                                 self.retry, lambda: None)
            except Exception as e:  # noqa: BLE001
                raise CheckpointUploadError(f"listing {self.uri}{prefix} failed: {_short(e)}", stats=stats) from e
            problems = [f"{f['path']} ({'missing' if f['path'] not in listing else 'size'})" for f in files
                        if listing.get(f["path"]) != f["size"]]
            if problems:
                raise CheckpointUploadError(
                    f"{stage} step {step}: not uploaded as listed: {', '.join(problems[:5])}", stats=stats)
        manifest = {
            "format": MANIFEST_FORMAT,
            "stage": stage,
            "step": int(step),
            "world_size": int(world_size),
            "time": _now_iso(),
            "final": bool(final),
            "total_bytes": sum(f["size"] for f in files),
            "files": files,
            "extra": dict(extra or {}),
            "id": uuid.uuid4().hex,  # tells our own commit from someone else's
        }
        if not stats.bytes:
            stats.files, stats.bytes = len(files), manifest["total_bytes"]
        tc = time.perf_counter()
        self._commit(prefix, manifest, stats)
        stats.commit_seconds = time.perf_counter() - tc
        stats.total_seconds += time.perf_counter() - t0
        stats.sdk_retries += self._sdk_retry_count() - sdk0
        self.last_stats = stats
        log.info("checkpoint %s step %d committed to %s: %d files, %d bytes, commit %.3fs",
                 stage, step, self.uri, len(files), manifest["total_bytes"], stats.commit_seconds)
        return UploadResult(ref=self._ref(stage, step, manifest), stats=stats)

    def mark_final(self, ref: CheckpointRef) -> CheckpointRef:
        """Turn a committed checkpoint into a stage-final one (the state at the stage's last
        step was already committed by an interval save): the manifest is replaced in one
        write by the same manifest with ``final: true``. It stays valid at every moment."""
        m, problems = self._read_manifest(ref.stage, ref.step)
        if problems:
            raise CheckpointUploadError(f"{ref.uri}: cannot mark final: {'; '.join(problems)}")
        if m.get("final"):
            return self._ref(ref.stage, ref.step, m)
        m = dict(m, final=True, finalized_time=_now_iso())
        data = json.dumps(m, indent=1, sort_keys=True).encode()
        key = self.step_key(ref.stage, ref.step) + MANIFEST_NAME
        try:
            _retry(lambda: self._put_overwrite(key, data), f"mark final {self.uri}{key}", self.retry, lambda: None)
        except Exception as e:  # noqa: BLE001
            raise CheckpointUploadError(f"marking {ref.uri} final failed: {_short(e)}") from e
        return self._ref(ref.stage, ref.step, m)

    def ref_from_uri(self, uri: str) -> Optional[CheckpointRef]:
        """The checkpoint whose step directory is ``uri`` (``<store uri><stage>/step-<N>/``),
        with its manifest (None when not committed). ValueError when ``uri`` is not a step
        directory of this store."""
        u = uri if uri.endswith("/") else uri + "/"
        if isinstance(self, LocalCheckpointStore) and not u.startswith("file://"):
            u = Path(u).absolute().as_uri() + "/"
        if not u.startswith(self.uri):
            raise ValueError(f"{uri!r} is not inside {self.uri!r}")
        parts = u[len(self.uri):].strip("/").split("/")
        if len(parts) != 2 or parse_step_dirname(parts[1]) is None:
            raise ValueError(f"{uri!r} is not a <stage>/step-<N>/ directory of {self.uri!r}")
        stage, step = _check_stage(parts[0]), parse_step_dirname(parts[1])
        m, problems = self._read_manifest(stage, step)
        if problems:
            log.warning("checkpoint %s: %s", self.step_uri(stage, step), "; ".join(problems))
        return self._ref(stage, step, m)

    def _commit(self, prefix: str, manifest: dict, stats: TransferStats) -> None:
        key = prefix + MANIFEST_NAME
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()

        def attempt():
            if self._put_exclusive(key, data):
                return
            # Already there: ours if a lost reply made a retry collide with our own write.
            existing = self._get_bytes(key)
            if existing == data:
                return
            raise CheckpointCommitConflict(f"{self.uri}{key} already exists: step already committed",
                                           stats=stats)

        def bump():
            stats.file_retries += 1

        try:
            _retry(attempt, f"commit {self.uri}{key}", self.retry, bump)
        except CheckpointStoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointUploadError(f"commit of {self.uri}{key} failed: {_short(e)}", stats=stats) from e

    # ---- listing
    def _stage_index(self, stage: str) -> dict[int, dict[str, int]]:
        """{step: {relative path: size}} for every step directory of the stage."""
        base = f"{_check_stage(stage)}/"
        out: dict[int, dict[str, int]] = {}
        for key, size in self._list(base).items():
            rest = key[len(base):]
            if "/" not in rest:
                continue
            d, rel = rest.split("/", 1)
            step = parse_step_dirname(d)
            if step is None or not rel:
                continue
            out.setdefault(step, {})[rel] = size
        return out

    def _read_manifest(self, stage: str, step: int) -> tuple[Optional[dict], list[str]]:
        raw = self._get_bytes(self.step_key(stage, step) + MANIFEST_NAME)
        if raw is None:
            return None, ["no COMMITTED marker"]
        try:
            m = json.loads(raw)
        except ValueError as e:
            return None, [f"COMMITTED marker is not valid JSON: {e}"]
        problems = validate_manifest(m, stage=stage, step=step)
        return (None, problems) if problems else (m, [])

    def checkpoints(self, stage: str) -> list[CheckpointRef]:
        """Every step directory of the stage, newest first, committed or not."""
        idx = self._stage_index(stage)
        out = []
        for step in sorted(idx, reverse=True):
            m = None
            if MANIFEST_NAME in idx[step]:
                m, problems = self._read_manifest(stage, step)
                if problems:
                    log.warning("checkpoint %s: invalid manifest: %s", self.step_uri(stage, step),
                                "; ".join(problems))
            out.append(self._ref(stage, step, m))
        return out

    def committed(self, stage: str) -> list[CheckpointRef]:
        """Committed checkpoints of the stage (valid manifest), newest first."""
        return [r for r in self.checkpoints(stage) if r.committed]

    def latest_committed(self, stage: str) -> Optional[CheckpointRef]:
        c = self.committed(stage)
        return c[0] if c else None

    def stages(self) -> list[str]:
        """Stage names that have at least one step directory."""
        names = set()
        for key in self._list(""):
            parts = key.split("/")
            if len(parts) >= 3 and parse_step_dirname(parts[1]) is not None and _STAGE_RE.match(parts[0]):
                names.add(parts[0])
        return sorted(names)

    # ---- verification / download
    def verify(self, ref: CheckpointRef, *, deep: bool = True) -> list[str]:
        """Problems of a checkpoint against its manifest ([] when valid).

        Shallow: marker, presence and sizes (one listing). Deep: also sha256 of every
        object (reads all bytes).
        """
        m = ref.manifest
        if m is None:
            m, problems = self._read_manifest(ref.stage, ref.step)
            if problems:
                return problems
        listing = self._stage_index(ref.stage).get(ref.step, {})
        problems = []
        for f in m["files"]:
            if f["path"] not in listing:
                problems.append(f"missing file {f['path']}")
            elif listing[f["path"]] != f["size"]:
                problems.append(f"size mismatch {f['path']}: {listing[f['path']]} != {f['size']}")
        if problems or not deep:
            return problems
        prefix = self.step_key(ref.stage, ref.step)

        def check(f):
            size, digest = self._hash_object(prefix + f["path"])
            if size != f["size"]:
                return f"size mismatch {f['path']}: {size} != {f['size']}"
            if digest != f["sha256"]:
                return f"sha256 mismatch {f['path']}"
            return None

        with ThreadPoolExecutor(max_workers=max(1, self.transfer.file_concurrency)) as pool:
            return [p for p in pool.map(check, m["files"]) if p]

    def download(self, ref: CheckpointRef, local_dir: str | os.PathLike,
                 files: Optional[list[str]] = None) -> TransferStats:
        """Download the manifest's files (or only ``files``, manifest paths) into local_dir
        and verify sizes and sha256.

        A file appears under its name only once verified (written to a temp name, then
        renamed), so a present file is a complete one. Raises
        :class:`CheckpointVerifyError` on any mismatch (verified files stay; the caller
        removes the directory).
        """
        t0 = time.perf_counter()
        sdk0 = self._sdk_retry_count()
        m = ref.manifest
        if m is None:
            m, problems = self._read_manifest(ref.stage, ref.step)
            if problems:
                raise CheckpointVerifyError(f"{ref.uri}: not committed: {'; '.join(problems)}", problems)
        root = Path(local_dir)
        root.mkdir(parents=True, exist_ok=True)
        prefix = self.step_key(ref.stage, ref.step)
        stats = TransferStats(stage=ref.stage, step=ref.step)
        lock = threading.Lock()

        def bump():
            with lock:
                stats.file_retries += 1

        def one(f) -> Optional[str]:
            dest = root / f["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex}")
            try:
                try:
                    _retry(lambda: self._get_file(prefix + f["path"], part), f"download {ref.uri}{f['path']}",
                           self.retry, bump)
                except FileNotFoundError:
                    return f"missing file {f['path']}"
                except Exception as e:  # noqa: BLE001
                    if _is_not_found(e):
                        return f"missing file {f['path']}"
                    raise
                th = time.perf_counter()
                size = part.stat().st_size
                if size != f["size"]:
                    return f"size mismatch {f['path']}: {size} != {f['size']}"
                digest = sha256_file(part)
                with lock:
                    stats.hash_seconds += time.perf_counter() - th
                    stats.files += 1
                    stats.bytes += size
                if digest != f["sha256"]:
                    return f"sha256 mismatch {f['path']}"
                os.replace(part, dest)
                return None
            finally:
                part.unlink(missing_ok=True)

        entries = m["files"]
        if files is not None:
            by_path = {f["path"]: f for f in entries}
            unknown = [name for name in files if name not in by_path]
            if unknown:
                raise CheckpointVerifyError(f"{ref.uri}: not in the manifest: {', '.join(unknown)}",
                                            [f"not in the manifest: {name}" for name in unknown])
            entries = [by_path[name] for name in files]
        with ThreadPoolExecutor(max_workers=max(1, self.transfer.file_concurrency),
                                thread_name_prefix="ckpt-download") as pool:
            problems = [p for p in pool.map(one, entries) if p]
        stats.download_seconds = stats.total_seconds = time.perf_counter() - t0
        stats.sdk_retries = self._sdk_retry_count() - sdk0
        if problems:
            raise CheckpointVerifyError(f"{ref.uri}: {'; '.join(problems)}", problems)
        return stats

    # ---- resume
    def resolve_resume(self, stage: str, prev_stage: Optional[str] = None, *,
                       skip: Collection[str] = ()) -> Optional[CheckpointRef]:
        """The checkpoint to resume from, or None for a fresh start.

        The newest valid committed checkpoint of ``stage``; else the newest valid
        ``final`` checkpoint of ``prev_stage``. Valid is what one listing can tell (the
        marker, every file present at its size: :meth:`verify` shallow); invalid ones are
        skipped with a warning. Bytes are checked by whoever reads them (sha256 in
        :meth:`download`), and a reader that found a corrupt file names its URI in ``skip``.
        """
        found = self._first_valid(self.checkpoints(stage), skip)
        if found is not None or not prev_stage:
            return found
        found = self.resolve_final(prev_stage, skip=skip)
        if found is None:
            log.warning("no valid checkpoint in stage %s and no final checkpoint of stage %s in %s",
                        stage, prev_stage, self.uri)
        return found

    def resolve_final(self, stage: str, *, skip: Collection[str] = ()) -> Optional[CheckpointRef]:
        """The newest valid stage-final checkpoint of ``stage`` (to initialise the next
        stage), valid as in :meth:`resolve_resume`; None if none."""
        cands = []
        for r in self.checkpoints(stage):
            if not r.committed:
                log.warning("skipping %s: no valid COMMITTED marker", r.uri)
            elif not r.final:
                log.debug("skipping %s: not a stage-final checkpoint", r.uri)
            else:
                cands.append(r)
        return self._first_valid(cands, skip)

    def _first_valid(self, refs, skip) -> Optional[CheckpointRef]:
        for r in refs:
            if r.uri in skip:
                continue
            if not r.committed:
                log.warning("skipping %s: no valid COMMITTED marker (incomplete upload?)", r.uri)
                continue
            problems = self.verify(r, deep=False)
            if problems:
                log.warning("skipping %s: %s", r.uri, "; ".join(problems))
                continue
            return r
        return None

    # ---- retention
    def delete(self, ref: CheckpointRef) -> None:
        """Delete one checkpoint: the COMMITTED marker first, then everything else."""
        prefix = self.step_key(ref.stage, ref.step)
        keys = sorted(prefix + rel for rel in self._stage_index(ref.stage).get(ref.step, {}))
        marker = prefix + MANIFEST_NAME
        if marker in keys:
            self._delete_keys([marker])
            keys.remove(marker)
        if keys:
            self._delete_keys(keys)

    def prune(self, stage: str, keep: int) -> PruneResult:
        """Keep the newest ``keep`` committed checkpoints of the stage (at least 1).

        Never deletes the newest committed checkpoint nor a ``final`` one. Uncommitted
        directories older than the newest committed one are removed as garbage; newer
        ones may be uploads in flight and are left alone.
        """
        keep = max(1, int(keep))
        res = PruneResult()
        refs = self.checkpoints(stage)
        committed = [r for r in refs if r.committed]
        if not committed:
            res.skipped_inflight = [r.step for r in refs]
            return res
        newest = committed[0].step
        for i, r in enumerate(committed):
            if i < keep or r.final or r.step == newest:
                res.kept.append(r.step)
                continue
            log.info("retention: deleting %s", r.uri)
            self.delete(r)
            res.deleted.append(r.step)
        for r in refs:
            if r.committed:
                continue
            if r.step < newest:
                log.info("retention: deleting uncommitted %s", r.uri)
                self.delete(r)
                res.garbage.append(r.step)
            else:
                res.skipped_inflight.append(r.step)
        return res


def _is_not_found(e: BaseException) -> bool:
    for x in _exc_chain(e):
        resp = getattr(x, "response", None)
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NotFound") or status == 404:
                return True
        if isinstance(x, FileNotFoundError):
            return True
    return False


# --------------------------------------------------------------------------- local


class LocalCheckpointStore(CheckpointStore):
    """A directory (``file:///abs/path`` or a plain path)."""

    def __init__(self, uri: str, **kwargs):
        if uri.startswith("file://"):
            path = urlparse(uri).path
        else:
            path = uri
        self.root = Path(path).absolute()
        super().__init__(self.root.as_uri(), **kwargs)

    def _p(self, key: str) -> Path:
        return self.root / key

    def _list(self, prefix: str) -> dict[str, int]:
        base = self._p(prefix) if prefix else self.root
        if not base.is_dir():
            return {}
        out = {}
        for rel, p in _iter_local_files(base):
            if _TMP_RE.search(p.name):  # our own temp files
                continue
            try:
                out[prefix + rel] = p.stat().st_size
            except FileNotFoundError:
                continue
        return out

    def _put_file(self, local: Path, key: str) -> None:
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex}")
        try:
            shutil.copyfile(local, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _put_exclusive(self, key: str, data: bytes) -> bool:
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, dest)  # atomic, fails if dest exists; dest is complete when visible
            except FileExistsError:
                return False
            except OSError:  # filesystems without hard links: exclusive create in place
                try:
                    fd2 = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd2, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(dest.parent)
            return True
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _put_overwrite(self, key: str, data: bytes) -> None:
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _get_bytes(self, key: str) -> Optional[bytes]:
        try:
            return self._p(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _get_file(self, key: str, local: Path) -> None:
        shutil.copyfile(self._p(key), local)

    def _hash_object(self, key: str) -> tuple[int, str]:
        p = self._p(key)
        return p.stat().st_size, sha256_file(p)

    def _delete_keys(self, keys: list[str]) -> None:
        dirs = set()
        for k in keys:
            p = self._p(k)
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            if p.name == MANIFEST_NAME:
                _fsync_dir(p.parent)
            dirs.add(p.parent)
        # Remove directories left empty (or holding only our temp files), bottom-up,
        # stopping at the stage directory.
        for d in sorted(dirs, key=lambda x: len(x.parts), reverse=True):
            while len(d.parts) > len(self.root.parts) + 1:
                try:
                    if any(not _TMP_RE.search(x.name) for x in d.iterdir()):
                        break
                    shutil.rmtree(d)
                except FileNotFoundError:
                    pass
                d = d.parent


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- S3


class S3CheckpointStore(CheckpointStore):
    """``s3://bucket/prefix/`` through boto3.

    ``endpoint_url`` (or env ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) selects an
    S3-compatible store and switches to path-style addressing. Region from
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``). Credentials only from
    the environment / boto3's default chain. ``request_checksum`` ("when_supported" /
    "when_required", default: botocore's, else env ``AWS_REQUEST_CHECKSUM_CALCULATION``)
    sets botocore's request/response checksum behaviour.
    """

    def __init__(self, uri: str, *, endpoint_url: Optional[str] = None, region: Optional[str] = None,
                 addressing_style: Optional[str] = None, request_checksum: Optional[str] = None,
                 **kwargs):
        import boto3
        from botocore.config import Config

        u = urlparse(uri)
        if u.scheme != "s3" or not u.netloc:
            raise ValueError(f"not an s3:// URI: {uri!r}")
        self.bucket = u.netloc
        p = u.path.lstrip("/")
        self.prefix = p if (not p or p.endswith("/")) else p + "/"
        super().__init__(f"s3://{self.bucket}/{self.prefix}", **kwargs)
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        self.region = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or "us-east-1")
        style = addressing_style or ("path" if self.endpoint_url else "auto")
        rs = self.retry
        cfg: dict[str, Any] = dict(
            region_name=self.region,
            # total_max_attempts counts the first try; botocore's "max_attempts" key would
            # count retries only (max_attempts=N -> N+1 requests).
            retries={"mode": rs.mode, "total_max_attempts": max(1, rs.max_attempts)},
            s3={"addressing_style": style},
            connect_timeout=rs.connect_timeout,
            read_timeout=rs.read_timeout,
            max_pool_connections=max(10, self.transfer.max_concurrency * self.transfer.file_concurrency + 4),
        )
        if request_checksum:
            # "when_required" for S3-compatible stores that reject the aws-chunked CRC
            # trailers botocore >= 1.36 sends by default ("when_supported").
            cfg.update(request_checksum_calculation=request_checksum,
                       response_checksum_validation=request_checksum)
        try:
            config = Config(**cfg)
        except TypeError:  # pragma: no cover - botocore < 1.36
            cfg.pop("request_checksum_calculation", None)
            cfg.pop("response_checksum_validation", None)
            config = Config(**cfg)
        session = boto3.session.Session()  # credentials: env / default chain, never arguments
        self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        self._tc = self.transfer.transfer_config()
        self._sdk_retries = 0
        self._client.meta.events.register("after-call.s3", self._count_retries)
        self._client.meta.events.register("after-call-error.s3", self._count_retries_error)

    def __repr__(self) -> str:
        return f"S3CheckpointStore({self.uri!r}, endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    @property
    def client(self):
        return self._client

    def _count_retries(self, parsed=None, **_):
        n = 0
        try:
            n = int(parsed.get("ResponseMetadata", {}).get("RetryAttempts", 0))
        except Exception:  # noqa: BLE001
            pass
        if n:
            with self._stats_lock:
                self._sdk_retries += n

    def _count_retries_error(self, exception=None, **_):
        # a request that failed for good (after its retries) - botocore counted them in
        # the error's response when it had one
        resp = getattr(exception, "response", None)
        if isinstance(resp, dict):
            self._count_retries(parsed=resp)

    def _sdk_retry_count(self) -> int:
        with self._stats_lock:
            return self._sdk_retries

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _list(self, prefix: str) -> dict[str, int]:
        out = {}
        pag = self._client.get_paginator("list_objects_v2")
        full = self._k(prefix)
        for page in pag.paginate(Bucket=self.bucket, Prefix=full):
            for o in page.get("Contents", []) or []:
                out[o["Key"][len(self.prefix):]] = int(o["Size"])
        return out

    def _put_file(self, local: Path, key: str) -> None:
        self._client.upload_file(str(local), self.bucket, self._k(key), Config=self._tc)

    def _put_exclusive(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*",
                                    ContentType="application/json")
            return True
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return False
            if code == "ConditionalRequestConflict" or status == 409:
                # a concurrent conditional write to the same key is in progress: retry later
                raise
            raise

    def _put_overwrite(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, ContentType="application/json")

    def _get_bytes(self, key: str) -> Optional[bytes]:
        from botocore.exceptions import ClientError

        try:
            r = self._client.get_object(Bucket=self.bucket, Key=self._k(key))
            return r["Body"].read()
        except ClientError as e:
            if _is_not_found(e):
                return None
            raise

    def _get_file(self, key: str, local: Path) -> None:
        self._client.download_file(self.bucket, self._k(key), str(local), Config=self._tc)

    def _hash_object(self, key: str) -> tuple[int, str]:
        from botocore.exceptions import ClientError

        def go():
            r = self._client.get_object(Bucket=self.bucket, Key=self._k(key))
            h = hashlib.sha256()
            n = 0
            for chunk in r["Body"].iter_chunks(_HASH_CHUNK):
                h.update(chunk)
                n += len(chunk)
            return n, h.hexdigest()

        try:
            return _retry(go, f"read {self.uri}{key}", self.retry, lambda: None)
        except ClientError as e:
            if _is_not_found(e):
                return -1, ""
            raise

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            if len(batch) == 1:
                self._client.delete_object(Bucket=self.bucket, Key=self._k(batch[0]))
                continue
            r = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._k(k)} for k in batch], "Quiet": True},
            )
            errs = r.get("Errors") or []
            if errs:
                raise CheckpointStoreError(
                    f"delete failed for {len(errs)} objects in {self.uri}: "
                    + ", ".join(f"{e.get('Key')}: {e.get('Code')}" for e in errs[:5]))


# --------------------------------------------------------------------------- factory


def open_store(uri: str, *, endpoint_url: Optional[str] = None, transfer: TransferSettings | None = None,
               retry: RetrySettings | None = None, **s3_kwargs) -> CheckpointStore:
    """A store for ``s3://bucket/prefix/``, ``file:///path`` or a plain local path."""
    if uri.startswith("s3://"):
        return S3CheckpointStore(uri, endpoint_url=endpoint_url, transfer=transfer, retry=retry, **s3_kwargs)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported checkpoint URI scheme: {uri!r}")
    return LocalCheckpointStore(uri, transfer=transfer, retry=retry)


def split_checkpoint_uri(uri: str) -> tuple[str, str, Optional[int]]:
    """``<root>/<stage>/step-<N>/`` -> (root, stage, N); ``<root>/<stage>/`` -> (root, stage,
    None). Plain local paths become ``file://`` URIs."""
    if "://" not in uri:
        uri = Path(uri).absolute().as_uri()
    parts = uri.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parse_step_dirname(parts[2]) is not None:
        return parts[0] + "/", _check_stage(parts[1]), parse_step_dirname(parts[2])
    root, stage = uri.rstrip("/").rsplit("/", 1)
    return root + "/", _check_stage(stage), None


def open_step_uri(uri: str, **kwargs) -> tuple[CheckpointStore, CheckpointRef]:
    """(store, ref) for the step directory ``uri`` = ``<root>/<stage>/step-<N>/`` (the form
    of ``TrainerConfig.init_from``); the store is opened at ``<root>`` with ``kwargs``."""
    parts = uri.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or parse_step_dirname(parts[2]) is None:
        raise ValueError(f"{uri!r} is not a <root>/<stage>/step-<N>/ checkpoint directory")
    store = open_store(parts[0] + "/", **kwargs)
    return store, store.ref_from_uri(uri)


__all__ = [
    "open_step_uri", "split_checkpoint_uri",
    "CheckpointStore", "S3CheckpointStore", "LocalCheckpointStore", "open_store",
    "CheckpointRef", "TransferStats", "UploadResult", "PruneResult",
    "TransferSettings", "RetrySettings",
    "CheckpointStoreError", "CheckpointUploadError", "CheckpointCommitConflict", "CheckpointVerifyError",
    "MANIFEST_NAME", "step_dirname", "parse_step_dirname", "sha256_file", "validate_manifest", "is_transient",
]
