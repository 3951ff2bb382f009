"""Helpers for tests and benchmarks that start real torchrun agents: process trees from
psutil (torchrun's workers run in their own session, so killing the launcher's process
group does not stop them: everything is stopped explicitly, by pid), progress files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import psutil

PYTHON = sys.executable
VLMPRETRAIN = str(Path(sys.executable).parent / "vlmpretrain")
ELASTIC_CONF = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=2"


def children(pid: int) -> list[int]:
    """All descendants of pid, each after its parent (psutil)."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def proc_env(pid: int) -> dict:
    try:
        return psutil.Process(pid).environ()
    except psutil.Error:
        return {}


def workers(agent_pid: int) -> dict[int, int]:
    """{global rank: pid} of a torchrun agent's live worker processes (not their forked
    data workers, which share the worker's environment and come after it)."""
    out: dict[int, int] = {}
    for pid in children(agent_pid):
        env = proc_env(pid)
        if "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            out.setdefault(int(env["RANK"]), pid)
    return out


def kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL an agent and every process below it (collected before the agent dies)."""
    pids = children(proc.pid)
    kill([proc.pid])
    kill(pids)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def read_progress(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def steps(path: Path) -> list[dict]:
    return [e for e in read_progress(path) if e["event"] == "step"]


def wait_for(pred: Callable[[], object], timeout: float, what: str, procs=()) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process {p.pid} exited with {p.returncode} first")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def torchrun(config: Path, *, nproc: int, nnodes: str = "1", endpoint: str = "localhost:0", rdzv_id: str = "test",
             max_restarts: int = 3, rdzv_conf: Optional[str] = ELASTIC_CONF, env: dict, log: Path,
             cwd: Path) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.5"]
    if rdzv_conf:
        cmd += ["--rdzv-conf", rdzv_conf]
    cmd += ["-m", "vlm_trainer", "--config", str(config)]
    fh = open(log, "w")
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    finally:
        fh.close()


class RendezvousStore:
    """A `vlmpretrain rendezvous-store` subprocess (the external c10d store, issue 10);
    ``restart()`` brings up a new, empty one on the same port."""

    def __init__(self, root: Path, *, cwd: Path, port: int = 0):
        self.root, self.cwd, self.n = root, cwd, 0
        self.proc: subprocess.Popen | None = None
        self.port = port
        self.start()

    def start(self) -> None:
        self.n += 1
        log = self.root / f"store{self.n}.log"
        fh = open(log, "w")
        self.proc = subprocess.Popen([VLMPRETRAIN, "rendezvous-store", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--health-port", "0"],
                                     stdout=fh, stderr=subprocess.STDOUT, cwd=self.cwd)
        fh.close()

        def bound():
            m = re.search(r"listening port=(\d+) health_port=(\d+)", log.read_text())
            return m and int(m.group(1))

        self.port = wait_for(bound, 60, "rendezvous store to listen", [self.proc])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        end = time.monotonic() + 20
        while True:  # the port may be in TIME_WAIT for a moment
            try:
                self.start()
                return
            except AssertionError:
                if time.monotonic() > end:
                    raise
