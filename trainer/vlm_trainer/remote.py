"""Turn a model/tokenizer location into a local directory.

Local paths and ``file://`` URIs are used in place. ``s3://bucket/prefix/`` is
downloaded once (every object under the prefix) into a cache directory
(``$VLM_CACHE_DIR``, default ``~/.cache/vlm-trainer``) with boto3; the endpoint comes
from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``) or
``$VLM_S3_ENDPOINT``, credentials from the part's credentialsSecret (passed in by the
caller, vlm_api.cluster.secret_credentials) or boto3's default chain. Nothing else is fetched:
there is no hub download anywhere in the trainer.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("VLM_CACHE_DIR") or Path.home() / ".cache" / "vlm-trainer")


DONE_MARKER = ".complete"


class UnsafeKey(ValueError):
    """An object key that would land outside the download directory."""


def safe_relative(key: str, prefix: str) -> str | None:
    """The local relative path of object `key` under `prefix`; None for directory markers.

    S3 keys are free-form strings: `a/../../etc/x`, `/abs`, `..` or a backslash would put
    the file outside the cache (or over the completion marker) if joined naively. Such a key
    is refused with UnsafeKey, and the whole download fails: a model directory that is
    missing a file it lists is not one to load from."""
    rel = key[len(prefix):]
    if not rel or rel.endswith("/"):
        return None
    segments = rel.split("/")
    if any(s in ("", ".", "..") for s in segments) or "\\" in rel or "\0" in rel or rel == DONE_MARKER:
        raise UnsafeKey(f"object key {key!r} does not name a file inside {prefix or 'the bucket'!r}: refused")
    return rel


def localize(path: str, *, kind: str = "model", credentials: dict[str, str] | None = None) -> str:
    if path.startswith("file://"):
        return path[len("file://"):]
    if not path.startswith("s3://"):
        return path
    parsed = urlparse(path)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    dest = cache_dir() / kind / f"{bucket}-{digest}"
    done = dest / DONE_MARKER
    if done.exists():
        return str(dest)
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("VLM_S3_ENDPOINT") or None
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"} if endpoint else {}),
                          **(credentials or {}))
    n = 0
    root = dest.resolve()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = safe_relative(obj["Key"], prefix)
            if rel is None:
                continue
            target = dest / rel
            if not target.resolve().is_relative_to(root):  # e.g. through a symlink planted earlier
                raise UnsafeKey(f"object key {obj['Key']!r} resolves outside {dest}: refused")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.part-{os.getpid()}")
            client.download_file(bucket, obj["Key"], str(tmp))
            os.replace(tmp, target)
            n += 1
    if n == 0:
        raise FileNotFoundError(f"{path}: no objects under this prefix")
    done.touch()
    log.info("downloaded %d files of %s to %s", n, path, dest)
    return str(dest)
