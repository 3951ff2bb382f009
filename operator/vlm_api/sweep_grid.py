"""A sweep's grid, pure: path addressing, expansion, child runs, and the best point.

A path names a field of the run spec in the CR's own camelCase names, dotted; a list of
named items (stages, data.sources) is entered by name in brackets:
`stages[pretrain].visualIntroduceAt`, `stages[sft].trainable.llm`. The operator
(`vlm_operator/sweep.py`), `vlmpretrain render|local` and the local sweep runner
(`vlm_local/sweep.py`) all build children with these functions, so a point has one name
everywhere: `<sweep>-<hash of its parameters>-s<seed>`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
import statistics
from typing import Any, Iterator

from . import sweep as sw
from .schema.common import API_VERSION, KIND as RUN_KIND

_SEGMENT = re.compile(r"^([a-zA-Z][a-zA-Z0-9]*)(?:\[([a-z0-9]([-a-z0-9]*[a-z0-9])?)\])?$")
# Fields the sweep itself sets on every child.
RESERVED = {"seed": "spec.seeds sets it", "suspend": "the sweep's spec.suspend sets it"}


def parse_path(path: str) -> list[tuple[str, str | None]]:
    """[(field, item name or None)] of a path; ValueError when it is not one."""
    out = []
    for part in path.split("."):
        m = _SEGMENT.match(part)
        if not m:
            raise ValueError(f"{part!r} is not a field or field[name]")
        out.append((m.group(1), m.group(2)))
    return out


def _item(items: Any, name: str) -> dict | None:
    if isinstance(items, list):
        return next((i for i in items if isinstance(i, dict) and i.get("name") == name), None)
    return None


def path_problem(path: str, schema: dict, template: dict) -> str | None:
    """Why `path` addresses nothing in a run spec (None: it addresses a field). `schema`
    is the run CRD's spec schema; named items must exist in `template`."""
    if path in RESERVED:
        return f"cannot be swept: {RESERVED[path]}"
    try:
        segments = parse_path(path)
    except ValueError as exc:
        return f"addresses nothing: {exc}"
    node, value, where = schema, template, ""
    for field, name in segments:
        if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node:
            return None  # free-form (model configs, trainable.llm): the run's validation judges the values
        props = node.get("properties") or {}
        if field not in props:
            near = difflib.get_close_matches(field, list(props), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            return f"addresses nothing: {where or 'the run spec'} has no field {field}{hint}"
        node = props[field]
        value = value.get(field) if isinstance(value, dict) else None
        where = f"{where}.{field}" if where else field
        if name is not None:
            if node.get("type") != "array" or node.get("x-kubernetes-list-map-keys") != ["name"]:
                return f"addresses nothing: {where} is not a list of named items"
            found = _item(value, name)
            if found is None:
                names = [i.get("name") for i in value or [] if isinstance(i, dict)]
                return f"addresses nothing: {where} has no item named {name} (the template has {names})"
            node, value, where = node["items"], found, f"{where}[{name}]"
        elif node.get("type") == "array":
            return f"addresses nothing: {where} is a list; address its items by name, {field}[<name>]"
    return None


def apply(spec: dict, path: str, value: Any) -> dict:
    """A copy of `spec` with the field at `path` set to `value` (missing mappings on the way
    are created); KeyError when a named item does not exist."""
    out = copy.deepcopy(spec)
    node: Any = out
    segments = parse_path(path)
    for i, (field, name) in enumerate(segments):
        last = i == len(segments) - 1
        if not isinstance(node, dict):
            where = ".".join(f"{f}[{n}]" if n else f for f, n in segments[:i])
            raise KeyError(f"{path}: {where} is {json.dumps(node)} in the template, not a mapping")
        if name is None and last:
            node[field] = copy.deepcopy(value)
            break
        if name is None:
            node = node.setdefault(field, {})
            continue
        item = _item(node.get(field), name)
        if item is None:
            raise KeyError(f"{path}: no {field} item named {name}")
        if last:
            raise KeyError(f"{path}: ends at a list item; name one of its fields")
        node = item
    return out


def grid(parameters: list[dict]) -> list[dict]:
    """Every point of the grid, {path: value}, in the order the parameters and values are written."""
    paths = [p["path"] for p in parameters]
    return [dict(zip(paths, combo)) for combo in itertools.product(*(p["values"] for p in parameters))]


def grid_size(parameters: list[dict]) -> int:
    return math.prod(len(p.get("values") or []) for p in parameters)


def point_hash(point: dict) -> str:
    """A short stable hash of a point's parameters (the same in every process and release)."""
    text = json.dumps(point, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[: sw.HASH_CHARS]


def point_name(sweep: str, point: dict) -> str:
    return f"{sweep}-{point_hash(point)}"


def run_name(sweep: str, point: dict, seed: int) -> str:
    return f"{point_name(sweep, point)}-s{seed}"


def child_spec(template: dict, point: dict, seed: int, run: str, suspend: bool = False) -> dict:
    """The run spec of one child: the template, the point's values, the seed, its own
    checkpoint prefix under the template's (children never share checkpoints)."""
    spec = copy.deepcopy(template)
    for path, value in point.items():
        spec = apply(spec, path, value)
    spec["seed"] = seed
    spec["suspend"] = bool(suspend)
    ckpt = dict(spec.get("checkpoint") or {})
    if isinstance(ckpt.get("uri"), str):
        ckpt["uri"] = f"{ckpt['uri'].rstrip('/')}/{run}/"
    spec["checkpoint"] = ckpt
    return spec


def children(sweep: dict) -> Iterator[tuple[dict, int, dict]]:
    """(point, seed, run manifest) of every child of a sweep object, seed-major (every point
    once before any point twice: a half-done sweep already covers the grid)."""
    meta = sweep.get("metadata") or {}
    spec = sweep["spec"]
    name = meta["name"]
    points = grid(spec.get("parameters") or [])
    for seed in spec.get("seeds") or [0]:
        for point in points:
            run = run_name(name, point, seed)
            labels = {sw.LABEL_SWEEP: name, sw.LABEL_POINT: point_hash(point), sw.LABEL_SEED: str(seed)}
            manifest = {
                "apiVersion": API_VERSION,
                "kind": RUN_KIND,
                "metadata": {"name": run, "labels": labels,
                             "annotations": {sw.ANNOTATION_PARAMETERS: json.dumps(point, sort_keys=True)}},
                "spec": child_spec(spec["template"], point, seed, run, bool(spec.get("suspend"))),
            }
            if meta.get("namespace"):
                manifest["metadata"]["namespace"] = meta["namespace"]
            yield point, seed, manifest


# ---------------------------------------------------------------------------- results


def run_result(status: dict | None, objective_stage: str) -> dict:
    """What a sweep reports of one child from the run's status: its phase, the final
    validation loss per modality of the objective's stage and of every stage, the tokens
    of its confirmed stages."""
    status = status or {}
    finals = status.get("finalCheckpoints") or {}
    stages = {k: dict(v["validationLoss"]) for k, v in finals.items()
              if isinstance(v, dict) and isinstance(v.get("validationLoss"), dict)}
    tokens = [v.get("tokens") for v in finals.values() if isinstance(v, dict) and isinstance(v.get("tokens"), int)]
    out: dict[str, Any] = {"phase": status.get("phase") or "Pending"}
    if objective_stage in stages:
        out["validationLoss"] = stages[objective_stage]
    if stages:
        out["stages"] = stages
    if tokens:
        out["tokens"] = sum(tokens)
    return out


def objective_value(point: dict, objective: dict) -> float | None:
    """The objective of one point record (None unless it succeeded with that loss)."""
    if point.get("phase", point.get("status")) not in ("Succeeded", "succeeded"):
        return None
    value = (point.get("validationLoss") or {}).get(objective.get("modality", "image-text"))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def by_point(points: list[dict], objective: dict) -> list[dict]:
    """Per grid point (in first-seen order): name, parameters, the objective's values over
    seeds, their mean and spread (sample standard deviation; 0 for one seed)."""
    groups: dict[str, dict] = {}
    for p in points:
        g = groups.setdefault(p["name"], {"name": p["name"], "parameters": p["parameters"], "values": []})
        value = objective_value(p, objective)
        if value is not None:
            g["values"].append(value)
    for g in groups.values():
        vals = g["values"]
        g["mean"] = statistics.fmean(vals) if vals else None
        g["spread"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)
    return list(groups.values())


def best(points: list[dict], objective: dict) -> dict | None:
    """The grid point with the best mean objective over its succeeded seeds (ties: the first)."""
    scored = [g for g in by_point(points, objective) if g["mean"] is not None]
    if not scored:
        return None
    sign = -1.0 if objective.get("goal", "minimize") == "maximize" else 1.0
    top = min(scored, key=lambda g: sign * g["mean"])
    return {"name": top["name"], "parameters": top["parameters"], "value": round(top["mean"], 6),
            "seeds": len(top["values"])}
