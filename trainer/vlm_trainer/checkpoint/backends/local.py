"""A checkpoint store in a local (or mounted) directory: ``file:///abs/path`` or a plain path."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from ..layout import MANIFEST_NAME, iter_local_files, sha256_file
from ..store import CheckpointStore

_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{32}$")  # our own temp files


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


def _write_synced(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LocalCheckpointStore(CheckpointStore):
    def __init__(self, uri: str, **kwargs):
        self.root = Path(urlparse(uri).path if uri.startswith("file://") else uri).absolute()
        super().__init__(self.root.as_uri(), **kwargs)

    def _p(self, key: str) -> Path:
        return self.root / key

    def _tmp(self, dest: Path) -> Path:
        return dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")

    def _list(self, prefix: str) -> dict[str, int]:
        base = self._p(prefix) if prefix else self.root
        if not base.is_dir():
            return {}
        out = {}
        for rel, p in iter_local_files(base):
            if _TMP_RE.search(p.name):
                continue
            try:
                out[prefix + rel] = p.stat().st_size
            except FileNotFoundError:
                continue
        return out

    def _put_file(self, local: Path, key: str) -> None:
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(dest)
        try:
            shutil.copyfile(local, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _put_exclusive(self, key: str, data: bytes) -> bool:
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(dest)
        _write_synced(tmp, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            try:
                os.link(tmp, dest)  # atomic, fails if dest exists; dest is complete when visible
            except FileExistsError:
                return False
            except OSError:  # filesystems without hard links: exclusive create in place
                try:
                    _write_synced(dest, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                except FileExistsError:
                    return False
            _fsync_dir(dest.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _put_overwrite(self, key: str, data: bytes) -> None:
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(dest)
        try:
            _write_synced(tmp, data, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def _get_bytes(self, key: str) -> Optional[bytes]:
        try:
            return self._p(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _get_file(self, key: str, local: Path) -> bool:
        try:
            shutil.copyfile(self._p(key), local)
        except FileNotFoundError:
            return False
        return True

    def _hash_object(self, key: str) -> tuple[int, str]:
        p = self._p(key)
        try:
            return p.stat().st_size, sha256_file(p)
        except FileNotFoundError:
            return -1, ""

    def _delete_keys(self, keys: list[str]) -> None:
        dirs = set()
        for k in keys:
            p = self._p(k)
            p.unlink(missing_ok=True)
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
