"""Prometheus and promtool binaries for tests, from Debian's ``prometheus`` package.

Nothing is installed system-wide: the ``.deb`` is fetched with ``apt-get download``
(the ordinary Debian client, so only the configured package mirrors are contacted)
and unpacked with ``dpkg -x`` (or, without dpkg, by reading the ar/tar archive in
Python) into a cache directory. Later calls reuse the cache.

    from tests.support.prometheus_bin import prometheus_binaries
    prometheus, promtool = prometheus_binaries()

Environment:
  PROMETHEUS_BIN / PROMTOOL_BIN   use these binaries instead (both must be set)
  VLM_PROMETHEUS_CACHE            cache directory (default: <repo>/.cache/prometheus)
  VLM_PROMETHEUS_PACKAGE          apt package spec (default: ``prometheus``; e.g.
                                  ``prometheus=2.42.0+ds-5+deb12u1`` to pin)

Debian bookworm ships Prometheus 2.42 (the version the project targets). Concurrent
callers (several pytest processes) are serialised with a file lock.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "prometheus"


class PrometheusUnavailable(RuntimeError):
    """The binaries could not be found, downloaded or unpacked."""


def cache_dir() -> Path:
    return Path(os.environ.get("VLM_PROMETHEUS_CACHE", DEFAULT_CACHE))


def _bins_under(root: Path) -> tuple[Path, Path] | None:
    prom, tool = root / "usr" / "bin" / "prometheus", root / "usr" / "bin" / "promtool"
    if prom.is_file() and tool.is_file() and os.access(prom, os.X_OK) and os.access(tool, os.X_OK):
        return prom, tool
    return None


def _apt_download(dest: Path) -> Path:
    """``apt-get download`` into *dest*; retries once after ``apt-get update``."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise PrometheusUnavailable("apt-get not found: not a Debian-like system; set PROMETHEUS_BIN and PROMTOOL_BIN")
    spec = os.environ.get("VLM_PROMETHEUS_PACKAGE", "prometheus")
    errors = []
    for attempt in range(2):
        if attempt == 1:
            upd = subprocess.run([apt, "update"], capture_output=True, text=True, timeout=600)
            if upd.returncode != 0:
                errors.append(f"apt-get update failed: {upd.stderr.strip()[-2000:]}")
        res = subprocess.run([apt, "download", spec], cwd=dest, capture_output=True, text=True, timeout=600)
        debs = sorted(dest.glob("prometheus_*.deb"))
        if res.returncode == 0 and debs:
            return debs[-1]
        errors.append(f"apt-get download {spec} (rc={res.returncode}): {res.stderr.strip()[-2000:]}")
    raise PrometheusUnavailable("could not download the Debian prometheus package:\n" + "\n".join(errors))


def _extract_deb_python(deb: Path, dest: Path) -> None:
    """Unpack data.tar.* of a .deb (an ar archive) without dpkg."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise PrometheusUnavailable(f"{deb} is not an ar archive")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise PrometheusUnavailable("data.tar.zst needs dpkg (or zstandard) to unpack")
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                if hasattr(tarfile, "tar_filter"):
                    tar.extractall(dest, filter="tar")
                else:  # Python without extraction filters (< 3.11.4)
                    tar.extractall(dest)
            return
    raise PrometheusUnavailable(f"{deb} has no data.tar member")


def _extract(deb: Path, dest: Path) -> None:
    dpkg = shutil.which("dpkg")
    if dpkg is not None:
        res = subprocess.run([dpkg, "-x", str(deb), str(dest)], capture_output=True, text=True, timeout=600)
        if res.returncode == 0:
            return
    _extract_deb_python(deb, dest)


def prometheus_binaries() -> tuple[str, str]:
    """Return ``(prometheus_path, promtool_path)``, downloading and unpacking on first use."""
    env_prom, env_tool = os.environ.get("PROMETHEUS_BIN"), os.environ.get("PROMTOOL_BIN")
    if env_prom and env_tool:
        return env_prom, env_tool

    base = cache_dir()
    root = base / "root"
    found = _bins_under(root)
    if found:
        return str(found[0]), str(found[1])

    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            found = _bins_under(root)  # another process may have finished meanwhile
            if found:
                return str(found[0]), str(found[1])
            with tempfile.TemporaryDirectory(dir=base, prefix="dl-") as tmp:
                tmp_path = Path(tmp)
                # apt's _apt user must be able to write here, or apt warns and falls back to root
                os.chmod(tmp_path, 0o777)
                deb = _apt_download(tmp_path)
                staging = tmp_path / "root"
                staging.mkdir()
                _extract(deb, staging)
                if _bins_under(staging) is None:
                    raise PrometheusUnavailable(f"{deb.name} did not contain usr/bin/prometheus and usr/bin/promtool")
                if root.exists():
                    shutil.rmtree(root)
                staging.rename(root)
                (base / "PACKAGE").write_text(deb.name + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    found = _bins_under(root)
    assert found is not None
    return str(found[0]), str(found[1])


def promtool_version() -> str:
    _, promtool = prometheus_binaries()
    out = subprocess.run([promtool, "--version"], capture_output=True, text=True, timeout=60)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""


if __name__ == "__main__":  # python -m tests.support.prometheus_bin
    print(*prometheus_binaries(), sep="\n")
    print(promtool_version())
