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

Uncertainty: every figure summarised from samples carries ``ci95``, a percentile bootstrap
95% confidence interval of its median (:func:`bootstrap_ci`), and every target a verdict
(:func:`verdict`): ``met`` when the whole interval is on the target's side, ``not met``
when the whole interval is on the other side, ``inconclusive`` when it straddles the
target. A figure from one measurement has no interval; its verdict says so.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import psutil

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "vlm-bench/2"  # 2: ci95, verdicts, per-area git, own-tree contention (a /1 latest.json is not merged)


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


CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CI_METHOD = (f"percentile bootstrap of the median ({BOOTSTRAP_RESAMPLES:,} resamples with replacement, "
             f"numpy default_rng seed {BOOTSTRAP_SEED})")


def bootstrap_ci(values: Sequence[float], *, level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the median of ``values``.

    Draws ``resamples`` samples of the same size with replacement, takes each one's median
    and returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those medians.
    Deterministic for a seed (the same samples always give the same interval). ``None``
    for fewer than two finite values: one measurement has no interval. With very few
    samples the interval is close to min - max (n = 3: exactly min - max, which holds the
    true median only ~75% of the time); the sample count is reported next to it.
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(vals) < 2:
        return None
    import numpy as np

    x = np.asarray(vals, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    medians = np.median(x[idx], axis=1)
    lo, hi = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


VERDICTS = ("met", "not met", "inconclusive")


def verdict(op: str, threshold: float, value: float | None, ci: Sequence[float] | None) -> str | None:
    """``met`` / ``not met`` / ``inconclusive`` for a target ``value op threshold``.

    With an interval: met when all of it satisfies the target, not met when none of it
    does, inconclusive when it straddles the threshold. Without one (a single
    measurement) the value decides. ``None`` when nothing was measured."""
    if op not in ("<=", ">="):
        raise ValueError(f"unknown op {op!r}")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    ok = (lambda v: v <= threshold) if op == "<=" else (lambda v: v >= threshold)
    if ci is None:
        return "met" if ok(value) else "not met"
    lo, hi = float(ci[0]), float(ci[1])
    if ok(lo) and ok(hi):
        return "met"
    if not ok(lo) and not ok(hi):
        return "not met"
    return "inconclusive"


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
    :meth:`stop`: machine busy time minus the CPU time of this process's tree
    (:func:`tree_cpu_seconds`: its threads, every live descendant such as the trainer's
    data worker or a moto server, and the children they reaped), over all cores."""

    def __init__(self, pid: int | None = None):
        self.pid = pid
        self._m = None
        self._own = 0.0

    def start(self) -> "ForeignCpu":
        self._m = _machine_cpu_seconds()
        self._own = tree_cpu_seconds(self.pid)
        return self

    def stop(self) -> float | None:
        end = _machine_cpu_seconds()
        own = tree_cpu_seconds(self.pid) - self._own
        if end[1] <= self._m[1]:
            return None
        busy = (end[0] - self._m[0]) - own
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
    ratios: list[float] = dataclasses.field(default_factory=list)  # A/B of the rounds used

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "ratio": dataclasses.asdict(self.ratio), "ratios_used": self.ratios,
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
    at least ``min_clean`` rounds were (else over all of them, flagged ``contended``). The
    process's own descendants (helper servers, data workers) count as its own CPU, not as
    foreign (:class:`ForeignCpu`).
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
                  contended, r)


def recovery_seconds(events: Sequence[dict], t_kill: float) -> float:
    """Seconds from a fault at ``t_kill`` to the first step of the group that started
    after it, from a trainer progress file's events (``{"event", "time", ...}``).

    The restarted group is the first ``start`` event later than the fault; the figure
    ends at the first ``step`` event later than that start. A step the old group logged
    just after the kill (it was finishing when the signal came) does not count."""
    starts = [e["time"] for e in events if e.get("event") == "start" and e["time"] > t_kill]
    if not starts:
        raise ValueError("no start event after the fault: the group did not restart")
    restarted = min(starts)
    steps = [e["time"] for e in events if e.get("event") == "step" and e["time"] > restarted]
    if not steps:
        raise ValueError("no step after the restart")
    return min(steps) - t_kill


def rss_bytes() -> int:
    """Resident set size of this process."""
    return psutil.Process().memory_info().rss


def tree_pss_bytes() -> int:
    """Proportional set size of this process and its live children (e.g. the trainer's
    forked data worker): shared copy-on-write pages counted once. Falls back to RSS."""
    def pss(pid: int) -> int:
        try:
            return getattr(psutil.Process(pid).memory_full_info(), "pss", 0)  # Linux only
        except psutil.Error:
            return 0

    own = pss(os.getpid())
    if not own:
        return rss_bytes()
    return own + sum(pss(pid) for pid in _process_tree(os.getpid())[1:])


# --------------------------------------------------------------------------- contention

def _machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores."""
    t = psutil.cpu_times()
    # guest time is counted in user/nice already; iowait is idle
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total - t.idle - getattr(t, "iowait", 0.0), total


def _tree(pid: int | None = None) -> list:
    """psutil.Process of ``pid`` (default: this process) and all its live descendants,
    found by parent pid, so helpers that start their own session or process group
    (torchrun workers, moto and emulator servers) are included. Empty if it is gone."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def _process_tree(root: int) -> list[int]:
    """root and the pids of all its live descendants."""
    return [p.pid for p in _tree(root)]


def tree_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) of a process tree: the process (all its threads), each
    live descendant, and the children each of them reaped (``children_user/system``).
    A descendant that exits moves its time into its parent's reaped-children time when
    reaped, so a difference of two readings stays right while helpers come and go."""
    total = 0.0
    for proc in _tree(pid):
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
    return total


class CpuMonitor:
    """Measures how much CPU *other* processes used while an area ran: machine busy time
    minus the area's process tree (its pid and every live descendant, psutil), as a share
    of all cores. Benchmarks on a shared machine are only as good as this number is small."""

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
        prev = _machine_cpu_seconds()
        prev_group = tree_cpu_seconds(self.pgid) if self.pgid else 0.0
        while not self._stop.wait(self.interval):
            cur = _machine_cpu_seconds()
            group = tree_cpu_seconds(self.pgid) if self.pgid else 0.0
            if cur[1] > prev[1]:
                busy = cur[0] - prev[0]
                mine = max(0.0, group - prev_group)
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
    a = _machine_cpu_seconds()
    time.sleep(seconds)
    b = _machine_cpu_seconds()
    if b[1] <= a[1]:
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

    ``value`` is the headline (the median ratio for paired figures, the median of the
    samples otherwise); ``min``/``max`` the spread of the samples; ``ci95`` the bootstrap
    95% interval of the median (:func:`bootstrap_ci`; absent for a single measurement),
    ``samples`` the values it was computed from; ``baseline`` says what B was; ``target``
    is optional (``{"op": "<=" | ">=", "value": x}``); the verdict is filled by
    :func:`evaluate`.
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
    ci95: list[float] | None = None
    ci_method: str | None = None
    samples: list[float] | None = None

    @classmethod
    def from_paired(cls, name: str, p: Paired, **kw) -> "Figure":
        return cls.from_samples(name, p.ratios, unit=kw.pop("unit", "ratio"), **kw)

    @classmethod
    def from_samples(cls, name: str, values: Sequence[float], **kw) -> "Figure":
        vals = [float(v) for v in values]
        s = Summary.of(vals)
        ci = bootstrap_ci(vals)
        return cls(name, s.median, kw.pop("unit", ""), s.min, s.max, s.n, **kw,
                   ci95=None if ci is None else [ci[0], ci[1]], ci_method=None if ci is None else CI_METHOD,
                   samples=vals)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v not in (None, "", {}) or k == "value"}


@dataclasses.dataclass(frozen=True)
class Target:
    id: str
    issue: int
    area: str | None  # the area module that measures it (None: any area may)
    keys: tuple[str, ...]  # figure names (or target_id) that measure it
    op: str  # "<=" or ">="
    value: float
    unit: str
    text: str
    gpu: bool = False
    pending: str | None = None  # why nothing measures it yet (e.g. "needs #18"); shown until a figure exists


# The targets the issues set (issue number, area module, how the figure is named).
TARGETS: tuple[Target, ...] = (
    # #3: kopf's own handling of an event is the floor of any kopf operator; #3 showed that the
    # API traffic #3 requires already costs ~2.5x a no-op handler, so the no-op ratios are
    # reported without a target and the operator is held to the floor of its own API writes.
    Target("operator.cpu_vs_same_writes", 3, "operator_reconcile", ("cpu_vs_same_writes_ratio",),
           "<=", 1.5, "ratio", "operator CPU per run / a kopf handler making only the same API writes"),
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
           "<=", 0.02, "ratio", "training-blocking time of an async save / a sync save"),
    Target("checkpoint.upload_throughput", 5, "checkpoint",
           ("upload_throughput_ratio", "s3_upload_ratio", "upload_vs_boto3_ratio"),
           ">=", 0.8, "ratio", "checkpoint upload throughput to moto S3 / boto3 upload_file"),
    Target("checkpoint.recovery_worker_kill", 5, "checkpoint",
           ("recovery_seconds", "recovery_worker_kill_seconds", "worker_kill_recovery_seconds"),
           "<=", 30.0, "s", "worker SIGKILL -> first resumed step (CPU)"),
    Target("elastic.external_store_kill", 10, "elastic_recovery",
           ("external_store_kill_seconds", "kill_agent0_recovery_seconds", "recovery_external_store_seconds"),
           "<=", 20.0, "s", "agent SIGKILL -> first new step, external rendezvous store (CPU)"),
    Target("api.validation_worst_case", 21, None, ("validation_worst_case_ms",),
           "<=", 50.0, "ms", "validation of a maximal valid spec (64 sources, largest brace ranges), worst case",
           pending="needs #21"),
    Target("data.tokens_trained_vs_stated", 18, None, ("tokens_trained_vs_stated",),
           ">=", 0.99, "ratio", "real tokens a stage trains / the tokens its recipe states",
           pending="needs #18"),
    Target("data.padding_share", 18, None, ("padding_share",),
           "<=", 0.03, "share", "padding / sequence positions on the demo mixture", pending="needs #18"),
    Target("gpu.vlm_mfu", 4, "gpu", ("vlm_mfu",), ">=", 0.40, "share",
           "MFU on real (non-padding) tokens, ~1B LLM + SigLIP-so400m VLM, bf16, FSDP2 + act. ckpt, seq 2048, H100",
           gpu=True),
)


