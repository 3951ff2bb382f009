"""Carry the upstream CRD schemas the tests validate against (structure only).

    python scripts/vendor_schemas.py SRC_DIR [DEST_DIR]

Reads the upstream CRD files named in SOURCES (from SRC_DIR, e.g. a checkout's vendor
folder), drops every schema `description` (the bulk of the files; a property that is
*named* description stays) and writes them to DEST_DIR (default
tests/data/upstream-schemas/) with a SOURCES.md naming project, version, commit and licence.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

DEST = Path(__file__).resolve().parents[1] / "tests" / "data" / "upstream-schemas"
SOURCES = {
    "kubeflow.org_pytorchjobs.yaml": "github.com/kubeflow/trainer (formerly kubeflow/training-operator), "
    "manifests/base/crds/kubeflow.org_pytorchjobs.yaml, tag v1.9.4, commit 4445c12aa62e4345b0c2c6ac9b215a70eca46ed7",
    **{f"monitoring.coreos.com_{kind}.yaml": "github.com/prometheus-operator/prometheus-operator, "
       f"example/prometheus-operator-crd/monitoring.coreos.com_{kind}.yaml, release v0.93.0, "
       "commit 6adcebc5076c34f4f55f8f5f7b1e528929373ac7"
       for kind in ("podmonitors", "servicemonitors", "prometheusrules")},
}
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def strip(schema: dict) -> dict:
    """A schema node without its descriptions, recursively (keywords only, not property names)."""
    out = {k: v for k, v in schema.items() if k != "description"}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: strip(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strip(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [strip(s) for s in out[key]]
    return out


def vendor(src: Path, dest: Path = DEST) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    lines = ["# Upstream CRD schemas the tests validate against",
             "", "Structure only: every schema `description` removed by `scripts/vendor_schemas.py`.",
             "Upstream licence of every file: Apache-2.0.", ""]
    for name, origin in SOURCES.items():
        crd = yaml.load((src / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for version in crd["spec"]["versions"]:
            schema = version.get("schema", {}).get("openAPIV3Schema")
            if schema:
                version["schema"]["openAPIV3Schema"] = strip(schema)
        (dest / name).write_text(yaml.dump(crd, Dumper=_DUMPER, sort_keys=False))
        lines.append(f"- `{name}`: {origin}")
    (dest / "SOURCES.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[2].strip())
    vendor(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else DEST)
