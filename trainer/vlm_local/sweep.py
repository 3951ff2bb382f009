"""`vlmpretrain local SWEEP.yaml`: a VLMPretrainSweep's runs on this machine.

The children are the operator's (`vlm_api.sweep_grid.children`: same names, specs and
order, every point once per seed, seed-major). Each runs as `vlmpretrain local` does
(`vlm_local.runner`, in its own process so parallel points never share a process tracker
or signal handlers), one after another by default, `--parallel N` at once. Layout, under
the sweep's run directory (default `runs/<sweep>`):

- `<run>/run.yaml`: the child manifest; `<run>/`: its run directory (configs, progress,
  logs, termination logs); `<run>/local.log`: its runner's output;
- `<run>/point.json`: the point's result, written when its runner ends (`--grounding`: with
  the true- vs mismatched-image caption loss at the objective stage's final checkpoint);
- `results.json`, `results.md`, `results.png` (`vlm_local.sweep_results`).

A point's losses are what the trainer confirmed with each stage's final checkpoint (the
termination log, as on a cluster), never a progress line. Re-running the same command
resumes: a point that succeeded is skipped, any other is run again (its runner resumes
from its newest committed checkpoint). Ctrl-C stops the running points (their runners
stop at a step boundary) and starts no other; the results cover what has finished.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import yaml

from vlm_api import stage_policy, sweep_grid
from vlm_api.sweep_validate import validate_sweep_object, with_defaults

from . import sweep_results
from .runner import LocalRunError, free_port

TERMINATION_GLOB = "termination-*.json"
INTERRUPTED = 130  # the runner's exit code after Ctrl-C (vlm_local.runner.EXIT_INTERRUPTED)


def load(path: str) -> dict:
    """The sweep object of a manifest (defaults filled in); LocalRunError naming the problem."""
    from vlm_api.validate import load_documents

    try:
        docs = load_documents(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise LocalRunError(f"{path}: {exc}") from None
    sweeps = [d for d in docs if isinstance(d, dict) and d.get("kind") == "VLMPretrainSweep"]
    if len(sweeps) != 1:
        raise LocalRunError(f"{path}: expected exactly one VLMPretrainSweep, found {len(sweeps)}")
    problems = validate_sweep_object(sweeps[0])
    if problems:
        raise LocalRunError("\n".join(f"{path}: {p}" for p in problems))
    return dict(sweeps[0], spec=with_defaults(sweeps[0]["spec"]))


def is_sweep(path: str) -> bool:
    """Whether a manifest file holds a VLMPretrainSweep (anything unreadable is left to the
    run's loader, which says what is wrong)."""
    from vlm_api.validate import load_documents

    try:
        docs = load_documents(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return any(isinstance(d, dict) and d.get("kind") == "VLMPretrainSweep" for d in docs)


def confirmed(run_dir: Path, stages: list[str]) -> dict[str, dict]:
    """Each stage's confirmation from its replicas' termination logs (stage_policy)."""
    out = {}
    for stage in stages:
        messages = []
        for p in sorted((run_dir / stage).glob(TERMINATION_GLOB)):
            try:
                messages.append(p.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
        final = stage_policy.confirmed_final(messages, stage)
        if final is not None:
            out[stage] = final
    return out


def point_result(point: dict, seed: int, manifest: dict, run_dir: Path, rc: int, wall: float, objective: dict) -> dict:
    stages = [s["name"] for s in manifest["spec"]["stages"]]
    finals = confirmed(run_dir, stages)
    ok = rc == 0 and all(s in finals for s in stages)
    record = {"name": sweep_grid.point_name(manifest["metadata"]["labels"]["pretrain.vlm.dev/sweep"], point),
              "parameters": point, "seed": seed, "run": manifest["metadata"]["name"],
              "status": "succeeded" if ok else "failed", "exitCode": rc, "wallSeconds": round(wall, 1)}
    status = {"phase": "Succeeded" if ok else "Failed",
              "finalCheckpoints": {k: {**v, "validationLoss": v.get("validationLoss") or {}} for k, v in finals.items()}}
    result = sweep_grid.run_result(status, objective["stage"])
    record["validationLoss"] = result.get("validationLoss", {})
    record["stages"] = result.get("stages", {})
    record["tokens"] = result.get("tokens", 0)
    return record


def grounding(run_dir: Path, stage: str, uri: str) -> dict:
    """Caption loss with the true vs a mismatched image at a final checkpoint
    (`vlm_trainer.grounding`, as the demo checks it): how much the model uses its images."""
    from vlm_trainer import grounding as g

    config = run_dir / stage / "config.yaml"
    r = g.evaluate_checkpoint(uri, config=str(config) if config.is_file() else None)
    return {"stage": stage, "trueLoss": round(r.true_loss, 6), "mismatchedLoss": round(r.mismatched_loss, 6),
            "blankLoss": round(r.blank_loss, 6), "ratio": round(r.ratio, 4)}


def _run_point(manifest: dict, run_dir: Path, nproc: int | None, env: dict) -> tuple[int, float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    file = run_dir / "run.yaml"
    file.write_text(yaml.safe_dump(manifest, sort_keys=False))
    cmd = [sys.executable, "-m", "vlm_local.runner", str(file), "--run-dir", str(run_dir),
           "--metrics-port", str(free_port()), "--progress", "plain"]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    t0 = time.monotonic()
    with open(run_dir / "local.log", "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.monotonic() - t0


def run_sweep(path: str, *, parallel: int = 1, nproc: int | None = None, run_dir: str | None = None,
              with_grounding: bool = False, out: IO[str] | None = None) -> int:
    """Run (or resume) a sweep's points; write its results. 0 when one or more points
    succeeded (a failed point does not fail the sweep unless all fail)."""
    out = out or sys.stdout
    sweep = load(path)
    name, spec = sweep["metadata"]["name"], sweep["spec"]
    root = Path(run_dir or Path("runs") / name).resolve()
    root.mkdir(parents=True, exist_ok=True)
    children = list(sweep_grid.children(sweep))
    records: dict[str, dict] = {}
    todo = []
    for point, seed, manifest in children:
        done = root / manifest["metadata"]["name"] / "point.json"
        previous = json.loads(done.read_text()) if done.is_file() else None
        if previous and previous.get("status") == "succeeded":
            records[manifest["metadata"]["name"]] = previous
        else:
            todo.append((point, seed, manifest))
    out.write(f"sweep {name}: {len(children)} runs ({len(children) - len(todo)} done), "
              f"{max(1, parallel)} at a time; run directory {os.path.relpath(root)}\n")
    out.flush()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    stop = threading.Event()  # Ctrl-C: the runners stop their stages; no further point starts

    def one(item: tuple[dict, int, dict]) -> dict | None:
        point, seed, manifest = item
        run = manifest["metadata"]["name"]
        if stop.is_set():
            return None
        out.write(f"  start {run} {json.dumps(point, sort_keys=True)} seed {seed}\n")
        out.flush()
        rc, wall = _run_point(manifest, root / run, nproc, env)
        if rc in (INTERRUPTED, -signal.SIGINT) or stop.is_set():
            stop.set()
            out.write(f"  stopped   {run}: run the same command again to resume it\n")
            return None  # no point.json: the next invocation resumes it
        record = point_result(point, seed, manifest, root / run, rc, wall, spec["objective"])
        stage = spec["objective"]["stage"]
        if with_grounding and record["status"] == "succeeded":
            uri = confirmed(root / run, [stage])[stage]["uri"]
            record["grounding"] = grounding(root / run, stage, uri)
        (root / run / "point.json").write_text(json.dumps(record, indent=2) + "\n")
        value = record["validationLoss"].get(spec["objective"]["modality"])
        out.write(f"  {record['status']:9s} {run} in {wall:.0f}s: "
                  f"{spec['objective']['modality']} validation loss {value if value is not None else '-'}\n")
        out.flush()
        return record

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(one, item) for item in todo]
        try:
            concurrent.futures.wait(futures)
        except KeyboardInterrupt:  # the runners, in the same process group, got the SIGINT too
            stop.set()
            concurrent.futures.wait(futures)
    for future in futures:
        record = future.result()
        if record is not None:
            records[record["run"]] = record
    ordered = [records[m["metadata"]["name"]] for _, _, m in children if m["metadata"]["name"] in records]
    written = sweep_results.write(root, sweep, ordered)
    out.write("\n" + (root / "results.md").read_text())
    out.write(f"\nresults: {', '.join(os.path.relpath(p) for p in written)}\n")
    out.flush()
    if stop.is_set():
        return INTERRUPTED
    return 0 if any(r["status"] == "succeeded" for r in ordered) else 1


# `vlmpretrain local` options of a single run that a sweep does not take (each run has its own).
RUN_ONLY = ("nnodes", "checkpoint_dir", "max_steps", "metrics_port", "stage")


def main(args) -> int:
    given = [f"--{k.replace('_', '-')}" for k in RUN_ONLY if getattr(args, k, None) is not None]
    if given:
        print(f"error: {', '.join(given)}: options of a single run; a sweep's runs take them from its template",
              file=sys.stderr)
        return 2
    try:
        return run_sweep(args.file, parallel=args.parallel or 1, nproc=args.nproc, run_dir=args.run_dir,
                         with_grounding=bool(getattr(args, "grounding", False)))
    except LocalRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
