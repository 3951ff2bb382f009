"""Validation of objects against real schemas: the vendored upstream CRDs and kubernetes-validate.

The upstream CRDs are test data: their folder comes
from UPSTREAM_CRDS_DIR, by default the project's own copy (tests/data/upstream-schemas/,
structure only, made by scripts/vendor_schemas.py).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32.0"


def upstream_crds_dir() -> Path:
    path = Path(os.environ.get("UPSTREAM_CRDS_DIR", REPO / "tests" / "data" / "upstream-schemas"))
    if not path.is_dir():
        raise FileNotFoundError(f"upstream CRDs not found at {path} (set UPSTREAM_CRDS_DIR)")
    return path


def _strict(node):
    """Reject unknown fields, as kubectl's strict field validation does."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            if not out.get("x-kubernetes-preserve-unknown-fields"):
                out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str, crd_path: str | None = None) -> jsonschema.Draft4Validator:
    group, version = api_version.split("/")
    paths = [Path(crd_path)] if crd_path else sorted(upstream_crds_dir().glob("*.yaml"))
    for path in paths:
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        if spec["group"] != group or spec["names"]["kind"] != kind:
            continue
        for v in spec["versions"]:
            if v["name"] == version:
                schema = _strict(v["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}
                return jsonschema.Draft4Validator(schema)
    raise LookupError(f"no CRD for {api_version} {kind}")


def crd_errors(obj: dict, crd_path: str | None = None) -> list[str]:
    validator = crd_validator(obj["apiVersion"], obj["kind"], crd_path)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def core_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []
