"""The benchmark method, in one place.

Every figure that carries a target is a *paired* measurement: the thing measured (A) and
its baseline (B) run in the same process and invocation, interleaved ``A B A B ...`` after
warm-up rounds that are timed but discarded, and the figure is the median of the per-pair
ratios with their min and max. Pairing within one invocation cancels what drifts between
invocations (CPU frequency, a noisy neighbour, page cache); alternation spreads drift
within the invocation evenly over A and B; the median ignores a single hiccup; the min-max
shows how much to trust it.

An area module (``benchmarks/<area>.py``) exposes ``run(quick: bool) -> dict``. The dict it
returns should hold ``"figures": [Figure.as_dict(), ...]``; anything else in it (parameters,
raw samples, notes) is kept as is in the JSON. Areas written without this module may return
plain ``{name: number}`` or ``{name: {"value": ..., ...}}`` items: :func:`normalize_area`
turns those into figures too.

Targets from the issues live in :data:`TARGETS`; a figure meets a target when its
``name`` (or ``target_id``) is one of the target's keys. A figure may also carry its own
``target`` ({"op": "<=", "value": 2}); the README table shows both kinds.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "vlm-bench/1"


# --------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the two middle values for even lengths)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(vals))


def min_max(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("min_max of an empty sequence")
    return min(vals), max(vals)


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-pair ratios a[i] / b[i] (pairs are measured next to each other)."""
    if len(a) != len(b):
        raise ValueError(f"unpaired samples: {len(a)} vs {len(b)}")
    out = []
    for x, y in zip(a, b):
        out.append(math.inf if y == 0 else float(x) / float(y))
    return out


@dataclasses.dataclass
class Summary:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary":
        lo, hi = min_max(values)
        return cls(median(values), lo, hi, len(values))


