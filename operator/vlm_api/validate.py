"""Validation of VLMPretrainRun manifests, as `vlmpretrain validate` and the operator run it.

0. bounds: the limits of `vlm_api.limits` (nesting, size, numbers JSON can hold, model
   config caps) and credential-shaped values anywhere (`vlm_api.credentials`), before
   anything else walks the spec;
1. schema: the CRD's OpenAPI schema (what the API server checks at admission), plus the
   uniqueness of list-map keys (`x-kubernetes-list-type: map`);
2. CEL: the CRD's `x-kubernetes-validations`, evaluated with cel-python;
3. semantic: the pydantic models plus checks that need code (quantities, brace ranges
   counted without expanding them, layer indices against the model's depth, image tokens
   against the sequence length).

Every problem is a `Problem(path, reason)` with a `spec.path.to.field` path; nothing
raises. No reason echoes a value that looks like a credential: reasons are built without
the offending value where it could be one (pattern failures), and every reason is
scrubbed (`credentials.redact`), stripped of control characters and cut short.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import unicodedata
from typing import Any, Callable, Iterable

import jsonschema
import yaml
from pydantic import ValidationError

from . import celrules, credentials, limits, schema as s
from .crd import build_crd

MAX_REASON = 300
MAX_PATH = 200


def clean(text: str, limit: int = MAX_REASON) -> str:
    """A message fit to print: credentials redacted, control and format characters
    (ANSI escapes, bidi overrides) escaped, at most `limit` characters."""
    text = credentials.redact(str(text))
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in text):
        text = "".join(c if unicodedata.category(c) not in ("Cc", "Cf") else f"\\x{ord(c):02x}" if ord(c) < 256
                       else f"\\u{ord(c):04x}" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", clean(self.path, MAX_PATH))
        object.__setattr__(self, "reason", clean(self.reason, MAX_REASON))

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _fmt_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and re.match(r"^[A-Za-z_][-A-Za-z0-9_]{0,63}$", p):
            out += ("." if out else "") + p
        else:
            out += f"[{show(p)}]"
    return out


def show(value: Any, limit: int = 40) -> str:
    """A value as an error message may show it: short scalars only, never a credential."""
    if isinstance(value, (bool, int, float)) or value is None:
        text = repr(value)
        return text if len(text) <= limit else f"a {len(text)}-digit number"
    if isinstance(value, str):
        if credentials.kinds(value):
            return credentials.REDACTED
        text = repr(value)
        return text if len(text) <= limit else f"a string of {len(value)} characters"
    return f"a {_json_type(value)}"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "null" if value is None else type(value).__name__


def _strict(node: Any) -> Any:
    """The CRD schema as jsonschema checks it: unknown fields forbidden (kubectl's strict
    field validation), int-or-string typed (the API server's structural check)."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if out.get("x-kubernetes-int-or-string") and "type" not in out:
            out["type"] = ["integer", "string"]
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


_CRD = build_crd()
_ROOT_SCHEMA = _CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
_SPEC_SCHEMA = _ROOT_SCHEMA["properties"]["spec"]
_VALIDATOR = jsonschema.Draft4Validator(_strict(_SPEC_SCHEMA))


# ---------------------------------------------------------------------------- layer 0: bounds


def bound_problems(spec: Any) -> list[Problem]:
    """Layer 0: a spec past the limits, or holding credential-shaped values."""
    problems = [Problem(path, reason) for path, reason in limits.shape_problems(spec)]
    if problems:
        return problems
    return [
        Problem(path, f"looks like {kind}: credentials belong in a Secret (a credentialsSecret "
                      "field) or the service account's workload identity, never in the spec")
        for path, kind in credentials.scan(spec)
    ]


# ---------------------------------------------------------------------------- layer 1: schema


def _schema_reason(err: jsonschema.ValidationError) -> str:
    """A reason for one jsonschema error that shows the value only where it is a short
    scalar (never for a pattern: a malformed URI may carry a secret)."""
    v, inst, arg = err.validator, err.instance, err.validator_value
    if v == "type":
        want = " or ".join(arg) if isinstance(arg, list) else arg
        return f"must be of type {want}, not {_json_type(inst)}"
    if v == "enum":
        return f"{show(inst)} is not one of {arg}"
    if v == "pattern":
        return f"does not match the expected form: {s.PATTERN_HELP.get(arg, arg)}"
    if v == "minLength":
        return "must not be empty" if arg == 1 else f"is shorter than {arg} characters"
    if v == "maxLength":
        return f"is longer than {arg} characters"
    if v in ("minimum", "maximum"):
        exclusive = err.schema.get("exclusiveMinimum" if v == "minimum" else "exclusiveMaximum")
        relation = ("less than" if v == "minimum" else "greater than") + (" or equal to" if exclusive else "")
        return f"{show(inst)} is {relation} the {v} of {arg}"
    if v in ("minItems", "minProperties"):
        return f"must have at least {arg} {'item' if v == 'minItems' else 'entry'}{'s' if arg != 1 else ''}"
    if v in ("maxItems", "maxProperties"):
        return f"has more than {arg} {'items' if v == 'maxItems' else 'entries'}"
    return err.message


def schema_problems(spec: Any) -> list[Problem]:
    problems = []
    for err in sorted(_VALIDATOR.iter_errors(spec), key=lambda e: list(map(str, e.absolute_path))):
        if err.validator == "additionalProperties":
            extra = [k for k in inst_keys(err.instance) if k not in (err.schema.get("properties") or {})]
            reason = f"unknown field(s) {', '.join(show(k, 64).strip(chr(39)) for k in extra[:5])}"
        elif err.validator == "required":
            missing = [k for k in err.validator_value if isinstance(err.instance, dict) and k not in err.instance]
            for key in missing:
                problems.append(Problem(_fmt_path(["spec", *err.absolute_path, key]), "required field is missing"))
            continue
        else:
            reason = _schema_reason(err)
        problems.append(Problem(_fmt_path(["spec", *err.absolute_path]), reason))
    return problems or list_map_problems(spec)


def inst_keys(value: Any) -> list:
    return list(value) if isinstance(value, dict) else []


def list_map_problems(spec: Any, node: dict | None = None, path: list | None = None) -> list[Problem]:
    """Duplicate keys in `x-kubernetes-list-type: map` lists (the API server refuses them
    before any CEL rule runs)."""
    node = _SPEC_SCHEMA if node is None else node
    path = ["spec"] if path is None else path
    problems: list[Problem] = []
    if isinstance(spec, dict):
        for key, sub in (node.get("properties") or {}).items():
            if key in spec:
                problems += list_map_problems(spec[key], sub, [*path, key])
    elif isinstance(spec, list) and "items" in node:
        keys = node.get("x-kubernetes-list-map-keys") if node.get("x-kubernetes-list-type") == "map" else None
        seen: set = set()
        for i, item in enumerate(spec):
            if keys and isinstance(item, dict):
                ident = tuple(str(item.get(k)) for k in keys)
                if ident in seen:
                    problems.append(Problem(_fmt_path([*path, i, keys[0]]),
                                            f"duplicate {keys[0]} {show(item.get(keys[0]))}: must be unique"))
                seen.add(ident)
            problems += list_map_problems(item, node["items"], [*path, i])
    return problems


# ---------------------------------------------------------------------------- layer 2: CEL


def cel_problems(spec: Any, old_spec: Any = None) -> list[Problem]:
    return [Problem(_fmt_path(["spec", *path]), msg) for path, msg in celrules.evaluate(_SPEC_SCHEMA, spec, old_spec)]


def name_problems(obj: dict) -> list[Problem]:
    """The root CEL rule on metadata.name, as the API server evaluates it."""
    return [Problem("metadata.name", msg) for _, msg in celrules.evaluate(_ROOT_SCHEMA, obj, deep=False)]


# ---------------------------------------------------------------------------- layer 3: semantic


def _pydantic_problems(spec: Any) -> tuple[list[Problem], s.VLMPretrainRunSpec | None]:
    try:
        return [], s.VLMPretrainRunSpec.model_validate(spec)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = ["spec", *err["loc"]]
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, s.FieldError):
                problems.append(Problem(_fmt_path(["spec"]) + "." + cause.path, cause.reason))
                continue
            # Union branches repeat the location with a type tag: keep the user's path only.
            loc = [p for p in loc if not (isinstance(p, str) and (p.startswith(("literal[", "function-")) or p in ("str", "int", "LayerSelection", "constrained-str")))]
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "string_pattern_mismatch":  # phrased as the schema layer does
                pattern = (err.get("ctx") or {}).get("pattern", "")
                msg = f"does not match the expected form: {s.PATTERN_HELP.get(pattern, pattern)}"
            if loc and loc[-1] == "[key]":  # a mapping key, not its value
                loc, msg = loc[:-1], f"key {msg}"
            problems.append(Problem(_fmt_path(loc), msg))
        return problems, None


def _depth(part: s.ModelPart) -> int | None:
    cfg = part.config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def visual_region_layers(fraction: float, depth: int) -> list[int]:
    """The documented selection rule: n = round(fraction * depth) layers, spread uniformly
    at floor((i + 0.5) * depth / n). 8 of 32 -> [2, 6, 10, 14, 18, 22, 26, 30]."""
    n = math.floor(fraction * depth + 0.5)
    if n < 1:
        raise ValueError(f"fraction {fraction} of {depth} layers selects no layer")
    return [math.floor((i + 0.5) * depth / n) for i in range(n)]


def semantic_problems(spec: s.VLMPretrainRunSpec) -> list[Problem]:
    problems: list[Problem] = []
    depth = _depth(spec.model.llm)
    image_tokens = None
    if spec.model.vision_encoder and spec.model.vision_encoder.config:
        vc = spec.model.vision_encoder.config
        if isinstance(vc.get("image_size"), int) and isinstance(vc.get("patch_size"), int) and vc["patch_size"] > 0:
            image_tokens = (vc["image_size"] // vc["patch_size"]) ** 2
    for i, stage in enumerate(spec.stages):
        base = f"spec.stages[{i}]"
        llm = stage.trainable.llm
        if depth is not None and isinstance(llm, s.LayerSelection):
            if llm.layers is not None and max(llm.layers) >= depth:
                problems.append(Problem(f"{base}.trainable.llm.layers", f"index {max(llm.layers)} out of range: the LLM has {depth} layers"))
            if llm.visual_region is not None:
                try:
                    visual_region_layers(llm.visual_region.fraction, depth)
                except ValueError as exc:
                    problems.append(Problem(f"{base}.trainable.llm.visualRegion.fraction", str(exc)))
        if not stage.trainable.trains_anything():
            problems.append(Problem(f"{base}.trainable", "the stage trains nothing: unfreeze at least one part"))
        if stage.batch_tokens < spec.data.seq_length:
            problems.append(Problem(f"{base}.globalBatchTokens", f"{stage.batch_tokens} tokens is less than one sequence (seqLength {spec.data.seq_length})"))
        if stage.total_tokens is not None and stage.total_tokens < stage.batch_tokens:
            problems.append(Problem(f"{base}.tokens", f"shorter than one global batch ({stage.batch_tokens} tokens)"))
        if stage.prune is not None and depth is not None and stage.prune.remove_layers >= depth:
            problems.append(Problem(f"{base}.prune.removeLayers", f"cannot remove {stage.prune.remove_layers} of {depth} layers"))
    if image_tokens is not None and image_tokens + 8 > spec.data.seq_length:
        problems.append(Problem("spec.data.seqLength", f"{spec.data.seq_length} cannot hold one image ({image_tokens} image tokens) plus text"))
    return problems


def validate_spec(spec: Any, old_spec: Any = None) -> list[Problem]:
    """All problems with a spec dict. Layers run in admission order and stop at the first
    that finds something, so one mistake gives one line, named by the layer that owns it."""
    if not isinstance(spec, dict):
        return [Problem("spec", f"must be a mapping, not {_json_type(spec)}")]
    problems = bound_problems(spec)
    if problems:
        return problems
    spec = apply_defaults(spec)
    old = apply_defaults(old_spec) if isinstance(old_spec, dict) and not bound_problems(old_spec) else None
    problems = schema_problems(spec) or cel_problems(spec, old)
    if problems:
        return problems
    problems, model = _pydantic_problems(spec)
    return problems or semantic_problems(model)


TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")


def validate_object(obj: Any) -> list[Problem]:
    if not isinstance(obj, dict):
        return [Problem("<document>", f"not a mapping but a {_json_type(obj)}: a manifest is a VLMPretrainRun object")]
    problems = []
    if obj.get("apiVersion") != s.API_VERSION:
        problems.append(Problem("apiVersion", f"must be {s.API_VERSION}, got {show(obj.get('apiVersion'))}"))
    if obj.get("kind") != s.KIND:
        problems.append(Problem("kind", f"must be {s.KIND}, got {show(obj.get('kind'))}"))
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        problems.append(Problem("metadata", f"must be a mapping, not {_json_type(meta)}"))
        meta = {}
    meta = meta or {}
    why = s.run_name_problem(meta.get("name"))
    if why:
        problems.append(Problem("metadata.name", why))
    namespace = meta.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or len(namespace) > 63
                                  or not re.match(s.NAME_PATTERN, namespace)):
        problems.append(Problem("metadata.namespace", "must be a DNS label of at most 63 characters"))
    unknown = [k for k in obj if k not in TOP_LEVEL]
    if unknown:
        problems.append(Problem(_fmt_path([unknown[0]]) if isinstance(unknown[0], str) else "<document>",
                                "unknown top-level field"))
    if problems and any(p.path in ("apiVersion", "kind") for p in problems):
        return problems
    if "spec" not in obj:
        return problems + [Problem("spec", "required field is missing")]
    return problems + validate_spec(obj["spec"])


def load_documents(text: str) -> list[Any]:
    """YAML documents, empty ones dropped, within vlm_api.limits (aliases, depth, size,
    string keys). Raises yaml.YAMLError on bad YAML or a document past a limit."""
    return limits.load_all(text)


def validate_text(text: str, check: Callable[[Any], list[Problem]] | None = None) -> list[Problem]:
    """Every document's problems; `check` validates one document (default: as a run;
    `sweep_validate.validate_any` also takes sweeps)."""
    check = check or validate_object
    try:
        docs = load_documents(text)
    except yaml.YAMLError as exc:
        where, problem = limits.yaml_error(exc)
        return [Problem("<yaml>", f"not valid YAML{where}: {problem}")]
    if not docs:
        return [Problem("<yaml>", "no documents")]
    if len(docs) > limits.MAX_DOCUMENTS:
        return [Problem("<yaml>", f"{len(docs)} documents; at most {limits.MAX_DOCUMENTS} per file")]
    problems = []
    for i, doc in enumerate(docs):
        prefix = f"[doc {i}] " if len(docs) > 1 else ""
        try:
            found = check(doc)
        except Exception as exc:  # noqa: BLE001 - a validator bug is one line, never a traceback
            found = [Problem("<document>", f"could not be checked ({type(exc).__name__}); please report this")]
        problems += [Problem(p.path, prefix + p.reason) for p in found]
    return problems


