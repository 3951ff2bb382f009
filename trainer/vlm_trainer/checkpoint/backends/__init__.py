"""Storage backends of the checkpoint store, and the factory that picks one by URI."""

from __future__ import annotations

from typing import Optional

from ..layout import CheckpointRef, parse_step_dirname
from ..store import CheckpointStore
from ..settings import RetrySettings, TransferSettings


def open_store(uri: str, *, endpoint_url: Optional[str] = None, transfer: TransferSettings | None = None,
               retry: RetrySettings | None = None, **s3_kwargs) -> CheckpointStore:
    """A store for ``s3://bucket/prefix/``, ``file:///path`` or a plain local path."""
    if uri.startswith("s3://"):
        from .s3 import S3CheckpointStore

        return S3CheckpointStore(uri, endpoint_url=endpoint_url, transfer=transfer, retry=retry, **s3_kwargs)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported checkpoint URI scheme: {uri!r}")
    from .local import LocalCheckpointStore

    return LocalCheckpointStore(uri, transfer=transfer, retry=retry)


def open_step_uri(uri: str, **kwargs) -> tuple[CheckpointStore, CheckpointRef]:
    """(store, ref) for the step directory ``uri`` = ``<root>/<stage>/step-<N>/`` (the form
    of ``TrainerConfig.init_from``); the store is opened at ``<root>`` with ``kwargs``."""
    parts = uri.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or parse_step_dirname(parts[2]) is None:
        raise ValueError(f"{uri!r} is not a <root>/<stage>/step-<N>/ checkpoint directory")
    store = open_store(parts[0] + "/", **kwargs)
    return store, store.ref_from_uri(uri)
