"""Checkpoint storage policy over a backend's few primitives (no torch).

The trainer writes a checkpoint directory with ``torch.distributed.checkpoint`` and hands
its files to :meth:`CheckpointStore.upload_files` (one uploader per node), then one
:meth:`CheckpointStore.commit` writes the ``COMMITTED`` manifest LAST and exclusively
(S3: ``PutObject(IfNoneMatch="*")``; local: temp file + ``os.link``). Layout and manifest:
``checkpoint/layout.py``; backends: ``checkpoint/backends/``.

Retention (:meth:`CheckpointStore.prune`) deletes the marker before the shards, never
the newest committed checkpoint, never a ``final`` one. Requests are retried by botocore
alone (``transfer.RetrySettings``); what still fails raises :class:`CheckpointUploadError`.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Collection, Optional

from .errors import CheckpointCommitConflict, CheckpointStoreError, CheckpointUploadError, CheckpointVerifyError
from .layout import (MANIFEST_FORMAT, MANIFEST_NAME, CheckpointRef, check_stage, iter_local_files, now_iso,
                     parse_step_dirname, sha256_file, short, step_dirname, validate_manifest)
from .settings import PruneResult, RetrySettings, TransferSettings, TransferStats, UploadResult

log = logging.getLogger(__name__)


class CheckpointStore(abc.ABC):
    """Checkpoints under one URI (see :func:`checkpoint.backends.open_store`).

    Backends implement the storage primitives (``_list``, ``_put_file``, ``_put_exclusive``,
    ``_put_overwrite``, ``_get_bytes``, ``_get_file``, ``_hash_object``, ``_delete_keys``);
    all policy (layout, manifest, listing, verification, resume, retention) lives here.
    """

    uri: str

    def __init__(self, uri: str, *, transfer: TransferSettings | None = None, retry: RetrySettings | None = None):
        self.uri = uri if uri.endswith("/") else uri + "/"
        self.transfer = transfer or TransferSettings()
        self.retry = retry or RetrySettings()

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
    def _get_file(self, key: str, local: Path) -> bool:
        """Download key into the local path; False when the key does not exist."""

    @abc.abstractmethod
    def _hash_object(self, key: str) -> tuple[int, str]:
        """(size, sha256) by streaming the object; (-1, "") when missing."""

    @abc.abstractmethod
    def _delete_keys(self, keys: list[str]) -> None:
        """Delete keys; missing ones are not an error."""

    def _sdk_retry_count(self) -> int:
        return 0

    # ---- layout
    def step_key(self, stage: str, step: int) -> str:
        return f"{check_stage(stage)}/{step_dirname(step)}/"

    def step_uri(self, stage: str, step: int) -> str:
        return self.uri + self.step_key(stage, step)

    def _ref(self, stage: str, step: int, manifest: Optional[dict] = None) -> CheckpointRef:
        return CheckpointRef(stage=stage, step=step, uri=self.step_uri(stage, step), manifest=manifest)

    # ---- upload + commit
    def upload(self, local_dir: str | os.PathLike, stage: str, step: int, *, world_size: int,
               final: bool = False, extra: Optional[dict] = None) -> UploadResult:
        """:meth:`upload_files` of every file of ``local_dir``, then :meth:`commit`."""
        t0 = time.perf_counter()
        entries, stats = self.upload_files(local_dir, stage, step)
        res = self.commit(stage, step, entries, world_size=world_size, final=final, extra=extra, stats=stats,
                          check_listing=False)
        res.stats.total_seconds = time.perf_counter() - t0
        return res

    def upload_files(self, local_dir: str | os.PathLike, stage: str, step: int, *,
                     files: Optional[list[str]] = None) -> tuple[list[dict], TransferStats]:
        """Upload files of ``local_dir`` (all, or the relative paths ``files``) into the step
        directory WITHOUT committing. Returns the manifest entries (``{"path", "size",
        "sha256"}``) and the transfer figures. Several uploaders (one per node) may upload
        into the same step; one of them then calls :meth:`commit` with all entries."""
        t0 = time.perf_counter()
        root = Path(local_dir)
        prefix = self.step_key(stage, step)
        stats = TransferStats(stage=stage, step=step)
        sdk0 = self._sdk_retry_count()
        if not root.is_dir():
            raise CheckpointUploadError(f"checkpoint directory {root} does not exist", stats=stats)
        found = [(rel, p) for rel, p in iter_local_files(root) if rel != MANIFEST_NAME]
        if files is not None:
            wanted = set(files)
            found = [(rel, p) for rel, p in found if rel in wanted]
            missing = sorted(wanted - {rel for rel, _ in found})
            if missing:
                raise CheckpointUploadError(f"files missing in {root}: {missing[:5]}", stats=stats)
        if not found:
            raise CheckpointUploadError(f"checkpoint directory {root} is empty", stats=stats)
        lock = threading.Lock()

        def timed_hash(p: Path) -> tuple[str, float]:
            th = time.perf_counter()
            return sha256_file(p), time.perf_counter() - th

        def one(item: tuple[str, Path]) -> dict:
            rel, p = item
            size = p.stat().st_size
            # the manifest's checksum, computed while the file uploads (hashlib and the
            # socket writes release the GIL; the second read comes from the page cache)
            hashing = hasher.submit(timed_hash, p)
            self._put_file(p, prefix + rel)
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
        except Exception as e:  # noqa: BLE001 - botocore retried what was transient
            raise CheckpointUploadError(f"upload of {stage} step {step} to {self.uri} failed: {short(e)}",
                                        stats=stats) from e
        finally:
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
        try:
            if check_listing:
                listing = self._stage_index(stage).get(step, {})
                problems = [f"{f['path']} ({'missing' if f['path'] not in listing else 'size'})" for f in files
                            if listing.get(f["path"]) != f["size"]]
                if problems:
                    raise CheckpointUploadError(
                        f"{stage} step {step}: not uploaded as listed: {', '.join(problems[:5])}", stats=stats)
            manifest = {
                "format": MANIFEST_FORMAT, "stage": stage, "step": int(step), "world_size": int(world_size),
                "time": now_iso(), "final": bool(final), "total_bytes": sum(f["size"] for f in files),
                "files": files, "extra": dict(extra or {}),
                "id": uuid.uuid4().hex,  # tells our own commit from someone else's
            }
            if not stats.bytes:
                stats.files, stats.bytes = len(files), manifest["total_bytes"]
            tc = time.perf_counter()
            self._commit(prefix, manifest, stats)
        except CheckpointStoreError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore retried what was transient
            raise CheckpointUploadError(f"commit of {self.uri}{prefix} failed: {short(e)}", stats=stats) from e
        stats.commit_seconds = time.perf_counter() - tc
        stats.total_seconds += time.perf_counter() - t0
        stats.sdk_retries += self._sdk_retry_count() - sdk0
        log.info("checkpoint %s step %d committed to %s: %d files, %d bytes, commit %.3fs",
                 stage, step, self.uri, len(files), manifest["total_bytes"], stats.commit_seconds)
        return UploadResult(ref=self._ref(stage, step, manifest), stats=stats)

    def _commit(self, prefix: str, manifest: dict, stats: TransferStats) -> None:
        key = prefix + MANIFEST_NAME
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if self._put_exclusive(key, data):
            return
        # Already there: ours when botocore retried a write whose reply was lost.
        if self._get_bytes(key) != data:
            raise CheckpointCommitConflict(f"{self.uri}{key} already exists: step already committed", stats=stats)

    def mark_final(self, ref: CheckpointRef) -> CheckpointRef:
        """Turn a committed checkpoint into a stage-final one (the state at the stage's last
        step was already committed by an interval save): the manifest is replaced in one
        write by the same manifest with ``final: true``. It stays valid at every moment."""
        m, problems = self._read_manifest(ref.stage, ref.step)
        if problems:
            raise CheckpointUploadError(f"{ref.uri}: cannot mark final: {'; '.join(problems)}")
        if m.get("final"):
            return self._ref(ref.stage, ref.step, m)
        m = dict(m, final=True, finalized_time=now_iso())
        key = self.step_key(ref.stage, ref.step) + MANIFEST_NAME
        try:
            self._put_overwrite(key, json.dumps(m, indent=1, sort_keys=True).encode())
        except Exception as e:  # noqa: BLE001 - botocore retried what was transient
            raise CheckpointUploadError(f"marking {ref.uri} final failed: {short(e)}") from e
        return self._ref(ref.stage, ref.step, m)

    def ref_from_uri(self, uri: str) -> CheckpointRef:
        """The checkpoint whose step directory is ``uri`` (``<store uri><stage>/step-<N>/``),
        with its manifest (None when not committed). ValueError when ``uri`` is not a step
        directory of this store."""
        u = uri if uri.endswith("/") else uri + "/"
        if "://" not in u:
            u = Path(u).absolute().as_uri() + "/"
        if not u.startswith(self.uri):
            raise ValueError(f"{uri!r} is not inside {self.uri!r}")
        parts = u[len(self.uri):].strip("/").split("/")
        if len(parts) != 2 or parse_step_dirname(parts[1]) is None:
            raise ValueError(f"{uri!r} is not a <stage>/step-<N>/ directory of {self.uri!r}")
        stage, step = check_stage(parts[0]), parse_step_dirname(parts[1])
        m, problems = self._read_manifest(stage, step)
        if problems:
            log.warning("checkpoint %s: %s", self.step_uri(stage, step), "; ".join(problems))
        return self._ref(stage, step, m)

    # ---- listing
    def _stage_index(self, stage: str) -> dict[int, dict[str, int]]:
        """{step: {relative path: size}} for every step directory of the stage."""
        base = f"{check_stage(stage)}/"
        out: dict[int, dict[str, int]] = {}
        for key, size in self._list(base).items():
            d, _, rel = key[len(base):].partition("/")
            step = parse_step_dirname(d)
            if step is not None and rel:
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

    # ---- verification / download
    def verify(self, ref: CheckpointRef, *, deep: bool = True) -> list[str]:
        """Problems of a checkpoint against its manifest ([] when valid). Shallow: marker,
        presence and sizes (one listing). Deep: also the sha256 of every object."""
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
            return None if digest == f["sha256"] else f"sha256 mismatch {f['path']}"

        with ThreadPoolExecutor(max_workers=max(1, self.transfer.file_concurrency)) as pool:
            return [p for p in pool.map(check, m["files"]) if p]

    def download(self, ref: CheckpointRef, local_dir: str | os.PathLike,
                 files: Optional[list[str]] = None) -> TransferStats:
        """Download the manifest's files (or only ``files``, manifest paths) into local_dir
        and verify sizes and sha256. A file appears under its name only once verified
        (written to a temp name, then renamed), so a present file is a complete one. Raises
        :class:`CheckpointVerifyError` on any mismatch (verified files stay)."""
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

        def one(f) -> Optional[str]:
            dest = root / f["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex}")
            try:
                if not self._get_file(prefix + f["path"], part):
                    return f"missing file {f['path']}"
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
        """The checkpoint to resume from, or None for a fresh start: the newest valid
        committed checkpoint of ``stage``, else the newest valid ``final`` one of
        ``prev_stage``. Valid is what one listing can tell (:meth:`verify` shallow); bytes
        are checked by whoever reads them (:meth:`download`), and a reader that found a
        corrupt file names its URI in ``skip``."""
        found = self._first_valid(self.checkpoints(stage), skip)
        if found is not None or not prev_stage:
            return found
        found = self.resolve_final(prev_stage, skip=skip)
        if found is None:
            log.warning("no valid checkpoint in stage %s and no final checkpoint of stage %s in %s",
                        stage, prev_stage, self.uri)
        return found

    def resolve_final(self, stage: str, *, skip: Collection[str] = ()) -> Optional[CheckpointRef]:
        """The newest valid stage-final checkpoint of ``stage``; None if none."""
        cands = []
        for r in self.checkpoints(stage):
            if not r.committed:
                log.warning("skipping %s: no valid COMMITTED marker", r.uri)
            elif r.final:
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
        """Keep the newest ``keep`` committed checkpoints of the stage (at least 1). Never
        deletes the newest committed checkpoint nor a ``final`` one. Uncommitted directories
        older than the newest committed one are garbage; newer ones may be uploads in flight."""
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
