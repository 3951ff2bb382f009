"""Three-layer validation of VLMPretrainRun manifests, as `vlmpretrain validate` runs it.

1. schema: the CRD's OpenAPI schema (what the API server checks at admission);
2. CEL: the CRD's `x-kubernetes-validations`, evaluated with cel-python;
3. semantic: the pydantic models plus checks that need code (quantities, brace ranges,
   layer indices against the model's depth, image tokens against the sequence length).

Every problem is a `Problem(path, reason)` with a `spec.path.to.field` path; nothing raises.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any, Iterable

import jsonschema
import yaml
from pydantic import ValidationError

from . import celrules, schema as s
from .crd import build_crd


@dataclasses.dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _fmt_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _strict(node: Any) -> Any:
    """The CRD schema with unknown fields forbidden (kubectl's strict field validation)."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


_CRD_SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
_VALIDATOR = jsonschema.Draft4Validator(_strict(_CRD_SCHEMA["properties"]["spec"]))


def schema_problems(spec: Any) -> list[Problem]:
    problems = []
    for err in sorted(_VALIDATOR.iter_errors(spec), key=lambda e: list(map(str, e.absolute_path))):
        reason = err.message
        if err.validator == "additionalProperties":
            extra = re.findall(r"'([^']+)' was unexpected", err.message)
            reason = f"unknown field(s) {', '.join(extra) or err.message}"
        elif err.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", err.message)
            path = _fmt_path(["spec", *err.absolute_path, *missing])
            problems.append(Problem(path, "required field is missing"))
            continue
        problems.append(Problem(_fmt_path(["spec", *err.absolute_path]), reason))
    return problems


def cel_problems(spec: Any, old_spec: Any = None) -> list[Problem]:
    return [Problem(_fmt_path(["spec", *path]), msg) for path, msg in celrules.evaluate(_CRD_SCHEMA["properties"]["spec"], spec, old_spec)]


def _pydantic_problems(spec: Any) -> tuple[list[Problem], s.VLMPretrainRunSpec | None]:
    try:
        return [], s.VLMPretrainRunSpec.model_validate(spec)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ["spec", *err["loc"]]
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, s.FieldError):
                problems.append(Problem(_fmt_path(["spec"]) + "." + cause.path, cause.reason))
                continue
            # Union branches repeat the location with a type tag: keep the user's path only.
            loc = [p for p in loc if not (isinstance(p, str) and (p.startswith(("literal[", "function-")) or p in ("str", "int", "LayerSelection")))]
            msg = err["msg"].removeprefix("Value error, ")
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
        return [Problem("spec", "must be a mapping")]
    spec = apply_defaults(spec)
    old = apply_defaults(old_spec) if isinstance(old_spec, dict) else None
    problems = schema_problems(spec) or cel_problems(spec, old)
    if problems:
        return problems
    problems, model = _pydantic_problems(spec)
    return problems or semantic_problems(model)


def validate_object(obj: Any) -> list[Problem]:
    if not isinstance(obj, dict):
        return [Problem("<document>", "not a mapping")]
    problems = []
    if obj.get("apiVersion") != s.API_VERSION:
        problems.append(Problem("apiVersion", f"must be {s.API_VERSION}, got {obj.get('apiVersion')!r}"))
    if obj.get("kind") != s.KIND:
        problems.append(Problem("kind", f"must be {s.KIND}, got {obj.get('kind')!r}"))
    name = (obj.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not re.match(s.NAME_PATTERN, name) or len(name) > 40:
        problems.append(Problem("metadata.name", "required: a DNS label of at most 40 characters (child names append the stage)"))
    unknown = set(obj) - {"apiVersion", "kind", "metadata", "spec", "status"}
    if unknown:
        problems.append(Problem(sorted(unknown)[0], "unknown top-level field"))
    if problems and any(p.path in ("apiVersion", "kind") for p in problems):
        return problems
    if "spec" not in obj:
        return problems + [Problem("spec", "required field is missing")]
    return problems + validate_spec(obj["spec"])


def load_documents(text: str) -> list[Any]:
    """YAML documents, empty ones dropped. Raises yaml.YAMLError on bad YAML."""
    return [d for d in yaml.safe_load_all(text) if d is not None]


def validate_text(text: str) -> list[Problem]:
    try:
        docs = load_documents(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return [Problem("<yaml>", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")]
    if not docs:
        return [Problem("<yaml>", "no documents")]
    problems = []
    for i, doc in enumerate(docs):
        prefix = f"[doc {i}] " if len(docs) > 1 else ""
        problems += [Problem(p.path, prefix + p.reason) for p in validate_object(doc)]
    return problems


def apply_defaults(spec: dict) -> dict:
    """Structural defaulting as the API server does it (so CEL sees what the server sees)."""
    return _default(_CRD_SCHEMA["properties"]["spec"], copy.deepcopy(spec))


def _default(node: dict, value: Any) -> Any:
    if isinstance(value, dict) and "properties" in node:
        for key, sub in node["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _default(sub, value[key])
    elif isinstance(value, list) and "items" in node:
        value = [_default(node["items"], v) for v in value]
    return value

