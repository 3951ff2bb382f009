"""Reading checkpoints without running code from them.

A checkpoint comes from object storage, and whoever can write there (a leaked key, a
shared bucket, an `initFrom` pointing at someone else's run) must not be able to run
code in a trainer pod that holds the run's credentials. Three places unpickle:

- the trainer's own blobs (progress, data positions, RNG state: `checkpoint._pack`):
  `load_blob` is `torch.load(weights_only=True)` with only the numpy types an RNG state
  holds allowed besides torch's defaults (tensors, containers, numbers, strings, bytes);
- DCP's non-tensor entries: its `DefaultLoadPlanner.load_bytes` calls
  `torch.load(weights_only=False)`; `SafeLoadPlanner` / `SafeEmptyStateDictLoadPlanner`
  load them with `load_blob`;
- DCP's `.metadata` file, a plain `pickle` of its index dataclasses:
  `SafeFileSystemReader.read_metadata` unpickles it with `MetadataUnpickler`, which resolves
  only those dataclasses, torch sizes, dtypes and layouts, and paths.

Tensor data itself is read by DCP with `weights_only=True` already.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch


def _numpy_globals() -> list:
    """What `numpy.random.get_state()` pickles as (an ndarray of uint32 in a tuple)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with the trainer
        return []
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


SAFE_GLOBALS = _numpy_globals()


def load_blob(blob: Any) -> Any:
    """`torch.load(weights_only=True)` of bytes or a file object from a checkpoint."""
    stream = io.BytesIO(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else blob
    if hasattr(stream, "seek"):
        stream.seek(0)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(stream, weights_only=True)


# --------------------------------------------------------------------------- DCP


def _set_bytes(planner, read_item, value) -> None:
    """DefaultLoadPlanner.load_bytes (torch 2.13), with load_blob instead of weights_only=False."""
    from torch.distributed.checkpoint._traverse import set_element  # the helper DefaultLoadPlanner uses

    obj = load_blob(value)
    fqn = read_item.dest_index.fqn
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[fqn], obj)
    else:
        planner.state_dict[fqn] = obj


def _planners():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            _set_bytes(self, read_item, value)

    class SafeEmptyStateDictLoadPlanner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            _set_bytes(self, read_item, value)

    return SafeLoadPlanner, SafeEmptyStateDictLoadPlanner


def _allowed_metadata_globals() -> dict[tuple[str, str], Any]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    out: dict[tuple[str, str], Any] = {}
    for name, value in vars(metadata).items():
        if isinstance(value, type) and value.__module__ == metadata.__name__:
            out[(metadata.__name__, name)] = value
    out[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    out[("torch", "Size")] = torch.Size
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            out[("torch", name)] = value
    out[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for cls in (pathlib.PurePosixPath, pathlib.PosixPath, pathlib.PureWindowsPath, pathlib.PurePath, pathlib.Path):
        out[("pathlib", cls.__name__)] = cls
    out[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return out


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file: its index types only, nothing callable beyond them."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if MetadataUnpickler._allowed is None:
            MetadataUnpickler._allowed = _allowed_metadata_globals()
        try:
            return MetadataUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, "
                                         "which a DCP index never holds: refused") from None


def load_metadata(stream) -> Any:
    return MetadataUnpickler(stream).load()


def _reader():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader whose `.metadata` goes through MetadataUnpickler (torch 2.13's
        read_metadata otherwise)."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                meta = load_metadata(f)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeFileSystemReader


SafeLoadPlanner, SafeEmptyStateDictLoadPlanner = _planners()
SafeFileSystemReader = _reader()
