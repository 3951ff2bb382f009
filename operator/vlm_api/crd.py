"""Generate the VLMPretrainRun CRD from the pydantic models.

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema:
no $ref, a type on every node, boolean exclusive bounds, no `null`, and the special
`x-kubernetes-int-or-string` / `x-kubernetes-preserve-unknown-fields` markers where a
field is a union. `to_structural` does that translation and nothing else.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from . import schema as s

CRD_FILE = f"crds/{s.GROUP}_{s.PLURAL}.yaml"

_KEEP = {
    "type", "description", "properties", "required", "items", "enum", "default", "pattern",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "minProperties", "maxProperties", "additionalProperties", "format",
    "x-kubernetes-validations", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}
# Constraints an int-or-string field keeps from its integer and its string branch.
_INT_KEYS = ("minimum", "maximum")
_STR_KEYS = ("maxLength", "minLength", "pattern")


def _resolve(node: Any, defs: dict) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            merged = _resolve(target, defs)
            rest = _resolve(rest, defs)
            rules = merged.get("x-kubernetes-validations", []) + rest.pop("x-kubernetes-validations", [])
            merged.update(rest)
            if rules:
                merged["x-kubernetes-validations"] = rules
            return merged
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _merge_union(node: dict) -> dict:
    """Collapse anyOf: Optional[X] -> X; int|str -> int-or-string; str-enum|object -> preserved."""
    options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
    outer = {k: v for k, v in node.items()}
    if len(options) == 1:
        inner = dict(options[0])
        inner.update({k: v for k, v in outer.items() if k != "default" or v is not None})
        return inner
    types = {o.get("type") for o in options}
    if types == {"integer", "string"}:
        outer["x-kubernetes-int-or-string"] = True
        for option in options:
            keys = _INT_KEYS if option["type"] == "integer" else _STR_KEYS
            outer.update({k: option[k] for k in keys if k in option})
        return outer
    # A string-or-object union (trainable.llm): CEL on the field does the checking.
    outer["x-kubernetes-preserve-unknown-fields"] = True
    return outer


def _key_rule(node: dict) -> None:
    """A mapping with constrained keys (pydantic's patternProperties + propertyNames): the
    CRD has neither, so the value schema becomes additionalProperties and the key length a
    CEL rule on the map. Not the key pattern: a CRD cannot bound a map key's length, so the
    API server's cost estimate of a regex on keys (up to the request size, times the
    entries) would exceed its per-rule budget and refuse the CRD; validate.py and the
    operator check the key pattern (pydantic)."""
    patterns = node.pop("patternProperties", None)
    names = node.pop("propertyNames", None) or {}
    if patterns:
        (_, value), = patterns.items()
        node["additionalProperties"] = value
    if "maxLength" in names:
        rule = {"rule": f"self.all(k, size(k) <= {names['maxLength']})",
                "message": f"every key must be at most {names['maxLength']} characters"}
        node["x-kubernetes-validations"] = [rule, *node.get("x-kubernetes-validations", [])]


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "anyOf" in node:
        node = _merge_union(node)
    if "patternProperties" in node or "propertyNames" in node:
        _key_rule(node)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "exclusiveMinimum" in node:
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        node["maximum"] = node.pop("exclusiveMaximum")
        node["exclusiveMaximum"] = True
    if node.get("default", 0) is None:
        del node["default"]
    if node.get("type") == "object" and "properties" not in node:
        extra = node.get("additionalProperties")
        if extra in (None, True) or extra == {}:
            # Free-form (inline transformers configs): kept as written.
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("additionalProperties") is True and "properties" in node:
        # A model that passes unknown keys through (schema.cluster.NamedItem): its named
        # fields are checked, the rest kept as written.
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]  # structural schemas prune unknown fields instead
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("exclusiveMinimum", "exclusiveMaximum"):
            out[key] = value
        elif key in ("properties",):
            out[key] = {k: _structural(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value)
        elif key in _KEEP:
            out[key] = value
    if out.get("type") is None and not (
        out.get("x-kubernetes-int-or-string") or out.get("x-kubernetes-preserve-unknown-fields")
    ):
        raise ValueError(f"schema node without type: {node}")
    return out


def openapi_schema(model: type[s.Model]) -> dict:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    resolved = _resolve(raw, defs)
    resolved.pop("title", None)
    return _structural(resolved)


def _spec_defaults(spec: dict) -> dict:
    # Objects that default to {} so the API server fills in their inner defaults.
    for name in ("resources", "parallelism", "elastic", "metrics"):
        spec["properties"][name]["default"] = {}
    model = spec["properties"]["model"]["properties"]
    for name in ("projector", "tokenizer"):
        model[name]["default"] = {}
    stage = spec["properties"]["stages"]["items"]["properties"]
    for name in ("trainable", "optimizer"):
        stage[name]["default"] = {}
    return spec


def build_crd() -> dict:
    spec = _spec_defaults(openapi_schema(s.VLMPretrainRunSpec))
    status = openapi_schema(s.VLMPretrainRunStatus)
    version = {
        "name": s.VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
            {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
            {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
            {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.lastCheckpoint.step",
             "description": "Step of the newest committed checkpoint."},
            {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodes"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": "A vision-language model pretraining run: a staged recipe the operator runs as elastic PyTorchJobs.",
                "required": ["spec"],
                # Every child's name starts with the run's (schema.RUN_NAME_PATTERN says why).
                "x-kubernetes-validations": [{"rule": s.RUN_NAME_RULE, "message": s.RUN_NAME_MESSAGE}],
                "properties": {
                    "apiVersion": {"type": "string", "description": "API version: pretrain.vlm.dev/v1alpha1."},
                    "kind": {"type": "string", "description": "VLMPretrainRun."},
                    # The only restriction a CRD may place on metadata: here the length every
                    # object name has anyway, so the CEL rule's cost estimate is bounded.
                    "metadata": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 253}}},
                    "spec": spec,
                    "status": status,
                },
            }
        },
    }
    return crd_document(s.KIND, s.PLURAL, s.SINGULAR, s.SHORT_NAMES, version)


def crd_document(kind: str, plural: str, singular: str, short_names: list[str], version: dict) -> dict:
    """The CustomResourceDefinition of one namespaced kind of this API group (run or sweep)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{s.GROUP}", "labels": {"app.kubernetes.io/part-of": "vlm-pretrain-operator"}},
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "categories": ["vlm"],
            },
            "versions": [version],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `vlmpretrain crd` from vlm_api/schema/. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
