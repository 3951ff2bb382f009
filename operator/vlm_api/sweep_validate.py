"""Validation of VLMPretrainSweep manifests, as `vlmpretrain validate` and the operator run it.

In admission order, stopping at the first layer that finds something:
1. the object: apiVersion, kind, metadata.name (short enough for `<name>-<hash>-s<seed>`);
2. bounds, the sweep's own schema (template aside) and its CEL rules;
3. the template, validated as a run spec (`validate.validate_spec`), reported under
   `spec.template`;
4. the grid: every path addresses a field of the template, at most `MAX_POINTS` points,
   every value valid alone (reported at `spec.parameters[i].values[j]` with its path),
   then every point valid as a whole (reported with the point).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jsonschema

from . import celrules, sweep as sw, sweep_crd, sweep_grid as g, validate as v
from .schema.common import API_VERSION, RUN_NAME_PATTERN

MAX_RUNS = 1024  # points x seeds: each is a line of the sweep's status
MAX_POINT_PROBLEMS = 5


@functools.lru_cache(maxsize=1)
def _schemas() -> tuple[dict, dict, jsonschema.Draft4Validator, dict]:
    """The sweep's spec schema, the same without the template's, its validator, the run's."""
    spec = sweep_crd.spec_schema()
    own = dict(spec, properties={**spec["properties"], "template": {"type": "object"}})
    return spec, own, jsonschema.Draft4Validator(v._strict(own)), sweep_crd.run_spec_schema()


def _under(problems: list[v.Problem]) -> list[v.Problem]:
    """Run-spec problems (paths `spec...`) as problems of the template (`spec.template...`)."""
    return [v.Problem("spec.template" + p.path.removeprefix("spec"), p.reason) for p in problems]


def _caused(where: str, cause: str, problem: v.Problem) -> v.Problem:
    """A template problem that a value or a point causes, reported where the value is."""
    return v.Problem(where, f"{cause} makes {_under([problem])[0]}")


def _show_point(point: dict) -> str:
    return "{" + ", ".join(f"{k}: {json.dumps(val, separators=(',', ':'))}" for k, val in point.items()) + "}"


def with_defaults(spec: dict) -> dict:
    """The spec with the defaults the API server fills in (maxConcurrent, seeds, objective)."""
    return v._default(_schemas()[0], spec)


def object_problems(obj: dict) -> list[v.Problem]:
    problems = []
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > sw.MAX_SWEEP_NAME or not re.match(RUN_NAME_PATTERN, name):
        problems.append(v.Problem("metadata.name", sw.SWEEP_NAME_MESSAGE.removeprefix("metadata.name ")))
    unknown = [k for k in obj if k not in v.TOP_LEVEL]
    if unknown:
        problems.append(v.Problem(str(unknown[0]), "unknown top-level field"))
    if "spec" not in obj:
        problems.append(v.Problem("spec", "required field is missing"))
    return problems


def spec_problems(spec: Any) -> list[v.Problem]:
    """All problems of a sweep's spec, first layer that finds any."""
    if not isinstance(spec, dict):
        return [v.Problem("spec", "must be a mapping")]
    problems = v.bound_problems(spec)
    if problems:
        return problems
    full, own_schema, own, run_schema = _schemas()
    defaulted = with_defaults(spec)
    for err in sorted(own.iter_errors(defaulted), key=lambda e: list(map(str, e.absolute_path))):
        if err.validator == "required":
            missing = [k for k in err.validator_value if k not in err.instance]
            problems += [v.Problem(v._fmt_path(["spec", *err.absolute_path, k]), "required field is missing") for k in missing]
        else:
            problems.append(v.Problem(v._fmt_path(["spec", *err.absolute_path]), v._schema_reason(err)))
    problems = problems or v.list_map_problems(defaulted, own_schema)
    if problems:
        return problems
    problems = _under(v.validate_spec(defaulted["template"]))
    if problems:
        return problems
    # Paths before the CEL rules: they say which path and why, the rules only that one is wrong.
    problems = [v.Problem(f"spec.parameters[{i}].path", f"{p['path']} {why}")
                for i, p in enumerate(defaulted.get("parameters") or [])
                for why in [g.path_problem(p["path"], run_schema, defaulted["template"])] if why]
    problems = problems or [v.Problem(v._fmt_path(["spec", *path]), msg)
                            for path, msg in celrules.evaluate(full, defaulted, deep=False)]
    return problems or grid_problems(defaulted)


def grid_problems(spec: dict) -> list[v.Problem]:
    """The grid's size, then every value alone, then every point (paths already address fields)."""
    params = spec.get("parameters") or []
    template = spec["template"]
    problems = []
    points, runs = g.grid_size(params), g.grid_size(params) * len(spec.get("seeds") or [0])
    if points > sw.MAX_POINTS:
        sizes = " x ".join(str(len(p["values"])) for p in params)
        return [v.Problem("spec.parameters", f"{sizes} = {points} points: at most {sw.MAX_POINTS}")]
    if runs > MAX_RUNS:
        return [v.Problem("spec.seeds", f"{points} points x {len(spec['seeds'])} seeds = {runs} runs: at most {MAX_RUNS}")]
    for i, p in enumerate(params):
        for j, value in enumerate(p["values"]):
            try:
                found = v.validate_spec(g.apply(template, p["path"], value))
            except KeyError as exc:
                return [v.Problem(f"spec.parameters[{i}].path", f"addresses nothing: {exc.args[0]}")]
            if found:
                cause = f"{p['path']} = {json.dumps(value, separators=(',', ':'))}"
                problems.append(_caused(f"spec.parameters[{i}].values[{j}]", cause, found[0]))
    if problems:
        return problems
    bad = 0
    for point in g.grid(params):
        try:
            found = v.validate_spec(g.child_spec(template, point, 0, "x"))
        except KeyError as exc:  # an earlier path of the point replaced what a later one enters
            found = [v.Problem("spec", exc.args[0])]
        if found:
            bad += 1
            if bad <= MAX_POINT_PROBLEMS:
                problems.append(_caused("spec.parameters", f"point {_show_point(point)}", found[0]))
    if bad > MAX_POINT_PROBLEMS:
        problems.append(v.Problem("spec.parameters", f"and {bad - MAX_POINT_PROBLEMS} more invalid points"))
    return problems


def validate_sweep_object(obj: dict) -> list[v.Problem]:
    if obj.get("apiVersion") != API_VERSION:
        return [v.Problem("apiVersion", f"must be {API_VERSION}, got {v.show(obj.get('apiVersion'))}")]
    problems = object_problems(obj)
    return problems or spec_problems(obj["spec"])


def validate_any(obj: Any) -> list[v.Problem]:
    """One manifest document: a sweep, else a run (`validate.validate_text(text, validate_any)`)."""
    if isinstance(obj, dict) and obj.get("kind") == sw.KIND:
        return validate_sweep_object(obj)
    return v.validate_object(obj)
