"""`vlmpretrain demo`: a tiny VLM pretrained on this machine, and proof that it uses its images.

1. Data: `vlm_trainer.data.synthdata` writes ``runs/demo-data/`` (coloured shapes with
   captions, text documents, interleaved documents, instructions) unless it is already
   complete (its ``synthdata.json`` is written last and records the parameters).
2. Training: ``vlmpretrain local examples/demo.yaml`` (`vlm_local.runner`): a text-only
   warm-up, images entering at ``visualIntroduceAt``, then an SFT stage that trains a
   sparse visual region of the LLM. A second run resumes (complete stages are skipped).
3. Grounding (`vlm_trainer.grounding`): caption loss on held-out image-text samples with
   the true image vs a mismatched one, from the final committed checkpoint of each stage
   that saw images; the last stage must reach :data:`GROUNDING_THRESHOLD`.
4. Where everything went and how to look at it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import yaml

from .runner import LocalOptions, LocalRunError, missing_shards, run_local

DEFAULT_FILE = "examples/demo.yaml"
DATA_DIR = "runs/demo-data"
SAMPLES_PER_SHARD = 500
SEED = 0
# Measured on 2 CPU cores (see README "Local runs and the demo"): the final checkpoint's
# mismatched-image caption loss is well above this multiple of the true-image loss.
GROUNDING_THRESHOLD = 1.5


def repo_root() -> Path | None:
    """The source checkout this package was installed from (editable install), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / DEFAULT_FILE).is_file() else None


def resolve_base(file: str) -> tuple[Path, Path]:
    """(working directory for the run, recipe path). Relative paths in the demo recipe
    (``./runs/...``) are relative to the repository root, so the demo runs from there."""
    p = Path(file)
    if p.is_file():
        return Path.cwd(), p.resolve()
    root = repo_root()
    if file == DEFAULT_FILE and root is not None:
        return root, root / DEFAULT_FILE
    raise LocalRunError(f"{file}: not found (run from the repository root, or pass --file)")


def ensure_data(base: Path, recipe: Path, out=sys.stdout) -> Path:
    """Generate the demo dataset unless it is complete; check the recipe's shards exist."""
    from vlm_api import schema

    from vlm_trainer.data import synthdata

    data = base / DATA_DIR
    marker = data / "synthdata.json"
    want = {"seed": SEED, "samples_per_shard": SAMPLES_PER_SHARD, "shards": dict(synthdata.DEFAULT_SHARDS)}
    have = None
    if marker.is_file():
        try:
            have = json.loads(marker.read_text())
        except ValueError:
            have = None
    if not have or any(have.get(k) != v for k, v in want.items()):
        t0 = time.monotonic()
        out.write(f"generating the demo dataset in {DATA_DIR}/ (first run only) ...\n")
        out.flush()
        synthdata.generate(data, seed=SEED, samples_per_shard=SAMPLES_PER_SHARD, shards=synthdata.DEFAULT_SHARDS)
        out.write(f"  done in {time.monotonic() - t0:.1f}s: " + ", ".join(
            f"{name} ({n} shards)" for name, n in synthdata.DEFAULT_SHARDS.items()) + "\n")
    else:
        out.write(f"demo dataset: {DATA_DIR}/ (complete, reused)\n")
    doc = yaml.safe_load(recipe.read_text())
    spec = schema.parse_spec(doc["spec"])
    missing = [m for st in spec.stages for m in missing_shards(spec, st, base)]
    if missing:
        raise LocalRunError(f"{recipe}: {len(missing)} shard file(s) the recipe reads are missing, e.g. {missing[0]}")
    return data


def grounding_report(result, out=sys.stdout, threshold: float = GROUNDING_THRESHOLD) -> tuple[bool, list[dict]]:
    """Evaluate the final checkpoint of every stage that saw images; the last one must pass."""
    from vlm_trainer import grounding

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    rows = []
    stages = [st for st in result.stages if st.stage in result.final_checkpoints]
    if not stages:
        out.write("grounding: no final checkpoint to evaluate\n")
        return False, rows
    ok = True
    for i, st in enumerate(stages):
        uri = result.final_checkpoints[st.stage]
        config = result.run_dir / st.stage / "config.yaml"
        t0 = time.monotonic()
        r = grounding.evaluate_checkpoint(uri, config=str(config) if config.is_file() else None)
        last = i == len(stages) - 1
        out.write(f"\n[{st.stage}] " + grounding.format_result(r, threshold if last else None)
                  + f"\n  ({time.monotonic() - t0:.1f}s, checkpoint {uri})\n")
        rows.append({"stage": st.stage, **r.as_dict(), "threshold": threshold if last else None})
        if last:
            ok = r.ratio >= threshold
    out.flush()
    return ok, rows


def main(args: argparse.Namespace) -> int:
    out = sys.stdout
    t_start = time.monotonic()
    try:
        base, recipe = resolve_base(args.file)
        if base != Path.cwd():
            out.write(f"running in {base} (the repository root: the recipe's paths are relative to it)\n")
            os.chdir(base)
        ensure_data(base, recipe, out)
        # The demo's model is tiny: one thread per process is as fast as two on a quiet machine and
        # much faster on a busy one (OpenMP threads that wait for a core spin). Yours wins if set.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        opts = LocalOptions(file=str(recipe), nproc=getattr(args, "nproc", None), run_dir=getattr(args, "run_dir", None),
                            progress=getattr(args, "progress", "auto") or "auto")
        result = run_local(opts, out, base=base)
    except LocalRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.exit_code != 0:
        return result.exit_code
    ok = True
    if not getattr(args, "skip_grounding", False):
        ok, rows = grounding_report(result, out)
        (result.run_dir / "grounding.json").write_text(json.dumps(rows, indent=2) + "\n")
    rd = os.path.relpath(result.run_dir, base)
    last = result.stages[-1].stage if result.stages else "<stage>"
    out.write(f"""
where things are (and how to look at them):
  checkpoints   {result.checkpoint_uri}/<stage>/step-<N>/  (DCP shards + COMMITTED manifest, written last)
                cat {rd}/checkpoints/{last}/step-*/COMMITTED | python -m json.tool
  progress      {rd}/<stage>/progress.jsonl  (one JSON line per step/eval/checkpoint; what the bars showed)
  metrics       while a stage trains, rank 0 serves Prometheus text: curl -s localhost:<port>/metrics | grep vlmtrain_
                (port printed at the stage start; the same series a cluster run exports to Prometheus/Grafana)
  logs          {rd}/logs/torchx/<app>/  (torchx: trainer/<replica>/*.log; torchelastic/: every rank)
  summary       {rd}/summary.json, {rd}/grounding.json
  grounding     python -m vlm_trainer.grounding {result.checkpoint_uri}/{last}/ --config {rd}/{last}/config.yaml
  on a cluster  the same recipe with s3:// data and checkpoint URIs (like examples/run.yaml):
                kubectl apply -f FILE; `vlmpretrain render FILE --stage S` shows the PyTorchJob it becomes
demo finished in {time.monotonic() - t_start:.0f}s; run it again to resume (complete stages are skipped)
""")
    out.flush()
    return 0 if ok else 1