def met(op: str, value: float | None, threshold: float) -> bool | None:
    """Whether a single value satisfies ``op threshold`` (``None`` if there is no value)."""
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


def _verdict_fields(op: str, threshold: float, f: dict) -> dict:
    ci = f.get("ci95")
    v = verdict(op, threshold, f.get("value"), ci)
    basis = ("95% CI of the median" if ci is not None else
             "single measurement (no interval)" if v is not None else None)
    return {"value": f.get("value"), "min": f.get("min"), "max": f.get("max"), "n": f.get("n"), "ci95": ci,
            "ci_method": f.get("ci_method"), "figure": f["name"], "verdict": v, "verdict_basis": basis}


def _provenance(area: dict) -> dict:
    git = area.get("git") or {}
    return {"run_id": area.get("run_id"), "commit": git.get("commit"), "dirty": git.get("dirty")}


def evaluate(areas: dict[str, dict]) -> list[dict]:
    """The target table: one row per :data:`TARGETS` entry (measured or not), then one per
    figure that carries its own target and matches none of them. Each row has ``value``,
    ``ci95``, ``verdict`` (met / not met / inconclusive, or None when not measured) and
    the run and commit of the area that measured it."""
    rows = []
    used = set()
    for t in TARGETS:
        found = None
        where = [t.area] if t.area else list(areas)
        for name in where:
            for f in (areas.get(name) or {}).get("figures", []):
                if f.get("target_id") == t.id or f.get("name") in t.keys:
                    found = (name, f)
                    break
            if found:
                break
        area_name = found[0] if found else t.area
        area = areas.get(area_name) or {} if area_name else {}
        row = {"target_id": t.id, "issue": t.issue, "area": area_name, "what": t.text, "op": t.op, "target": t.value,
               "unit": t.unit, "gpu": t.gpu, "contended": bool(area.get("contended")), **_provenance(area)}
        if found is not None:
            used.add((found[0], found[1]["name"]))
            row.update(_verdict_fields(t.op, t.value, found[1]))
        else:
            row.update(value=None, ci95=None, verdict=None, status="pending" if t.pending else area.get("status", "missing"),
                       pending=t.pending, error=area.get("error"))
        rows.append(row)
    for name, area in areas.items():
        for f in area.get("figures", []):
            tgt = f.get("target")
            if not tgt or (name, f["name"]) in used:
                continue
            rows.append({"target_id": f"{name}.{f['name']}", "issue": tgt.get("issue"), "area": name,
                         "contended": bool(area.get("contended")), **_provenance(area),
                         "what": f.get("description") or f["name"], "op": tgt["op"], "target": tgt["value"],
                         "unit": f.get("unit", ""), "gpu": False, **_verdict_fields(tgt["op"], tgt["value"], f)})
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
    """HEAD, and whether tracked files differ from it (``dirty``; ``dirty_paths`` names
    them): figures from a dirty tree were made with code no commit holds."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    # "XY path" per line; _git strips the output, and with it the first line's leading space
    paths = [line[2:].strip() for line in status.splitlines() if line.strip()] if status else []
    return {"commit": commit, "short": commit[:10] if commit else None,
            "dirty": bool(paths) if status is not None else None, "dirty_paths": paths[:50]}


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


def _mem_total() -> int:
    return psutil.virtual_memory().total


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


def _unit_suffix(unit: str) -> str:
    return "" if unit in ("ratio", "share", "") else f" {unit}"


def fmt_spread(row: dict) -> str:
    if row.get("min") is None or row.get("max") is None:
        return ""
    return f"{fmt(row['min'], row.get('unit', ''))} – {fmt(row['max'], row.get('unit', ''))}"


def fmt_ci(row: dict) -> str:
    ci = row.get("ci95")
    if not ci:
        return "one measurement" if row.get("value") is not None else ""
    unit = row.get("unit", "")
    return f"{fmt(ci[0], unit)} – {fmt(ci[1], unit)}"


def status_word(row: dict) -> str:
    flag = " (contended: rerun)" if row.get("contended") else ""
    v = row.get("verdict")
    if v is not None:
        word = {"met": "met", "not met": "**not met**", "inconclusive": "*inconclusive*"}[v]
        if (row.get("verdict_basis") or "").startswith("single"):
            word += " (1 measurement)"
        return word + flag
    if row.get("pending"):
        return f"pending: {row['pending']}"
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
FIGURE_DOCS = (REPO / "README.md", REPO / "docs" / "scaling.md")  # prose that quotes latest.json
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
GPU_COMMAND = "python -m benchmarks gpu"
GPU_TORCHRUN = "torchrun --nproc-per-node 1 -m benchmarks gpu"


def _area_command(area: str | None, rec: dict | None) -> str:
    if area == "gpu":
        return GPU_COMMAND
    if area is None:
        return ""
    return (rec or {}).get("command") or f"python -m benchmarks all --only {area}"


def _commit_label(rec: dict | None) -> str:
    git = (rec or {}).get("git") or {}
    short = (git.get("short") or git.get("commit") or "")[:7]
    if not short:
        return ""
    if git.get("dirty"):
        n = len(git.get("dirty_paths") or [])
        return f"{short} + uncommitted changes" + (f" ({n} file{'s' if n != 1 else ''})" if n else "")
    return short


def _run_label(rec: dict | None) -> str:
    if not rec:
        return ""
    return f"{rec.get('run_id', '')} {_commit_label(rec)}".strip()


def targets_table(latest: dict) -> list[str]:
    areas = latest.get("areas", {})
    rows = evaluate(areas)
    lines = ["| issue | what | target | measured (median) | 95% CI of the median | n | verdict | run, commit | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = areas.get(r["area"]) if r.get("area") else None
        unit = r.get("unit", "")
        unit_s = _unit_suffix(unit)
        tgt = f"{r['op']} {fmt(r['target'], unit)}{unit_s}"
        val = fmt(r.get("value"), unit) + (unit_s if r.get("value") is not None else "")
        quick = " (quick)" if rec and rec.get("quick") and r.get("value") is not None else ""
        run = _run_label(rec) if r.get("value") is not None else ""
        lines.append(f"| #{r['issue']} | {r['what']} | {tgt} | {val}{quick} | {fmt_ci(r)} | {r.get('n') or ''} | "
                     f"{status_word(r)} | {run} | " + (f"`{_area_command(r['area'], rec)}`" if r.get("area") else "") + " |")
    return lines


def figures_table(latest: dict) -> list[str]:
    lines = ["| area | figure | value | 95% CI of the median | min – max | n | baseline / note |",
             "|---|---|---|---|---|---|---|"]
    for area, f in iter_figures(latest.get("areas", {})):
        unit = f.get("unit", "")
        note = f.get("baseline") or f.get("description") or ""
        ci = fmt_ci(f) if f.get("ci95") else ""
        lines.append(f"| {area} | {f['name']} | {fmt(f.get('value'), unit)}{_unit_suffix(unit)} | {ci} | {fmt_spread(f)} | "
                     f"{f.get('n') or ''} | {note} |")
    return lines


def areas_table(latest: dict) -> list[str]:
    lines = ["| area | status | time | CPU used by other processes | run | commit | note |",
             "|---|---|---|---|---|---|---|"]
    for name, rec in latest.get("areas", {}).items():
        note = rec.get("error") or rec.get("message") or ""
        note = note.splitlines()[0][:160] if note else ""
        if rec.get("last_attempt"):
            la = rec["last_attempt"]
            why = "contended" if la.get("contended") else (la.get("error") or la.get("status"))
            note = f"kept over the later run {la.get('run_id')} ({why})"[:160]
        dur = rec.get("duration_s")
        cont = rec.get("contention") or {}
        other = cont.get("foreign_cpu_share")
        other_s = "" if other is None else f"{100 * other:.0f}%"
        if other is not None and cont.get("foreign_cpu_share_max") is not None:
            other_s += f" (max {100 * cont['foreign_cpu_share_max']:.0f}%)"
        if rec.get("contended"):
            other_s += " **contended**"
        elif cont.get("area_verdict") == "clean pairs only":
            other_s += "; pairs above 15% left out"
        lines.append(f"| {name} | {rec.get('status')}{' (quick)' if rec.get('quick') else ''} | "
                     f"{'' if dur is None else f'{dur:.0f} s'} | {other_s} | {rec.get('run_id', '')} | "
                     f"{_commit_label(rec)} | {note} |")
    return lines


def gpu_table(latest: dict) -> list[str]:
    rec = latest.get("areas", {}).get("gpu") or {}
    configs = rec.get("configs") if rec.get("status") == "ok" else None
    lines = ["| configuration | params | real tokens/s per GPU | MFU, real tokens | MFU, dense (padded shape) | padding | "
             "step time | peak memory | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    if not configs:
        why = "not measured yet"
        for label in ("VLM: ~1B Llama + SigLIP-so400m, bf16, FSDP2, act. ckpt, seq 2048",
                      "anchor: the same LLM text-only"):
            lines.append(f"| {label} | | {why} | | | | | | |")
        return lines

    def pct(x):
        return "—" if x is None else fmt(x, "share")

    for c in configs:
        lines.append(f"| {c.get('label', c.get('name'))} | {c.get('params_b', 0):.2f} B | "
                     f"{fmt(c.get('real_tokens_per_s_per_gpu'))} | {pct(c.get('mfu'))} | {pct(c.get('mfu_dense'))} | "
                     f"{pct(c.get('padding_share'))} | {fmt(c.get('step_s'))} s | {fmt(c.get('peak_memory_gib'))} GiB | "
                     f"{c.get('device', '')} |")
    return lines


def machine_line(latest: dict) -> str:
    m = latest.get("machine") or {}
    return (f"{m.get('cpu_count')} x {m.get('cpu_model')}, {round((m.get('memory_bytes') or 0) / 2**30)} GiB, "
            f"torch {m.get('torch')}, python {m.get('python')}")


def markdown(latest: dict, *, heading: str = "##") -> str:
    h = heading
    runs = sorted({rec.get("run_id") for rec in latest.get("areas", {}).values() if rec.get("run_id")})
    out = [f"_Generated from `benchmarks/results/latest.json` by `python -m benchmarks all` (or `readme`) — do not edit "
           f"by hand. The figures come from {len(runs)} run{'s' if len(runs) != 1 else ''}: each row names its run and "
           f"commit (\"+ uncommitted changes\": the tree differed from that commit; `latest.json` lists the files). "
           f"Machine: {machine_line(latest)}._", "",
           f"{h}# Targets", "", *targets_table(latest), "",
           "Each ratio pairs the measured thing with its baseline in the same process, alternating A B A B after "
           "warm-up; the value is the median ratio over the pairs and the interval a 95% confidence interval of that "
           f"median ({CI_METHOD}). Verdict: **met** when the whole interval meets the target, **not met** when none of "
           "it does, *inconclusive* when it straddles the target (the data cannot tell); with n = 3 the interval is the "
           "min – max of the three. \"contended\" marks an area during which other processes (everything outside the "
           f"area's own process tree) used more than {100 * CONTENDED:.0f}% of the machine's CPU: its figures are not "
           "trustworthy (method: `benchmarks/README.md`).", "",
           f"{h}# GPU (issue 8)", "", *gpu_table(latest), "",
           f"Command: `{GPU_COMMAND}` (or `{GPU_TORCHRUN}`) on a CUDA machine; no network needed. "
           "Then `python -m benchmarks merge <file>` folds its JSON in here. MFU on real tokens counts the model FLOPs "
           "of the non-padding positions only; the dense figure counts the padded batch shape the GPU computed. "
           "MPT-1B reports ~42% MFU text-only (packed, dense) on H100; the goal for the VLM is >= 40% on real tokens.", "",
           f"{h}# All figures", "", *figures_table(latest), "",
           f"{h}# Areas", "", *areas_table(latest), ""]
    return "\n".join(out)


def targets_text(latest: dict) -> str:
    rows = evaluate(latest.get("areas", {}))
    lines = []
    for r in rows:
        ci = f" [{fmt_ci(r)}]" if r.get("ci95") else ""
        lines.append(f"  #{r['issue']:<2} {r['target_id']:34s} {fmt(r.get('value'), r.get('unit', '')):>10s}{ci} "
                     f"(target {r['op']} {fmt(r['target'], r.get('unit', ''))}) {status_word(r).replace('**', '').replace('*', '')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures quoted in prose
#
# README and docs/scaling.md quote figures inline as
#     <!--fig:AREA.FIGURE[.FIELD][|FORMAT]-->text<!--/fig-->
# and `python -m benchmarks all | merge | readme` rewrites `text` from latest.json (a test
# checks that every quoted figure matches). FIELD: value (default), ci, range, min, max, n,
# ci_lo, ci_hi, extra.KEY[.KEY...]; AREA.run and AREA.commit name the area's run and commit;
# derived.NAME is arithmetic on figures (:data:`DERIVED`).
# FORMAT: "x" (a ratio written 2.5x), "%" (a share), "raw" (the number alone), or a unit
# written after the number ("ms", "MiB"); default: the figure's own unit.

FIG_RE = re.compile(r"<!--fig:([^>]+?)-->(.*?)<!--/fig-->", re.S)


class FigureRefError(KeyError):
    pass


def _find_figure(latest: dict, area: str, name: str) -> dict:
    for f in (latest.get("areas", {}).get(area) or {}).get("figures", []):
        if f.get("name") == name:
            return f
    raise FigureRefError(f"{area}.{name}: no such figure in latest.json")


def _fmt_as(value, unit: str, form: str | None) -> str:
    if value is None:
        raise FigureRefError("no value")
    if form == "x":
        return f"{fmt(value)}x"
    if form == "%":
        return fmt(value, "share")
    if form == "raw":
        return fmt(value)
    if form:
        return f"{fmt(value)} {form}"
    return fmt(value, unit) + _unit_suffix(unit)


def _fv(latest: dict, area: str, name: str, *path: str) -> float:
    node = _find_figure(latest, area, name)
    for k in path or ("value",):
        if not isinstance(node, dict) or k not in node:
            raise FigureRefError(f"{area}.{name}: no {'.'.join(path)}")
        node = node[k]
    return float(node)


def _rss_per_run_mib(latest: dict) -> float:
    rss = _fv(latest, "operator_reconcile", "rss_1000_runs_mib")
    return (rss - _fv(latest, "operator_reconcile", "rss_1000_runs_mib", "extra", "idle_rss_mib")) / 1000


def _series(latest: dict, key: str = "value") -> float:
    if key == "value":
        return _fv(latest, "trainer_overhead", "prometheus_series_per_run")
    return _fv(latest, "trainer_overhead", "prometheus_series_per_run", "extra", key)


# Arithmetic on measured figures that the docs quote (``<!--fig:derived.NAME-->``): the
# formula lives here, next to the figures it uses, not in someone's head.
DERIVED: dict[str, tuple[Callable[[dict], float], str]] = {
    "operator_rss_per_run_kib": (lambda L: 1024 * _rss_per_run_mib(L), "KiB"),
    "operator_rss_2000_runs_mib": (lambda L: _fv(L, "operator_reconcile", "rss_1000_runs_mib", "extra", "idle_rss_mib")
                                   + 2000 * _rss_per_run_mib(L), "MiB"),
    "operator_rss_5000_runs_mib": (lambda L: _fv(L, "operator_reconcile", "rss_1000_runs_mib", "extra", "idle_rss_mib")
                                   + 5000 * _rss_per_run_mib(L), "MiB"),
    "operator_runs_at_200_mib": (lambda L: (200 - _fv(L, "operator_reconcile", "rss_1000_runs_mib", "extra",
                                                       "idle_rss_mib")) / _rss_per_run_mib(L), "runs"),
    "operator_cpu_s_1000_runs": (lambda L: _fv(L, "operator_reconcile", "cpu_ms_per_run"), "s"),  # ms/run x 1000 runs
    "series_1000_runs_1_node": (lambda L: 1000 * (_series(L) + 5), "series"),
    "series_1000_runs_64_nodes": (lambda L: 1000 * (_series(L) + 5 * 64 + 63), "series"),
    "created_series_per_run": (lambda L: _series(L) - _series(L, "series_without_created"), "series"),
    "created_series_share": (lambda L: 1 - _series(L, "series_without_created") / _series(L), "share"),
    "histogram_series_share": (lambda L: _series(L, "histogram_series") / _series(L), "share"),
}


def figure_ref(latest: dict, key: str) -> str:
    """The text a ``<!--fig:KEY-->`` reference stands for (see above)."""
    key, _, form = key.strip().partition("|")
    form = form or None
    parts = key.split(".")
    if len(parts) < 2:
        raise FigureRefError(f"{key}: AREA.FIGURE expected")
    area = parts[0]
    if area == "derived":
        if parts[1] not in DERIVED:
            raise FigureRefError(f"{key}: no such derived figure")
        fn, unit = DERIVED[parts[1]]
        try:
            return _fmt_as(fn(latest), unit, form)
        except (ZeroDivisionError, TypeError, ValueError) as exc:
            raise FigureRefError(f"{key}: {exc}") from exc
    rec = latest.get("areas", {}).get(area)
    if rec is None:
        raise FigureRefError(f"{area}: no such area in latest.json")
    if parts[1] == "run" and len(parts) == 2:
        return str(rec.get("run_id"))
    if parts[1] == "commit" and len(parts) == 2:
        return _commit_label(rec)
    f = _find_figure(latest, area, parts[1])
    unit = f.get("unit", "")
    field = parts[2] if len(parts) > 2 else "value"
    if field == "value":
        return _fmt_as(f.get("value"), unit, form)
    if field in ("min", "max"):
        return _fmt_as(f.get(field), unit, form)
    if field == "n":
        return str(f.get("n"))
    if field in ("ci", "range"):
        lo, hi = (f.get("ci95") or [None, None]) if field == "ci" else (f.get("min"), f.get("max"))
        if lo is None:
            raise FigureRefError(f"{key}: no {field}")
        a, b = _fmt_as(lo, unit, "raw" if form is None else form), _fmt_as(hi, unit, form)
        if form is None:
            b = _fmt_as(hi, unit, None)
        return f"{a}–{b}"
    if field in ("ci_lo", "ci_hi"):
        ci = f.get("ci95") or [None, None]
        return _fmt_as(ci[0 if field == "ci_lo" else 1], unit, form)
    if field == "extra":
        node = f.get("extra") or {}
        for k in parts[3:]:
            if not isinstance(node, dict) or k not in node:
                raise FigureRefError(f"{key}: no extra {k}")
            node = node[k]
        return _fmt_as(node, "", form)
    raise FigureRefError(f"{key}: unknown field {field}")


def render_figure_refs(text: str, latest: dict) -> tuple[str, list[str]]:
    """``text`` with every figure reference rewritten from ``latest``; and the references
    that could not be resolved (left as they were)."""
    bad: list[str] = []

    def sub(m: re.Match) -> str:
        try:
            return f"<!--fig:{m.group(1)}-->{figure_ref(latest, m.group(1))}<!--/fig-->"
        except FigureRefError as exc:
            bad.append(f"{m.group(1)}: {exc}")
            return m.group(0)

    return FIG_RE.sub(sub, text), bad


def update_readme(latest: dict, path: Path = README) -> bool:
    """Replace the README text between the markers (appending a section when absent) and
    rewrite the figures quoted elsewhere in it."""
    text = path.read_text()
    body = markdown(latest, heading="##")
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        start = text.index(BEGIN)
        end = text.index(END) + len(END)
        new = text[:start] + block + text[end:]
    else:
        new = text.rstrip("\n") + "\n\n## Benchmarks\n\n" + block + "\n"
    new, _ = render_figure_refs(new, latest)
    if new != text:
        path.write_text(new)
        return True
    return False


def update_docs(latest: dict, paths: Iterable[Path] = FIGURE_DOCS[1:]) -> list[str]:
    """Rewrite the quoted figures of the docs; returns the unresolved references."""
    bad = []
    for path in paths:
        text = path.read_text()
        new, missing = render_figure_refs(text, latest)
        bad += [f"{path.name}: {m}" for m in missing]
        if new != text:
            path.write_text(new)
    return bad
