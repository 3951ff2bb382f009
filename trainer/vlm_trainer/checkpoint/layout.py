"""Where a checkpoint lives and what its COMMITTED manifest says (pure, no I/O but hashing).

Layout under a store root (``s3://bucket/prefix/``, ``file:///path/`` or a plain path)::

    <root>/<stage>/step-000001200/.metadata            DCP metadata
    <root>/<stage>/step-000001200/__0_0.distcp         DCP shards, one per rank
    <root>/<stage>/step-000001200/trainer-config.yaml  the TrainerConfig it was written with
    <root>/<stage>/step-000001200/COMMITTED            the manifest, written last

A checkpoint counts only when its manifest exists and parses. Manifest (JSON)::

    {"format": "vlm-ckpt/1", "stage": "pretrain", "step": 1200, "world_size": 16,
     "time": "2025-01-01T12:00:00.123456+00:00", "final": false, "total_bytes": 123,
     "files": [{"path": ".metadata", "size": 123, "sha256": "..."}], "extra": {...}}

Whether a committed checkpoint ends its stage is ``vlm_api.stage_policy.is_final`` of its
step and its ``final`` flag; this module only carries the flag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

MANIFEST_NAME = "COMMITTED"
MANIFEST_FORMAT = "vlm-ckpt/1"
CONFIG_NAME = "trainer-config.yaml"  # the TrainerConfig a checkpoint was written with
STEP_DIGITS = 9
MiB = 1024 * 1024
HASH_CHUNK = 4 * MiB

_STEP_RE = re.compile(r"^step-(\d+)$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def step_dirname(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dirname(name: str) -> Optional[int]:
    """``step-000000120`` -> 120 (any number of digits); anything else -> None."""
    m = _STEP_RE.match(name.rstrip("/"))
    return int(m.group(1)) if m else None


def check_stage(stage: str) -> str:
    if not isinstance(stage, str) or not _STAGE_RE.match(stage):
        raise ValueError(f"invalid stage name {stage!r} (letters, digits, '.', '_', '-')")
    return stage


def split_checkpoint_uri(uri: str) -> tuple[str, str, Optional[int]]:
    """``<root>/<stage>/step-<N>/`` -> (root, stage, N); ``<root>/<stage>/`` -> (root, stage,
    None). Plain local paths become ``file://`` URIs."""
    if "://" not in uri:
        uri = Path(uri).absolute().as_uri()
    parts = uri.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parse_step_dirname(parts[2]) is not None:
        return parts[0] + "/", check_stage(parts[1]), parse_step_dirname(parts[2])
    root, stage = uri.rstrip("/").rsplit("/", 1)
    if root.endswith((":", ":/", "//")):
        raise ValueError(f"{uri!r}: expected <root>/<stage>/step-N/ or <root>/<stage>/")
    return root + "/", check_stage(stage), None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(HASH_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def iter_local_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, absolute path) of every regular file under root, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            p = Path(dirpath) / fn
            if p.is_symlink() or not p.is_file():
                continue
            out.append((p.relative_to(root).as_posix(), p))
    out.sort()
    return iter(out)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def short(e: BaseException, limit: int = 500) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < limit else s[:limit] + "..."


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
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
                and isinstance(f.get("sha256"), str)):
            problems.append(f"bad file entry {f!r}")
            continue
        p = f["path"]
        if p.startswith("/") or ".." in p.split("/") or p == MANIFEST_NAME:
            problems.append(f"unsafe file path {p!r}")
    return problems


@dataclasses.dataclass(frozen=True)
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

    @property
    def has_config(self) -> bool:
        """Whether the checkpoint carries the TrainerConfig it was written with."""
        return any(f["path"] == CONFIG_NAME for f in self.files)
