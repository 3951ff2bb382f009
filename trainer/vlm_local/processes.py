"""The local runner's process bookkeeping (psutil): every process below the torchrun
agents, remembered by pid + start time so it can be killed by pid later.

torchrun's workers live in their own sessions: a process-group kill of an agent does not
reach them, and a SIGKILLed agent leaves them running. The runner also makes itself a
child subreaper, so workers orphaned by a dead agent are still its descendants.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import psutil


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def set_child_subreaper() -> bool:
    """Orphaned descendants (workers of a killed agent) re-parent to this process (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _table() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, create time, status) of every live process."""
    out = {}
    for p in psutil.process_iter(["ppid", "create_time", "status"]):
        info = p.info
        if info.get("ppid") is not None and info.get("create_time") is not None:
            out[p.pid] = (info["ppid"], info["create_time"], info.get("status") or "")
    return out


class ProcessTracker:
    """Remembers every process below the given roots (the torchrun agents) by pid + start
    time; the start time guards against a recycled pid."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}  # pid -> create time
        self.roots: set[int] = set()
        self.me = os.getpid()

    def set_roots(self, pids) -> None:
        self.roots = set(pids)

    def poll(self) -> None:
        table = _table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        # Descendants of the agents, plus orphans re-parented to us (subreaper) that are not agents.
        stack = list(self.roots) + [p for p in children.get(self.me, []) if p in self.seen or p in self.roots]
        while stack:
            pid = stack.pop()
            if pid not in table:
                continue
            self.seen.setdefault(pid, table[pid][1])
            stack.extend(children.get(pid, []))
        for pid, (ppid, _, status) in table.items():  # reap our zombie orphans
            if ppid == self.me and pid in self.seen and pid not in self.roots and status == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)

    def alive(self) -> list[int]:
        out = []
        for pid, start in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == start and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.Error:
                continue
        return out

    def signal_all(self, sig: int, *, exclude_roots: bool = False) -> list[int]:
        hit = []
        for pid in self.alive():
            if exclude_roots and pid in self.roots:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                hit.append(pid)
        return hit

    def wait_gone(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.alive() and time.monotonic() < end:
            self.poll()
            time.sleep(0.05)