def alternation_order(repeats: int, warmup: int = 1, *, labels: tuple[str, str] = ("A", "B")) -> list[tuple[str, int]]:
    """The schedule of a paired measurement: ``warmup`` discarded rounds then ``repeats``
    measured ones, each round ``A`` then ``B``. Round indices < 0 are warm-up rounds.

    >>> alternation_order(2, 1)
    [('A', -1), ('B', -1), ('A', 0), ('B', 0), ('A', 1), ('B', 1)]
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats >= 1 and warmup >= 0 required")
    order = []
    for r in range(-warmup, repeats):
        order.append((labels[0], r))
        order.append((labels[1], r))
    return order


class ForeignCpu:
    """Share of the machine's CPU used by *other* processes between :meth:`start` and
    :meth:`stop`: machine busy time (``/proc/stat``) minus this process's own CPU time
    (all its threads, and children it reaped), over all cores. ``None`` without /proc."""

    def __init__(self):
        self._m = None
        self._own = 0.0

    @staticmethod
    def _own_seconds() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> "ForeignCpu":
        self._m = _cpu_jiffies()
        self._own = self._own_seconds()
        return self

    def stop(self) -> float | None:
        end = _cpu_jiffies()
        own = self._own_seconds() - self._own
        if not self._m or not end or end[1] <= self._m[1]:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (end[0] - self._m[0]) - own * hz
        return max(0.0, min(1.0, busy / (end[1] - self._m[1])))


@dataclasses.dataclass
class Paired:
    """Result of :func:`paired`: raw samples of A and B (measured rounds only) and the
    per-pair ratio A/B summarised (over the clean pairs when contended ones were excluded)."""

    a: list[float]
    b: list[float]
    ratio: Summary
    a_summary: Summary
    b_summary: Summary
    order: list[tuple[str, int]]
    foreign: list[float | None] = dataclasses.field(default_factory=list)  # per measured round
    used: list[int] = dataclasses.field(default_factory=list)  # rounds the summaries are over
    contended: bool = False  # too few clean rounds: the summaries are over all rounds

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "ratio": dataclasses.asdict(self.ratio),
                "a_summary": dataclasses.asdict(self.a_summary), "b_summary": dataclasses.asdict(self.b_summary),
                "foreign_cpu_per_round": self.foreign, "rounds_used": self.used, "contended": self.contended}


def select_clean(foreign: Sequence[float | None], *, threshold: float | None, min_clean: int) -> tuple[list[int], bool]:
    """Indices of the rounds to summarise: those where other processes used at most
    ``threshold`` of the CPU, if there are at least ``min_clean`` of them; else all rounds
    (and ``contended`` = True). A whole pair is kept or dropped, never one side of it."""
    everything = list(range(len(foreign)))
    if threshold is None:
        return everything, False
    clean = [i for i, f in enumerate(foreign) if f is not None and f <= threshold]
    if len(clean) >= min_clean:
        return clean, False
    return everything, any(f is not None and f > threshold for f in foreign)


def paired(run_a: Callable[[], float | None], run_b: Callable[[], float | None], *, repeats: int, warmup: int = 1,
           clock: Callable[[], float] = time.perf_counter, collect: bool = True,
           exclude_contended: float | None = None, min_clean: int = 3) -> Paired:
    """Measure A against its baseline B, alternating ``A B A B``.

    Each callable either returns its own measurement (e.g. seconds it timed itself, or a
    throughput) or ``None``, in which case its wall time is taken with ``clock``. The
    ratio is A / B per measured round: for times a ratio > 1 means A is slower; for
    throughputs the caller passes the measurements so that the ratio reads naturally.
    ``gc.collect()`` runs before every sample (outside the timing) when ``collect``.

    The CPU share other processes used is recorded per round (A and B together). With
    ``exclude_contended=x`` the summaries are over the rounds where it was <= x, provided
    at least ``min_clean`` rounds were (else over all of them, flagged ``contended``). Only
    for areas whose work all runs in this process (a helper process would count as foreign).
    """
    order = alternation_order(repeats, warmup)
    samples: dict[str, list[float]] = {"A": [], "B": []}
    foreign: list[float | None] = []
    fns = {"A": run_a, "B": run_b}
    meter = ForeignCpu()
    for label, rnd in order:
        if collect:
            gc.collect()
        if label == "A":
            meter.start()
        t0 = clock()
        value = fns[label]()
        elapsed = clock() - t0
        if rnd >= 0:
            samples[label].append(float(elapsed if value is None else value))
            if label == "B":
                foreign.append(meter.stop())
    used, contended = select_clean(foreign, threshold=exclude_contended, min_clean=min_clean)
    a = [samples["A"][i] for i in used]
    b = [samples["B"][i] for i in used]
    r = ratios(a, b)
    return Paired(samples["A"], samples["B"], Summary.of(r), Summary.of(a), Summary.of(b), order, foreign, used,
                  contended)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; falls back to ru_maxrss = peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tree_pss_bytes() -> int:
    """Proportional set size of this process and its live children (e.g. the trainer's
    forked data worker): shared copy-on-write pages counted once. Falls back to RSS."""
    def pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            return 0

    own = pss(os.getpid())
    if not own:
        return rss_bytes()
    return own + sum(pss(pid) for pid in _process_tree(os.getpid())[1:])


# --------------------------------------------------------------------------- contention

def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
    except OSError:
        return None
    vals = [int(x) for x in parts[:8]]
    idle = vals[3] + vals[4]  # idle + iowait
    total = sum(vals)
    return total - idle, total


def _proc_stats() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, CPU jiffies: utime + stime + cutime + cstime)} from /proc/*/stat."""
    out: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()  # fields[0] is the state (3rd field of stat)
        out[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return out


def _process_tree(root: int, stats: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """root and all its descendants, found by parent pid (torchrun workers and helper servers
    often start their own session or process group, so the process group would miss them)."""
    stats = _proc_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def _tree_jiffies(root: int) -> int:
    """CPU jiffies (user + system, plus reaped children) of a process and all its
    descendants. A descendant that exits moves its time into its parent's cutime/cstime
    when reaped, so deltas stay right."""
    stats = _proc_stats()
    return sum(stats[pid][1] for pid in _process_tree(root, stats) if pid in stats)


class CpuMonitor:
    """Measures how much CPU *other* processes used while an area ran: machine busy time
    minus the area's process tree (its pid and every descendant), as a share of all cores.
    Benchmarks on a shared machine are only as good as this number is small."""

    def __init__(self, pgid: int | None = None, interval: float = 1.0):
        import threading

        self.pgid = pgid
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ncpu = os.cpu_count() or 1

    def start(self) -> "CpuMonitor":
        self._thread.start()
        return self

    def _run(self) -> None:
        prev = _cpu_jiffies()
        prev_group = _tree_jiffies(self.pgid) if self.pgid else 0
        while not self._stop.wait(self.interval):
            cur = _cpu_jiffies()
            group = _tree_jiffies(self.pgid) if self.pgid else 0
            if prev and cur and cur[1] > prev[1]:
                busy = cur[0] - prev[0]
                mine = max(0, group - prev_group)  # both files count in USER_HZ ticks
                self.samples.append(max(0.0, min(1.0, (busy - mine) / (cur[1] - prev[1]))))
            prev, prev_group = cur, group

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self.samples:
            return {"foreign_cpu_share": None}
        return {"foreign_cpu_share": round(sum(self.samples) / len(self.samples), 3),
                "foreign_cpu_share_max": round(max(self.samples), 3)}


def foreign_busy(seconds: float = 2.0) -> float | None:
    """Share of the machine's CPU used (by anyone but this idle harness) over ``seconds``."""
    a = _cpu_jiffies()
    time.sleep(seconds)
    b = _cpu_jiffies()
    if not a or not b or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_idle(max_wait: float, threshold: float = 0.2, log: Callable[[str], None] = print) -> dict:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` of the CPU."""
    t0 = time.monotonic()
    busy = foreign_busy()
    first = busy
    while busy is not None and busy >= threshold and time.monotonic() - t0 < max_wait:
        busy = foreign_busy(5.0)
    waited = round(time.monotonic() - t0, 1)
    if first is not None and first >= threshold:
        log(f"(machine {100 * first:.0f}% busy; waited {waited:.0f}s, now {100 * (busy or 0):.0f}%)")
    return {"waited_s": waited, "busy_at_start": first, "busy_at_end": busy}


CONTENDED = 0.15  # foreign CPU share above which an area's figures are flagged


# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class Figure:
    """One reported number.

    ``value`` is the headline (the median ratio for paired figures); ``min``/``max`` its
    spread over the pairs; ``baseline`` says what B was; ``target`` is optional
    (``{"op": "<=" | ">=", "value": x}``); ``met`` is filled by :func:`evaluate`.
    """

    name: str
    value: float | None
    unit: str = ""
    min: float | None = None
    max: float | None = None
    n: int | None = None
    baseline: str = ""
    description: str = ""
    target: dict | None = None
    target_id: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_paired(cls, name: str, p: Paired, **kw) -> "Figure":
        return cls(name, p.ratio.median, kw.pop("unit", "ratio"), p.ratio.min, p.ratio.max, p.ratio.n, **kw)

    @classmethod
    def from_samples(cls, name: str, values: Sequence[float], **kw) -> "Figure":
        s = Summary.of(values)
        return cls(name, s.median, kw.pop("unit", ""), s.min, s.max, s.n, **kw)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v not in (None, "", {}) or k == "value"}


@dataclasses.dataclass(frozen=True)
class Target:
    id: str
    issue: int
    area: str
    keys: tuple[str, ...]  # figure names (or target_id) that measure it
    op: str  # "<=" or ">="
    value: float
    unit: str
    text: str
    gpu: bool = False


# The targets the issues set (issue number, area module, how the figure is named).
TARGETS: tuple[Target, ...] = (
    Target("operator.reconcile_time_ratio", 3, "operator_reconcile",
           ("time_to_all_children_ratio", "reconcile_ratio", "reconcile_time_ratio"),
           "<=", 2.0, "ratio", "operator: time to all children of 200 runs / no-op kopf handler"),
    Target("operator.reconcile_cost_ratio", 3, "operator_reconcile", ("per_run_cost_ratio", "reconcile_cost_ratio"),
           "<=", 2.0, "ratio", "operator: CPU cost per run / no-op kopf handler"),
    Target("operator.rss_1000_runs", 3, "operator_reconcile",
           ("rss_1000_runs_mib", "rss_at_1000_runs_mib"),
           "<=", 200.0, "MiB", "operator RSS with 1000 runs"),
    Target("trainer.step_overhead", 4, "trainer_overhead", ("step_time_ratio",),
           "<=", 1.05, "ratio", "trainer step time / bare fwd-bwd-AdamW loop (demo config)"),
    Target("trainer.data_wait_share", 4, "trainer_overhead", ("data_wait_share",),
           "<=", 0.02, "share", "data wait / step time"),
    Target("trainer.rss_growth", 4, "trainer_overhead", ("rss_growth_500_steps",),
           "<=", 0.05, "share", "RSS growth over 500 trainer steps"),
    Target("data.headroom", 4, "data_loader", ("loader_headroom",),
           ">=", 3.0, "ratio", "samples/s the data path delivers / samples/s the model consumes"),
    Target("checkpoint.async_blocking", 5, "checkpoint",
           ("async_blocking_ratio", "async_vs_sync_blocking_ratio", "async_save_blocking_ratio"),
           "<=", 0.1, "ratio", "training-blocking time of an async save / a sync save"),
    Target("checkpoint.upload_throughput", 5, "checkpoint",
           ("upload_throughput_ratio", "s3_upload_ratio", "upload_vs_boto3_ratio"),
           ">=", 0.8, "ratio", "checkpoint upload throughput to moto S3 / boto3 upload_file"),
    Target("checkpoint.recovery_worker_kill", 5, "checkpoint",
           ("recovery_seconds", "recovery_worker_kill_seconds", "worker_kill_recovery_seconds"),
           "<=", 30.0, "s", "worker SIGKILL -> first resumed step (CPU)"),
    Target("elastic.external_store_kill", 10, "elastic_recovery",
           ("external_store_kill_seconds", "kill_agent0_recovery_seconds", "recovery_external_store_seconds"),
           "<=", 20.0, "s", "agent SIGKILL -> first new step, external rendezvous store (CPU)"),
    Target("gpu.vlm_mfu", 4, "gpu", ("vlm_mfu",), ">=", 0.40, "share",
           "MFU, ~1B LLM + SigLIP-so400m VLM, bf16, FSDP2 + activation checkpointing, seq 2048, H100", gpu=True),
)


def met(op: str, value: float | None, threshold: float) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if op == "<=":
        return value <= threshold
    if op == ">=":
        return value >= threshold
    raise ValueError(f"unknown op {op!r}")


def normalize_area(result: Any) -> dict:
    """Coerce an area's return value into ``{"figures": [dict, ...], ...rest}``."""
    if not isinstance(result, dict):
        return {"figures": [], "raw": repr(result)}
    out = dict(result)
    figures = []
    for f in out.pop("figures", []) or []:
        if isinstance(f, Figure):
            f = f.as_dict()
        if isinstance(f, dict) and "name" in f:
            figures.append(dict(f))
    if not figures:  # a flat {name: number | {"value": ...}} result
        for key, val in list(out.items()):
            if isinstance(val, bool):
                continue
            if isinstance(val, (int, float)):
                figures.append({"name": key, "value": float(val)})
                out.pop(key)
            elif isinstance(val, dict) and isinstance(val.get("value"), (int, float)) and not isinstance(val.get("value"), bool):
                figures.append({"name": key, **val})
                out.pop(key)
    out["figures"] = figures
    return out


def evaluate(areas: dict[str, dict]) -> list[dict]:
    """The target table: one row per :data:`TARGETS` entry (measured or not), then one per
    figure that carries its own target and matches none of them."""
    rows = []
    used = set()
    for t in TARGETS:
        area = areas.get(t.area) or {}
        found = None
        for f in area.get("figures", []):
            if f.get("target_id") == t.id or f.get("name") in t.keys:
                found = f
                break
        row = {"target_id": t.id, "issue": t.issue, "area": t.area, "what": t.text, "op": t.op, "target": t.value,
               "unit": t.unit, "gpu": t.gpu, "contended": bool(area.get("contended"))}
        if found is not None:
            used.add((t.area, found["name"]))
            row.update(value=found.get("value"), min=found.get("min"), max=found.get("max"), figure=found["name"],
                       met=met(t.op, found.get("value"), t.value))
        else:
            row.update(value=None, met=None, status=area.get("status", "missing"), error=area.get("error"))
        rows.append(row)
    for name, area in areas.items():
        for f in area.get("figures", []):
            tgt = f.get("target")
            if not tgt or (name, f["name"]) in used:
                continue
            rows.append({"target_id": f"{name}.{f['name']}", "issue": tgt.get("issue"), "area": name,
                         "contended": bool(area.get("contended")),
                         "what": f.get("description") or f["name"], "op": tgt["op"], "target": tgt["value"],
                         "unit": f.get("unit", ""), "gpu": False, "value": f.get("value"), "min": f.get("min"),
                         "max": f.get("max"), "figure": f["name"], "met": met(tgt["op"], f.get("value"), tgt["value"])})
    return rows


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> dict:
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "short": commit[:10] if commit else None, "dirty": bool(dirty) if dirty is not None else None}


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_bytes": _mem_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:  # torch is optional for the harness itself (the operator image has none)
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        info["torch"] = None
    return info


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# --------------------------------------------------------------------------- formatting


def fmt(value: float | None, unit: str = "") -> str:
    """Three significant digits; shares as percentages."""
    if value is None:
        return "—"
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if unit == "share":
        return f"{100 * value:.3g}%"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def fmt_spread(row: dict) -> str:
    if row.get("min") is None or row.get("max") is None:
        return ""
    return f"{fmt(row['min'], row.get('unit', ''))} – {fmt(row['max'], row.get('unit', ''))}"


def status_word(row: dict) -> str:
    flag = " (contended: rerun)" if row.get("contended") else ""
    if row.get("met") is True:
        return "met" + flag
    if row.get("met") is False:
        return "**not met**" + flag
    if row.get("gpu"):
        return "not measured yet (needs a GPU)"
    status = row.get("status") or "missing"
    if status == "error":
        return "error (see JSON)"
    if status == "skipped":
        return "skipped"
    return "not measured yet"


def iter_figures(areas: dict[str, dict]) -> Iterable[tuple[str, dict]]:
    for name in areas:
        for f in areas[name].get("figures", []):
            yield name, f


# --------------------------------------------------------------------------- reports

README = REPO / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
GPU_COMMAND = "python -m benchmarks gpu"
GPU_TORCHRUN = "torchrun --nproc-per-node 1 -m benchmarks gpu"


def _area_command(area: str, rec: dict | None) -> str:
    if area == "gpu":
        return GPU_COMMAND
    return (rec or {}).get("command") or f"python -m benchmarks all --only {area}"


def _run_label(rec: dict | None) -> str:
    if not rec:
        return ""
    git = rec.get("git") or {}
    short = (git.get("short") or "")[:7]
    dirty = "+" if git.get("dirty") else ""
    return f"{rec.get('run_id', '')} {short}{dirty}".strip()


def targets_table(latest: dict) -> list[str]:
    areas = latest.get("areas", {})
    rows = evaluate(areas)
    lines = ["| issue | what | target | measured (median) | min – max | status | command |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = areas.get(r["area"])
        unit = r.get("unit", "")
        unit_s = "" if unit in ("ratio", "share") else f" {unit}"
        tgt = f"{r['op']} {fmt(r['target'], unit)}{unit_s}"
        val = fmt(r.get("value"), unit) + (unit_s if r.get("value") is not None else "")
        quick = " (quick)" if rec and rec.get("quick") and r.get("value") is not None else ""
        lines.append(f"| #{r['issue']} | {r['what']} | {tgt} | {val}{quick} | {fmt_spread(r)} | {status_word(r)} | "
                     f"`{_area_command(r['area'], rec)}` |")
    return lines


def figures_table(latest: dict) -> list[str]:
    lines = ["| area | figure | value | min – max | n | baseline / note |", "|---|---|---|---|---|---|"]
    for area, f in iter_figures(latest.get("areas", {})):
        unit = f.get("unit", "")
        unit_s = "" if unit in ("ratio", "share", "") else f" {unit}"
        note = f.get("baseline") or f.get("description") or ""
        lines.append(f"| {area} | {f['name']} | {fmt(f.get('value'), unit)}{unit_s} | {fmt_spread(f)} | "
                     f"{f.get('n') or ''} | {note} |")
    return lines


def areas_table(latest: dict) -> list[str]:
    lines = ["| area | status | time | CPU used by other processes | run (id, commit) | note |",
             "|---|---|---|---|---|---|"]
    for name, rec in latest.get("areas", {}).items():
        note = rec.get("error") or rec.get("message") or ""
        note = note.splitlines()[0][:160] if note else ""
        if rec.get("last_attempt"):
            la = rec["last_attempt"]
            why = "contended" if la.get("contended") else (la.get("error") or la.get("status"))
            note = f"kept over the later run {la.get('run_id')} ({why})"[:160]
        dur = rec.get("duration_s")
        other = (rec.get("contention") or {}).get("foreign_cpu_share")
        other_s = "" if other is None else f"{100 * other:.0f}%" + (" (contended)" if rec.get("contended") else "")
        lines.append(f"| {name} | {rec.get('status')}{' (quick)' if rec.get('quick') else ''} | "
                     f"{'' if dur is None else f'{dur:.0f} s'} | {other_s} | {_run_label(rec)} | {note} |")
    return lines


def gpu_table(latest: dict) -> list[str]:
    rec = latest.get("areas", {}).get("gpu") or {}
    configs = rec.get("configs") if rec.get("status") == "ok" else None
    lines = ["| configuration | params | tokens/s per GPU | MFU | step time | peak memory | device |",
             "|---|---|---|---|---|---|---|"]
    if not configs:
        why = "not measured yet"
        for label in ("VLM: ~1B Llama + SigLIP-so400m, bf16, FSDP2, act. ckpt, seq 2048",
                      "anchor: the same LLM text-only"):
            lines.append(f"| {label} | | {why} | | | | |")
        return lines
    for c in configs:
        lines.append(f"| {c.get('label', c.get('name'))} | {c.get('params_b', 0):.2f} B | "
                     f"{fmt(c.get('tokens_per_s_per_gpu'))} | {fmt(100 * c['mfu'], '') + '%' if c.get('mfu') is not None else '—'} | "
                     f"{fmt(c.get('step_s'))} s | {fmt(c.get('peak_memory_gib'))} GiB | {c.get('device', '')} |")
    return lines


def machine_line(latest: dict) -> str:
    m = latest.get("machine") or {}
    git = m.get("git") or {}
    return (f"{m.get('cpu_count')} x {m.get('cpu_model')}, {round((m.get('memory_bytes') or 0) / 2**30)} GiB, "
            f"torch {m.get('torch')}, python {m.get('python')}; commit {(git.get('short') or '?')[:7]}"
            f"{' (dirty)' if git.get('dirty') else ''}, {m.get('date')}")


def markdown(latest: dict, *, heading: str = "##") -> str:
    h = heading
    out = [f"_Generated by `python -m benchmarks all` — do not edit by hand. Machine: {machine_line(latest)}._", "",
           f"{h}# Targets", "", *targets_table(latest), "",
           "Each ratio pairs the measured thing with its baseline in the same process, alternating A B A B after "
           "warm-up; the value is the median ratio over the pairs, min – max is the spread over the pairs "
           "(method: `benchmarks/README.md`). \"contended\" marks an area during which other processes used "
           f"more than {100 * CONTENDED:.0f}% of the machine's CPU (see Areas): its figures are not trustworthy.", "",
           f"{h}# GPU (issue 8)", "", *gpu_table(latest), "",
           f"Command: `{GPU_COMMAND}` (or `{GPU_TORCHRUN}`) on a CUDA machine; no network needed. "
           "Then `python -m benchmarks merge <file>` folds its JSON in here. MPT-1B reports ~42% MFU text-only on H100; "
           "the goal for the VLM is >= 40%.", "",
           f"{h}# All figures", "", *figures_table(latest), "",
           f"{h}# Areas", "", *areas_table(latest), ""]
    return "\n".join(out)


def targets_text(latest: dict) -> str:
    rows = evaluate(latest.get("areas", {}))
    lines = []
    for r in rows:
        lines.append(f"  #{r['issue']:<2} {r['target_id']:34s} {fmt(r.get('value'), r.get('unit', '')):>10s} "
                     f"(target {r['op']} {fmt(r['target'], r.get('unit', ''))}) {status_word(r).replace('**', '')}")
    return "\n".join(lines)


def update_readme(latest: dict, path: Path = README) -> bool:
    """Replace the README text between the markers (appending a section when absent)."""
    text = path.read_text()
    body = markdown(latest, heading="##")
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        start = text.index(BEGIN)
        end = text.index(END) + len(END)
        new = text[:start] + block + text[end:]
    else:
        new = text.rstrip("\n") + "\n\n## Benchmarks\n\n" + block + "\n"
    if new != text:
        path.write_text(new)
        return True
    return False
