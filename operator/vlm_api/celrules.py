"""Evaluate a CRD schema's `x-kubernetes-validations` (CEL) the way the API server does.

cel-python implements CEL itself; this module adds what Kubernetes layers on top:
values typed by the schema (a `number` field is a double even when written as 1), the
`sum()` list function of Kubernetes' CEL library, `self`/`oldSelf` binding per schema
node, and transition rules (those naming `oldSelf`) only when an old object exists.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import celpy
from celpy import celtypes


def _sum(values: celtypes.ListType) -> Any:
    total: Any = celtypes.IntType(0)
    for v in values:
        total = celtypes.DoubleType(float(total) + float(v)) if isinstance(v, celtypes.DoubleType) or isinstance(total, celtypes.DoubleType) else celtypes.IntType(int(total) + int(v))
    return total


_FUNCTIONS = {"sum": _sum}
_ENV = celpy.Environment()


@functools.lru_cache(maxsize=None)
def _program(rule: str):
    return _ENV.program(_ENV.compile(rule), functions=_FUNCTIONS)


_INT64 = (-(2**63), 2**63 - 1)


def to_cel(node: dict, value: Any, memo: dict | None = None) -> Any:
    """A JSON value as a CEL value, typed by its schema node. `memo` (one per evaluation)
    converts each (schema node, mapping or list) once, however many rules see it. An
    integer beyond int64 becomes a double, as the API server's JSON decoder makes it."""
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, (dict, list)):
        key = (id(node), id(value))
        if memo is not None and key in memo:
            return memo[key]
        if isinstance(value, dict):
            props = node.get("properties", {})
            extra = node.get("additionalProperties") or {}
            out = celtypes.MapType({
                celtypes.StringType(k): to_cel(props.get(k, extra if isinstance(extra, dict) else {}), v, memo)
                for k, v in value.items()
            })
        else:
            out = celtypes.ListType([to_cel(node.get("items", {}), v, memo) for v in value])
        if memo is not None:
            memo[key] = out
        return out
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, (int, float)):
        if node.get("type") == "number" or isinstance(value, float) or not _INT64[0] <= value <= _INT64[1]:
            return celtypes.DoubleType(float(value))
        return celtypes.IntType(value)
    if value is None:
        return None
    raise TypeError(f"unsupported value of type {type(value).__name__}")


def _walk(node: dict, value: Any, old: Any, path: list) -> Iterator[tuple[list, dict, Any, Any]]:
    if value is None:
        return
    yield path, node, value, old
    if isinstance(value, dict) and "properties" in node:
        for key, sub in node["properties"].items():
            if key in value:
                sub_old = old.get(key) if isinstance(old, dict) else None
                yield from _walk(sub, value[key], sub_old, [*path, key])
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, item in value.items():
            sub_old = old.get(key) if isinstance(old, dict) else None
            yield from _walk(node["additionalProperties"], item, sub_old, [*path, key])
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            # Kubernetes correlates list items only for map-type lists; ours are atomic.
            yield from _walk(node["items"], item, None, [*path, i])


def evaluate(schema: dict, value: Any, old: Any = None, *, deep: bool = True) -> list[tuple[list, str]]:
    """[(path, message)] for every rule that fails (or cannot be evaluated). `deep=False`:
    only the rules of `schema`'s own node (e.g. the root's rule on metadata.name)."""
    failures = []
    memo: dict = {}
    walk = _walk(schema, value, old, []) if deep else iter([([], schema, value, old)])
    for path, node, val, old_val in walk:
        for rule in node.get("x-kubernetes-validations", []):
            text = rule["rule"]
            field = [p for p in rule.get("fieldPath", "").split(".") if p]
            try:
                if "oldSelf" in text:
                    if old_val is None:
                        continue
                    activation = {"self": to_cel(node, val, memo), "oldSelf": to_cel(node, old_val)}
                else:
                    activation = {"self": to_cel(node, val, memo)}
                result = _program(text).evaluate(activation)
            except Exception as exc:  # noqa: BLE001 - a rule that errors rejects, as in the API server
                failures.append(([*path, *field], f"{rule['message']} ({type(exc).__name__})"))
                continue
            if isinstance(result, celpy.CELEvalError) or not bool(result):
                failures.append(([*path, *field], rule["message"]))
    return failures
