"""Pure sweep decisions: from a VLMPretrainSweep and its child runs, what to do and what to say.

`plan()` decides which child runs to create (the next ones in grid order while fewer than
`maxConcurrent` are active), which to suspend or resume, and the sweep's status: every
point mirrored from its run, `best` once every run has finished. `vlm_operator/sweep.py`
carries the decisions out. Names are deterministic (`vlm_api.sweep_grid.run_name`), so a
decision repeated after a restart finds its runs (409) instead of duplicating them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json

from vlm_api import sweep as sw, sweep_grid as g

from . import status as st


@dataclasses.dataclass
class Plan:
    create: list[dict]  # child run manifests (without owner references)
    suspend: list[str]  # runs to patch spec.suspend=true
    resume: list[str]  # runs to patch spec.suspend=false
    status: dict


def owned(runs: list[dict], sweep: dict) -> dict[str, dict]:
    """The sweep's runs by name: labelled for it and owned by this sweep object (by uid)."""
    meta = sweep.get("metadata") or {}
    uid, name = meta.get("uid"), meta.get("name")
    out = {}
    for run in runs:
        rmeta = run.get("metadata") or {}
        refs = rmeta.get("ownerReferences") or []
        if (rmeta.get("labels") or {}).get(sw.LABEL_SWEEP) == name and any(r.get("uid") == uid for r in refs):
            out[rmeta["name"]] = run
    return out


def _phase(run: dict | None) -> str:
    if run is None:
        return "NotStarted"
    return (run.get("status") or {}).get("phase") or "Pending"


def invalid(sweep: dict, message: str, now: datetime.datetime) -> dict:
    view = st.invalid(message)
    meta = sweep.get("metadata") or {}
    prev = (sweep.get("status") or {}).get("conditions")
    return {"phase": "Invalid", "observedGeneration": meta.get("generation"),
            "conditions": view.conditions(prev, meta.get("generation"), now)}


def plan(sweep: dict, runs: list[dict], now: datetime.datetime, taken: frozenset[str] = frozenset()) -> Plan:
    """`taken`: child names held by objects this sweep does not own (never adopted: such a
    point counts as failed, so it neither blocks a slot nor is retried forever)."""
    spec, meta = sweep["spec"], sweep.get("metadata") or {}
    have = owned(runs, sweep)
    wanted = list(g.children(sweep))
    suspend = bool(spec.get("suspend"))
    active = [n for n, r in have.items() if _phase(r) not in sw.TERMINAL_RUN_PHASES]
    plan_ = Plan([], [], [], {})
    if suspend:
        plan_.suspend = [n for n in active if not (have[n].get("spec") or {}).get("suspend")]
    else:
        plan_.resume = [n for n in active if (have[n].get("spec") or {}).get("suspend")]
        slots = max(0, int(spec.get("maxConcurrent", 1)) - len(active))
        plan_.create = [m for _, _, m in wanted if m["metadata"]["name"] not in set(have) | taken][:slots]
    starting = {m["metadata"]["name"] for m in plan_.create}
    objective = spec["objective"]
    points = []
    for point, seed, manifest in wanted:
        run_name = manifest["metadata"]["name"]
        run = have.get(run_name)
        record = {"name": g.point_name(meta["name"], point), "parameters": point, "seed": seed, "run": run_name}
        record.update(g.run_result((run or {}).get("status"), objective["stage"]))
        record["phase"] = "Pending" if run_name in starting else _phase(run)
        if run is None and run_name in taken:
            record.update(phase="Failed", message=f"a VLMPretrainRun named {run_name} exists and is not this sweep's")
        points.append(record)
    plan_.status = _status(sweep, points, objective, suspend, now)
    return plan_


def _status(sweep: dict, points: list[dict], objective: dict, suspend: bool, now: datetime.datetime) -> dict:
    meta = sweep.get("metadata") or {}
    total = len(points)
    ended = [p for p in points if p["phase"] in sw.TERMINAL_RUN_PHASES]
    ok = [p for p in ended if p["phase"] == "Succeeded"]
    failed = len(ended) - len(ok)
    out: dict = {"done": f"{len(ended)}/{total}", "points": points, "observedGeneration": meta.get("generation")}
    note = f"{len(ended)} of {total} runs finished ({len(ok)} succeeded, {failed} failed)"
    if len(ended) == total:
        best = g.best(points, objective)
        if best is not None:
            out["best"] = best
        if ok:
            where = f"best {best['name']} {json.dumps(best['parameters'], sort_keys=True)} = {best['value']}" if best \
                else f"no run reported the {objective['modality']} validation loss of stage {objective['stage']}"
            view = st.View("Succeeded", st.Cond("True", "Succeeded", f"{note}; {where}"),
                           st.Cond("False", "Completed", note),
                           st.Cond("True", "PointsFailed", note) if failed else st.Cond("False", "AsExpected", ""))
        else:
            view = st.View("Failed", st.Cond("False", "AllRunsFailed", note), st.Cond("False", "AllRunsFailed", note),
                           st.Cond("True", "AllRunsFailed", note))
    elif suspend:
        view = st.View("Suspended", st.Cond("False", "Suspended", f"suspended by spec.suspend; {note}"),
                       st.Cond("False", "Suspended", "resumes when spec.suspend is false"))
    else:
        started = any(p["phase"] != "NotStarted" for p in points)
        degraded = st.Cond("True", "PointsFailed", note) if failed else st.Cond("False", "AsExpected", "")
        view = st.View("Running" if started else "Pending", st.Cond("True" if started else "False", "Running", note),
                       st.Cond("True", "Running", f"at most {sweep['spec'].get('maxConcurrent', 1)} runs at once"),
                       degraded)
    out["phase"] = view.phase
    out["conditions"] = view.conditions((sweep.get("status") or {}).get("conditions"), meta.get("generation"), now)
    return out
