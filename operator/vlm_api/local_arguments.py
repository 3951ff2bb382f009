"""The options of a local run: `vlmpretrain local` and `python -m vlm_local.runner` (what a
sweep's points run) parse the same arguments."""

from __future__ import annotations

import argparse


def local_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `vlmpretrain local` (also `python -m vlm_local.runner`, which a sweep's
    points run)."""
    p.add_argument("file", metavar="FILE", help="VLMPretrainRun or VLMPretrainSweep manifest, e.g. examples/demo.yaml")
    p.add_argument("--nproc", type=int, help="worker processes per node (default: 1 on CPU, gpusPerNode with GPUs)")
    p.add_argument("--nnodes", metavar="MIN:MAX", help="torchrun agents on localhost, an elastic range (default: the recipe's)")
    p.add_argument("--checkpoint-dir", help="use this directory instead of spec.checkpoint.uri")
    p.add_argument("--max-steps", type=int, help="stop every stage after this many steps (resumable later)")
    p.add_argument("--metrics-port", type=int, help="rank 0's Prometheus port (default: spec.metrics.port, else a free one)")
    p.add_argument("--stage", help="run only this stage (initialised from the previous stage's final checkpoint)")
    p.add_argument("--run-dir", help="configs, progress files, logs, summary (default: runs/<name>)")
    p.add_argument("--progress", choices=["auto", "bar", "plain"], default="auto", help="bar or plain log lines")
    p.add_argument("--pvc", action="append", metavar="CLAIM=DIR", help="read pvc://CLAIM/... data from DIR (repeatable)")
