"""The local runner's options and the checks that need no process: the `vlmpretrain
local` arguments, local checkpoint URIs, free ports, GPUs, missing shard files."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from vlm_api import schema
from vlm_api.cluster import local_pvc_env, resolve_pvc
from vlm_api.quantities import expand_braces


class LocalRunError(RuntimeError):
    """A problem the user can fix (bad file, missing data, missing checkpoint)."""


@dataclasses.dataclass
class LocalOptions:
    file: str
    nproc: int | None = None
    nnodes: tuple[int, int] | None = None
    checkpoint_dir: str | None = None
    max_steps: int | None = None
    metrics_port: int | None = None
    stage: str | None = None
    run_dir: str | None = None
    progress: str = "auto"  # auto | bar | plain
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # extra worker env (tests, tuning)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LocalOptions":
        return cls(file=args.file, nproc=args.nproc, nnodes=parse_nnodes(args.nnodes) if args.nnodes else None,
                   checkpoint_dir=args.checkpoint_dir, max_steps=args.max_steps, metrics_port=args.metrics_port,
                   stage=args.stage, run_dir=args.run_dir, progress=getattr(args, "progress", "auto") or "auto",
                   env=local_pvc_env(getattr(args, "pvc", None)))


def parse_nnodes(value: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1:2' -> (1, 2)."""
    try:
        lo, _, hi = value.partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise LocalRunError(f"--nnodes {value!r}: expected N or MIN:MAX") from None
    if not 1 <= lo_i <= hi_i:
        raise LocalRunError(f"--nnodes {value!r}: need 1 <= MIN <= MAX")
    return lo_i, hi_i



def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def local_checkpoint_uri(uri: str, base: Path) -> str:
    """A checkpoint URI the trainer can use from any working directory.

    ``s3://...`` is returned as given. Local ones (``file:///abs``, ``file://./rel``,
    ``./rel``, ``/abs``) become ``file:///absolute/path`` resolved against ``base``:
    ``file://./x`` would otherwise parse as host ``.`` and path ``/x``.
    """
    if uri.startswith("s3://"):
        return uri
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        path = (parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost") else parsed.path
    else:
        path = uri
    p = Path(path)
    if not p.is_absolute():
        p = base / p
    return p.resolve().as_uri()


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.strip().startswith("GPU"))


def missing_shards(spec: schema.VLMPretrainRunSpec, stage: schema.Stage, base: Path,
                   pvc: dict[str, str] | None = None) -> list[str]:
    """Local shard files the stage reads that do not exist (s3:// is not checked); pvc://
    URIs are looked for in the `--pvc` directories (`pvc`: claim -> directory)."""
    names = {n for n, f in stage.mixture.items() if f > 0}
    missing = []
    for src in spec.data.sources:
        uris = ([src.uri] if src.name in names else []) + ([src.validation_uri] if src.validation_uri else [])
        for uri in uris:
            if uri.startswith("s3://"):
                continue
            try:
                uri = resolve_pvc(uri, pvc or {})
            except ValueError as exc:
                missing.append(str(exc))
                continue
            for path in expand_braces(uri):
                p = Path(urlparse(path).path if path.startswith("file://") else path)
                if not p.is_absolute():
                    p = base / p
                if not p.exists():
                    missing.append(str(p))
    return missing


