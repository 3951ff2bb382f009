"""Data loader headroom: samples/s the data path delivers / samples/s the model consumes (issue 4).

Setup: the demo (``examples/demo.yaml``: model, sources, mixture, 16 sequences x 96 tokens
per step in micro-batches of 8) on its synthetic shards, ``visualIntroduceAt: 0`` so every
step carries the multimodal mixture (the expensive case: PNG decode, resize, normalise).
Single process (world size 1: this rank decodes every slot of the step).

A = the data path the trainer runs in its background thread: ``StepLoader.build`` of the
next ``k`` step plans (shard read, sample decode, image preprocessing, tokenisation,
sequence building, collation into micro-batches), called directly (no thread, so nothing
competes with it) -> delivered samples/s.
B = the model consuming exactly those batches: the bare fwd/bwd/AdamW step of
``trainer_overhead`` on the same model -> consumed samples/s (the bare loop is faster than
the trainer, so this is the stricter denominator).

Rounds alternate A B A B after one warm-up round; the figure is the median over rounds of
(A samples/s) / (B samples/s) with min-max. Headroom >= 3 means one loader thread keeps a
model fed with 3x margin. In training both share the machine's cores; the cost of that is
what ``trainer_overhead``'s data-wait share shows. Rounds during which other processes used
more than 15% of the CPU are left out (whole pairs) when at least 3 rounds were clean.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from . import harness
from .trainer_overhead import bare_copy, bare_step, demo_spec, quiet_logging, trainer_config


def run(quick: bool) -> dict:
    import torch

    from vlm_trainer import metrics as vmetrics
    from vlm_trainer.data.loader import StepLoader
    from vlm_trainer.train import Trainer

    steps_per_round = 5 if quick else 10
    repeats = 3 if quick else 10
    warmup = 1
    total_steps = (repeats + warmup) * steps_per_round + 5
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        quiet_logging(tmp / "trainer.log")
        for var in ("MASTER_ADDR", "RANK", "WORLD_SIZE"):
            os.environ.pop(var, None)  # a plain process: no group
        os.environ["VLM_FORCE_CPU"] = os.environ.get("VLM_FORCE_CPU", "1")
        os.environ["VLM_NO_CHECKPOINT"] = "1"  # the data path only
        vmetrics.reset_registry()
        spec = demo_spec(tmp / "data", steps=total_steps)
        trainer = Trainer(trainer_config(spec), serve_metrics=False)
        model, optimizer, _ = bare_copy(trainer)
        loader = StepLoader(trainer.planner, trainer.sources, trainer.builder, rank=0, world_size=1,
                            micro_batch_size=trainer.stage.micro_batch_size, worker="inline")
        state = {"steps": [], "samples": 0}
        per_round = []

        def deliver() -> float:
            t0 = time.perf_counter()
            steps = [loader.build(loader.planner.next()) for _ in range(steps_per_round)]
            dt = time.perf_counter() - t0
            samples = sum(b.n_sequences for s in steps for b in s.micro)
            state.update(steps=steps, samples=samples)
            per_round.append({"samples": samples, "deliver_s": dt,
                              "images": sum(b.n_images for s in steps for b in s.micro),
                              "skipped": sum(s.skipped for s in steps)})
            return samples / dt

        def consume() -> float:
            t0 = time.perf_counter()
            for s in state["steps"]:
                bare_step(model, optimizer, s.micro)
            dt = time.perf_counter() - t0
            per_round[-1]["consume_s"] = dt
            return state["samples"] / dt

        try:
            p = harness.paired(deliver, consume, repeats=repeats, warmup=warmup,
                              exclude_contended=harness.CONTENDED, min_clean=3)
        finally:
            loader.close()
            trainer.close()
        params = {"config": "examples/demo.yaml (visualIntroduceAt 0)", "steps_per_round": steps_per_round,
                  "global_batch_sequences": trainer.global_batch, "seq_length": trainer.spec.data.seq_length,
                  "image_size": trainer.vlm.image_spec.size if trainer.vlm.image_spec else None,
                  "torch_threads": torch.get_num_threads(), "rounds": repeats, "warmup_rounds": warmup}
    measured = [per_round[warmup + i] for i in p.used]
    figures = [
        harness.Figure.from_paired("loader_headroom", p, target_id="data.headroom",
                                   baseline="bare fwd/bwd/AdamW on the same batches, same process, A B A B",
                                   description="samples/s the data path delivers / samples/s the model consumes"),
        harness.Figure("loader_samples_per_s", p.a_summary.median, "samples/s", p.a_summary.min, p.a_summary.max,
                       p.a_summary.n, description="StepLoader.build, one thread, demo mixture"),
        harness.Figure("model_samples_per_s", p.b_summary.median, "samples/s", p.b_summary.min, p.b_summary.max,
                       p.b_summary.n, description="bare fwd/bwd/AdamW on the same batches"),
    ]
    images = sum(r["images"] for r in measured)
    deliver_s = sum(r["deliver_s"] for r in measured)
    if images:
        figures.append(harness.Figure("loader_images_per_s", images / deliver_s, "images/s",
                                      description="images decoded and preprocessed per second by the data path"))
    return {"status": "ok", "contended": p.contended, "figures": [f.as_dict() for f in figures], "params": params,
            "samples": {**p.as_dict(), "rounds": measured}}