# Fields that still work but have a successor: (path in spec, successor).
DEPRECATED = ((("resources", "priorityClassName"), "spec.scheduling.priorityClassName (the same, for every pod)"),)


def deprecations(text: str) -> list[Problem]:
    """Warnings for deprecated fields a valid manifest still sets."""
    out = []
    for i, doc in enumerate(load_documents(text)):
        prefix = f"[doc {i}] " if i else ""
        for path, successor in DEPRECATED:
            node: Any = doc.get("spec") if isinstance(doc, dict) else None
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            if node:
                out.append(Problem("spec." + ".".join(path), f"{prefix}deprecated: use {successor}"))
    return out


def apply_defaults(spec: dict) -> dict:
    """Structural defaulting as the API server does it (so CEL sees what the server sees).
    Copies only the mappings and lists the schema describes; free-form subtrees (model
    configs) are shared with the input, which nothing here modifies."""
    return _default(_SPEC_SCHEMA, spec)


def _default(node: dict, value: Any) -> Any:
    if isinstance(value, dict) and "properties" in node:
        value = dict(value)
        for key, sub in node["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _default(sub, value[key])
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict) and \
            "properties" in node["additionalProperties"]:
        value = {k: _default(node["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and "items" in node:
        value = [_default(node["items"], v) for v in value]
    return value
