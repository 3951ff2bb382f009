"""Validation cost of the largest spec, and the operator's event-loop lag while such runs arrive (#21).

    python -m benchmarks area validation [--quick]
    python -m benchmarks.validation [--quick]        # prints the JSON

The spec is tests/support/hostile.py's `maximal_spec()`: every list at its maximum (64
sources, each `uri` and `validationUri` with the largest brace range the schema allows,
1,000,000 shards; 16 stages mixing all 64; 64 tolerations and node labels), both model
configs near their 64 KiB cap. Every sample validates a distinct copy (another seed), so
no cache helps.

Figures:
- `validation_worst_case_ms`: what the operator runs per spec generation
  (`core.check_spec`: bounds and credential scan, pydantic in strict mode, semantic checks;
  brace ranges counted, never expanded). Target (#21): <= 50 ms.
- `validation_worst_case_invalid_ms`: the same spec with one mistake (the last stage's
  mixture sums to 0.99): the layered path that phrases the error (schema layer too; CEL
  skipped past core.CEL_BUDGET).
- `validate_cli_worst_case_ms`: `vlmpretrain validate` on the same run as YAML (parse with
  limits, all four layers, CEL in cel-python): informational, a command, not the operator.
- `event_loop_lag_max_ms` / `event_loop_lag_p99_ms`: while `runs` such runs arrive at once
  and the operator validates them (reconcile._problems: off the loop, in a worker thread),
  how late a 1 ms timer on the loop fires; `event_loop_lag_inline_max_ms`: the same with
  validation on the loop, as before #21 (and with the old brace expansion, a million
  strings per URI, it was ~107 s per run).
"""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _specs(n: int, *, broken: bool = False) -> list[dict]:
    from tests.support.hostile import maximal_spec

    base = maximal_spec()
    out = []
    for i in range(n):
        spec = copy.deepcopy(base)
        spec["seed"] = i
        if broken:
            last = spec["stages"][-1]["mixture"]
            last[next(iter(last))] -= 0.01
        out.append(spec)
    return out


def _timed(fn, items) -> list[float]:
    samples = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


async def _lag_while(work, period: float = 0.001) -> tuple[list[float], float]:
    """Lateness (ms) of a `period` timer on this loop while `work()` runs (timers that
    fired after the work began); and the work's seconds."""
    lags: list[tuple[float, float]] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(period)
            t1 = time.perf_counter()
            lags.append((t1, max(0.0, (t1 - t0 - period) * 1000)))

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.02)  # the probe running before the runs arrive
    t0 = time.perf_counter()
    await work()
    took = time.perf_counter() - t0
    done.set()
    await task
    return [lag for t, lag in lags if t > t0], took


def _arrivals(n: int, inline: bool) -> tuple[list[float], float]:
    from vlm_operator import core, reconcile
    from vlm_operator.registry import RunState

    runs = [{"metadata": {"name": f"maximal-{i}", "namespace": "bench", "uid": f"u{i}", "generation": 1}, "spec": spec}
            for i, spec in enumerate(_specs(n))]

    async def threaded() -> None:
        results = await asyncio.gather(*(reconcile._problems(RunState("bench", r["metadata"]["name"]), r) for r in runs))
        assert all(not p for p in results), results

    async def on_loop() -> None:
        for r in runs:
            assert not core.check_spec(r["spec"], name=r["metadata"]["name"])
            await asyncio.sleep(0)  # one run per loop turn, as events arrive

    async def measure() -> tuple[list[float], float]:
        warm = runs[0]  # imports and first-call costs, outside the measurement
        await reconcile._problems(RunState("bench", "warm-up"), {**warm, "metadata": {**warm["metadata"], "generation": 0}})
        return await _lag_while(on_loop if inline else threaded)

    return asyncio.run(measure())


def run(quick: bool = False) -> dict:
    from benchmarks import harness
    from tests.support.hostile import maximal_manifest
    from vlm_api import validate
    from vlm_operator import core

    repeats = 8 if quick else 30
    runs = 5 if quick else 20
    rounds = 2 if quick else 5
    foreign = harness.ForeignCpu().start()

    check = _timed(lambda spec: core.check_spec(spec, name="maximal-run"), _specs(repeats))
    assert not core.check_spec(_specs(1)[0], name="maximal-run")
    broken_specs = _specs(max(3, repeats // 3), broken=True)
    assert core.check_spec(broken_specs[0], name="maximal-run")
    invalid = _timed(lambda spec: core.check_spec(spec, name="maximal-run"), broken_specs)
    import yaml

    text = yaml.safe_dump(maximal_manifest(), sort_keys=False)
    assert not validate.validate_text(text)
    cli = _timed(validate.validate_text, [text] * (2 if quick else 5))
    threaded = [_arrivals(runs, inline=False) for _ in range(rounds)]
    inline = [_arrivals(runs, inline=True) for _ in range(rounds)]
    lags = [lag for round_lags, _ in threaded for lag in round_lags]
    busy = foreign.stop()

    def p99(values: list[float]) -> float:
        return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))] if values else float("nan")

    F = harness.Figure
    figures = [
        F.from_samples("validation_worst_case_ms", check, unit="ms", target_id="api.validation_worst_case",
                       target={"op": "<=", "value": 50.0},
                       description="operator validation (core.check_spec) of the maximal valid spec: 64 sources x "
                                   "2 URIs of 1,000,000 shards, 16 stages mixing all 64, 64 KiB model configs"),
        F.from_samples("validation_worst_case_invalid_ms", invalid, unit="ms",
                       description="the same spec with one mistake (layered path that phrases it; CEL skipped)"),
        F.from_samples("validate_cli_worst_case_ms", cli, unit="ms",
                       description="vlmpretrain validate of the maximal run as YAML (all layers, CEL in cel-python)"),
        F.from_samples("event_loop_lag_max_ms", [max(lg) for lg, _ in threaded], unit="ms",
                       description=f"latest a 1 ms timer on the loop fired while {runs} maximal runs arrived at once "
                                   f"and were validated off the loop (reconcile._problems), per round"),
        F("event_loop_lag_p99_ms", p99(lags), "ms", n=len(lags), description="p99 over all rounds of the same"),
        F.from_samples("event_loop_lag_inline_max_ms", [max(lg) for lg, _ in inline], unit="ms",
                       description="the same with validation on the loop, one run per loop turn (as before #21)"),
        F.from_samples("arrivals_validated_seconds", [took for _, took in threaded], unit="s",
                       description=f"time until all {runs} arriving maximal runs were validated (off the loop)"),
    ]
    return {"status": "ok", "contended": bool(busy is not None and busy > harness.CONTENDED),
            "figures": [f.as_dict() for f in figures],
            "params": {"repeats": repeats, "runs": runs, "rounds": rounds, "spec_bytes": len(text), "foreign_cpu_share": busy,
                       "shards_per_uri": 1_000_000, "sources": 64, "stages": 16,
                       "median_lag_ms": statistics.median(lags) if lags else None}}


if __name__ == "__main__":
    result = run(quick="--quick" in sys.argv)
    print(json.dumps(result, indent=2, default=str))
