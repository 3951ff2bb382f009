"""`vlmpretrain demo` until local runs land: validate the demo recipe and show what it renders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .render import render_manifest
from .validate import load_documents, validate_text


def main(args: argparse.Namespace) -> int:
    text = Path(args.file).read_text()
    problems = validate_text(text)
    for p in problems:
        print(f"{args.file}: {p}")
    if problems:
        return 1
    for doc in load_documents(text):
        objs = render_manifest(doc)
        print(f"{args.file}: valid; stage {objs[0]['metadata']['labels']['pretrain.vlm.dev/stage']!r} renders:")
        for obj in objs:
            print(f"  {obj['kind']}/{obj['metadata']['name']}")
        sys.stdout.write(yaml.safe_dump(objs[1]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0], sort_keys=False))
    return 0
