"""The trainer runs on a read-only root filesystem, writing only where the pod lets it.

The rendered worker container has `readOnlyRootFilesystem: true`, a scratch emptyDir, a
memory emptyDir at /dev/shm and the kubelet's termination-log file; its environment
(render.SCRATCH_ENV) points every cache and temp directory into the scratch. This test
runs the real trainer under torchrun the same way: in a private mount namespace
(`unshare -rm`) whose `/` is remounted read-only, with only a scratch directory, /dev/shm
and the termination-log file writable, the rendered scratch environment (its /tmp
replaced by the scratch directory, which is stricter: a write to a hard-coded /tmp fails
here), a read-only working directory, checkpoints on (file:// into the scratch). It must
finish the stage, commit its checkpoints and write the confirmation.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from tests.fixtures_trainer import REPO, shared_data, spec_dict, stage, torchrun_env, trainer_config, write_config
from vlm_api import render

pytestmark = pytest.mark.slow


def _unshare_works() -> bool:
    try:
        out = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -o remount,bind,ro / && ! touch /.rw-probe"],
                             capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def test_trainer_needs_no_writable_root(tmp_path_factory, tmp_path):
    if not _unshare_works():
        pytest.skip("no unprivileged mount namespaces here (unshare -rm)")  # ok: needs user+mount namespaces
    data = shared_data(tmp_path_factory)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    termlog = tmp_path / "termination-log"
    termlog.write_text("")
    spec = spec_dict(data, stages=[stage(steps=6, microBatchSize=2)], checkpoint_uri=f"file://{scratch}/ckpt")
    spec["checkpoint"].update(interval=3, keep=2)
    config = write_config(trainer_config(spec), tmp_path / "config.yaml")
    env = torchrun_env(VLM_NO_CHECKPOINT=0, VLM_METRICS_PORT=0, VLM_TERMINATION_LOG=termlog)
    for key, value in render.SCRATCH_ENV.items():
        env[key] = value.replace(render.SCRATCH, str(scratch), 1) if value.startswith(render.SCRATCH) else value
    env.pop("VLM_CKPT_LOCAL_DIR", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", "ro", "--max-restarts", "0",
                "-m", "vlm_trainer", "--config", str(config)]
    script = "\n".join([
        "set -e",
        f"mount --bind {shlex.quote(str(scratch))} {shlex.quote(str(scratch))}",
        f"mount --bind {shlex.quote(str(termlog))} {shlex.quote(str(termlog))}",
        "mount -o remount,bind,ro /",
        # the check has teeth: the root (the repository, the working directory, /tmp) is read-only
        f"if touch {shlex.quote(str(tmp_path / 'outside'))} 2>/dev/null; then echo 'root is writable'; exit 90; fi",
        f"if touch {shlex.quote(str(REPO / '.rw-probe'))} 2>/dev/null; then echo 'repo is writable'; exit 91; fi",
        "exec " + shlex.join(torchrun),
    ])
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    log = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, log
    assert "Read-only file system" not in log, log
    confirmation = json.loads(termlog.read_text())
    assert confirmation["stage"] == "pretrain" and confirmation["step"] == 6, confirmation
    committed = sorted(p.parent.name for p in (scratch / "ckpt").rglob("COMMITTED"))
    assert committed and committed[-1].endswith("6"), committed
    assert not (tmp_path / "outside").exists()
