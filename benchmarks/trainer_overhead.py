"""Trainer overhead: the real training loop against a bare fwd/bwd/AdamW loop (issue 4).

Setup (the demo, as ``vlmpretrain demo`` runs it): ``examples/demo.yaml``'s model, data
sources, mixture, batch (16 sequences x 96 tokens in 2 micro-batches of 8) and optimizer,
on the demo's synthetic shards (``vlm_trainer.data.synthdata``, generated into a temp dir); a
gloo process group of world size 1 as ``torchrun --nproc-per-node 1`` gives it (at world
size 1 the trainer skips the DDP wrapper, as in the demo), and one intra-op thread, as
``vlmpretrain demo`` runs its worker, so the data worker process has the second core. A
full run repeats the measurement (8 rounds) with every core for compute:
``step_time_ratio_all_cores`` shows what the data path costs when it competes with compute
(no target; on a GPU node the data worker has CPU cores to itself). Two changes, both so that every
measured step is the same kind of work: ``visualIntroduceAt: 0`` (the demo's multimodal
mixture from step 0) and no periodic evaluation. No checkpoints (``VLM_NO_CHECKPOINT=1``: that
cost is the checkpoint area's); metrics registry and the progress file are live, as in the demo.

A = the trainer: ``Trainer.train()`` itself (data worker process, per-step seed, count all-reduce,
micro-steps under ``no_sync``, clipping, schedule, AdamW, metrics, progress line, logs).
B = the bare loop: a second copy of the same model with the same weights (plain module, no
DDP), the same AdamW groups, stepping over the *same micro-batches the trainer just
trained on*, already in memory: forward, summed token loss / label tokens, backward,
``optimizer.step()``, ``zero_grad``. Nothing else.

The trainer drives: after warm-up, every ``chunk`` trainer steps the step observer
(``StepObserver.observe``, wrapped) runs ``chunk`` bare steps over the batches of those trainer steps, so the
schedule is A B A B ... in one process. Cold steps are treated alike in both arms: the
first ``PREFETCH_SKIP`` (2) steps of every chunk run but are not timed, in A (the data
worker had the previous B chunk to fill its queue, and caches were B's) and in B (caches
were A's); both samples are means over the *same* remaining batches of the chunk. A's
sample is the mean wall time between consecutive ``observe`` calls (the whole loop
iteration); B's the mean bare step time. The figure is the median over chunks of A/B with
its bootstrap 95% interval (``harness.bootstrap_ci``) and min-max. Rounds during which
other processes (anything outside this process and its data worker) used more than 15%
of the CPU are left out when enough clean ones remain.

Also measured in the same run: data wait / step time (the trainer's own ``data_wait``
accounting over the A steps) and RSS growth between the end of warm-up and 500 trainer
steps later (PSS of the trainer process and its data worker, psutil's
``memory_full_info``; the bare model and its optimizer exist before the first sample, so
its growth is the loop's, conservatively including the bare loop's).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path

from . import harness

PREFETCH_SKIP = 2
DEMO_THREADS = 1  # `vlmpretrain demo` runs its worker with OMP_NUM_THREADS=1 (trainer/vlm_local/demo.py)
MIN_CLEAN = 3  # rounds free of contention needed before contended ones are left out
# Short chunks, many of them: A and B of a pair run within ~1 s of each other, so the drift of a
# shared machine (seconds to minutes) cancels in the ratio; 6 steps a chunk, 4 of them timed
# after the 2 cold ones. 80 clean pairs give a 95% interval of the median ratio of about
# +-0.02 here (chunks of 25 and 20 pairs: about +-0.06).
CHUNK = 6
ROUNDS = 80  # clean pairs wanted (full run)


# --------------------------------------------------------------------------- the demo setup (shared with data_loader)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_spec(data_dir: Path, *, steps: int) -> dict:
    """examples/demo.yaml's spec with the data in ``data_dir`` and the benchmark changes."""
    import yaml

    from vlm_trainer.data import synthdata

    doc = yaml.safe_load((harness.REPO / "examples" / "demo.yaml").read_text())
    spec = copy.deepcopy(doc["spec"])
    wanted = {s["name"] for s in spec["data"]["sources"]}
    layout = synthdata.generate(data_dir, shards={k: v for k, v in synthdata.DEFAULT_SHARDS.items() if k in wanted})
    for src in spec["data"]["sources"]:
        gen = layout[src["name"]]
        src["uri"] = gen["uri"]
        if "validationUri" in src:
            src["validationUri"] = gen["validationUri"]
    stage = spec["stages"][0]
    stage.update(steps=steps, visualIntroduceAt=0.0, evalInterval=0)
    spec["stages"] = [stage]
    spec["checkpoint"]["uri"] = f"file://{data_dir / 'checkpoints'}"
    return spec


def trainer_config(spec: dict):
    from vlm_api.schema import TrainerConfig

    return TrainerConfig.model_validate({"run": {"name": "bench", "namespace": "default", "uid": "bench"},
                                         "stage": spec["stages"][0]["name"], "spec": spec})


def init_world_of_one():
    """A gloo group of one process, as ``torchrun --nproc-per-node 1`` sets it up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", VLM_FORCE_CPU=os.environ.get("VLM_FORCE_CPU", "1"))
    from vlm_trainer.distributed import init_distributed

    return init_distributed(60)


def bare_copy(trainer):
    """The same model (same weights, same trainable parameters) as a plain module, with
    the trainer's AdamW groups."""
    import torch

    from vlm_trainer.model import build_vlm
    from vlm_trainer.policy import apply_trainable, param_groups
    from vlm_trainer.schedule import build_optimizer

    model = build_vlm(trainer.spec.model, trainer.tok, seed=trainer.seed)
    if getattr(trainer, "attention", None):  # packed: the trainer's attention implementation
        from vlm_trainer.model import set_attention

        set_attention(model.llm, trainer.attention)
    apply_trainable(model, trainer.stage.trainable)
    model.load_state_dict(trainer.vlm.state_dict())
    model.train()
    opt_spec = trainer.stage.optimizer
    optimizer = build_optimizer(param_groups(model, opt_spec.weight_decay), opt_spec, fused=False)
    for group in optimizer.param_groups:
        group["lr"] = opt_spec.lr * 0.1
    return model, optimizer, torch


def bare_step(model, optimizer, micro) -> None:
    from vlm_trainer.model import flattens, loss_sum

    flatten = flattens(getattr(model.llm.config, "_attn_implementation", None))

    label_tokens = max(1, sum(b.n_label_tokens for b in micro))
    for b in micro:
        if b.packed and flatten:  # as Trainer.train_step does for packed batches (data.packing)
            b = b.flattened()
        logits = model(b.input_ids, b.attention_mask, b.pixel_values, n_image_positions=b.n_image_tokens,
                       position_ids=b.position_ids, flash_kwargs=b.flash_kwargs)
        (loss_sum(logits, b.labels) / label_tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def quiet_logging(log_file: Path) -> None:
    """The trainer logs at INFO as in a real run, into a file instead of the terminal."""
    logging.basicConfig(level=logging.INFO, filename=str(log_file), force=True,
                        format="%(asctime)s [rank0] %(levelname)s %(name)s: %(message)s")


def metric_series(reg) -> dict:
    """Series rank 0 exposes after a demo run (trainer families, plus the checkpoint
    manager's when it can be registered): the per-run Prometheus cardinality."""
    from prometheus_client import generate_latest

    def count(text: str) -> tuple[int, int, int, int]:
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
        hist = {name for name, kind in types.items() if kind == "histogram"}

        def family(line: str) -> str:
            name = line.split("{")[0].split(" ")[0]
            for suffix in ("_bucket", "_count", "_sum", "_created"):
                if name.endswith(suffix) and name[: -len(suffix)] in hist:
                    return name[: -len(suffix)]
            return name

        return (len(types), len(lines), sum(1 for line in lines if "_created" not in line.split("{")[0].split(" ")[0]),
                sum(1 for line in lines if family(line) in hist))

    keys = ("families", "series", "series_without_created", "histogram_series")
    out = dict(zip(("trainer_" + k for k in keys), count(generate_latest(reg).decode())))
    try:
        from vlm_trainer.checkpoint.metrics import CheckpointMetrics

        CheckpointMetrics(reg)
        out.update(zip(keys, count(generate_latest(reg).decode())))
    except Exception as exc:  # the checkpoint module may be absent or refuse a second registration
        out.update({k: out["trainer_" + k] for k in keys}, note=f"checkpoint metrics not counted: {exc}")
    return out


# --------------------------------------------------------------------------- the measurement


class _Interleaver:
    """The A/B scheduler, run by the trainer's step observer after every step."""

    def __init__(self, trainer, model, optimizer, *, warmup: int, chunk: int, rounds: int, rss_steps: int,
                 budget_s: float, clean_wanted: int | None = None):
        self.deadline = time.monotonic() + budget_s
        self.out_of_time = False
        self.trainer, self.model, self.optimizer = trainer, model, optimizer
        self.warmup, self.chunk, self.rounds, self.rss_steps = warmup, chunk, rounds, rss_steps
        self.clean_wanted = rounds if clean_wanted is None else clean_wanted
        self.batches: list = []  # micro-batches of the current A chunk
        self.intervals: list[float] = []  # current A chunk
        self.a: list[float] = []
        self.b: list[float] = []
        self.order: list[tuple[str, int]] = []
        self.waits: list[tuple[float, float]] = []  # (wait, interval) of the current A chunk's measured steps
        self.chunk_waits: list[tuple[float, float, int]] = []  # per round: (wait sum, interval sum, steps)
        self.foreign: list[float | None] = []  # per round: CPU share of other processes during A + B
        self.chunk_train_step: list[float] = []  # per round: mean Trainer.train_step time
        self.meter = harness.ForeignCpu()
        self.a_steps = 0
        self.skip = 0
        self.rss: list[tuple[int, int]] = []  # (trainer step, bytes)
        self.rss_start_step: int | None = None
        self.t_last = None
        self._wait = 0.0
        self.train_step_s: list[float] = []

    # wrappers installed on the trainer instance
    def wrap(self) -> None:
        tr = self.trainer
        inner_step, inner_observe = tr.train_step, tr.observer.observe

        def train_step(rank_step):
            t0 = time.perf_counter()
            out = inner_step(rank_step)
            self.train_step_s.append(time.perf_counter() - t0)
            self.batches.append(rank_step.micro)
            return out

        def observe(rank_step, out, dt, wait):
            self._wait = wait
            inner_observe(rank_step, out, dt, wait)
            self.after_step(tr, tr.progress.step)

        tr.train_step = train_step
        tr.observer.observe = observe

    def after_step(self, trainer, step: int) -> None:
        now = time.perf_counter()
        interval = None if self.t_last is None else now - self.t_last
        if step <= self.warmup:
            self.batches.clear()
            self.train_step_s.clear()
            if step == self.warmup:
                self._sample_rss(step)
                self.rss_start_step = step
                self.meter.start()
                self.skip = PREFETCH_SKIP  # every chunk, the first one included, starts with untimed steps
            self.t_last = time.perf_counter()
            return
        if self.skip > 0:
            self.skip -= 1
        elif interval is not None:
            self.intervals.append(interval)
            self.waits.append((self._wait, interval))
        if step % self.chunk == self.warmup % self.chunk and step > self.warmup:
            self._sample_rss(step)
            rnd = len(self.a)
            self.a.append(sum(self.intervals) / max(1, len(self.intervals)))
            self.order.append(("A", rnd))
            self.chunk_waits.append((sum(w for w, _ in self.waits), sum(t for _, t in self.waits), len(self.waits)))
            self.chunk_train_step.append(sum(self.train_step_s) / max(1, len(self.train_step_s)))
            self.intervals, self.waits, self.train_step_s = [], [], []
            batches, self.batches = self.batches, []
            timed = []
            for i, micro in enumerate(batches):
                t0 = time.perf_counter()
                bare_step(self.model, self.optimizer, micro)
                if i >= PREFETCH_SKIP:  # the same steps A timed: its first PREFETCH_SKIP are untimed too
                    timed.append(time.perf_counter() - t0)
            self.b.append(sum(timed) / max(1, len(timed)))
            self.order.append(("B", rnd))
            self.foreign.append(self.meter.stop())
            self.meter.start()
            self.skip = PREFETCH_SKIP
            clean = sum(1 for f in self.foreign if f is not None and f <= harness.CONTENDED)
            # go on until `rounds` pairs free of other processes' load exist (a contended
            # machine takes longer), the RSS span is covered, or the time budget is spent
            done = clean >= self.clean_wanted and len(self.a) >= self.rounds and step - self.warmup >= self.rss_steps
            if not done and len(self.a) >= 2 and time.monotonic() > self.deadline:
                done = self.out_of_time = True  # a contended machine: report what was measured
            if done:
                trainer.stop_at = step  # the loop ends here; the stage's schedule is unchanged
        self.t_last = time.perf_counter()

    def _sample_rss(self, step: int) -> None:
        import gc

        gc.collect()
        self.rss.append((step, harness.tree_pss_bytes()))


def run(quick: bool) -> dict:
    """The demo's threading (one intra-op thread; the data worker process has the other
    core), then, in a full run, every core for compute: the data worker competes for them."""
    out = _measure(quick, threads=DEMO_THREADS)
    cores = os.cpu_count() or 1
    if not quick and cores > DEMO_THREADS:
        other = _measure(quick, threads=cores, rounds=20, rss_steps=0, budget_s=90)
        for f in other["figures"]:
            if f["name"] in ("step_time_ratio", "data_wait_share"):
                f.pop("target_id", None)
                f["name"] += "_all_cores"
                f["description"] += f" ({cores} intra-op threads: the data worker competes with compute for the cores)"
                out["figures"].append(f)
        out["params"]["all_cores"] = other["params"]
    return out


def _measure(quick: bool, *, threads: int, rounds: int | None = None, rss_steps: int | None = None,
             chunk: int | None = None, budget_s: float | None = None) -> dict:
    import torch

    from vlm_trainer import metrics as vmetrics
    from vlm_trainer.train import Trainer

    torch.set_num_threads(threads)
    warmup = 10 if quick else 30
    chunk = chunk or CHUNK
    rounds = rounds or (4 if quick else ROUNDS)
    rss_steps = (40 if quick else 500) if rss_steps is None else rss_steps
    budget_s = budget_s or (40 if quick else 240)  # + the all-cores pass: under the 420 s area limit
    steps_needed = warmup + 4 * max(rounds * chunk, rss_steps) + chunk + 5  # room for contended rounds
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("VLM_METRICS_PORT", "0")
        os.environ["VLM_PROGRESS_FILE"] = str(tmp / "progress.jsonl")
        os.environ["VLM_NO_CHECKPOINT"] = "1"
        quiet_logging(tmp / "trainer.log")
        t_setup = time.perf_counter()
        spec = demo_spec(tmp / "data", steps=steps_needed)
        cfg = trainer_config(spec)
        ctx = init_world_of_one()
        vmetrics.reset_registry()
        inter = _Interleaver(None, None, None, warmup=warmup, chunk=chunk, rounds=rounds, rss_steps=rss_steps,
                             budget_s=budget_s, clean_wanted=min(rounds, MIN_CLEAN) if quick else rounds)
        trainer = Trainer(cfg, ctx=ctx)
        model, optimizer, _ = bare_copy(trainer)
        inter.trainer, inter.model, inter.optimizer = trainer, model, optimizer
        inter.wrap()
        setup_s = time.perf_counter() - t_setup
        t0 = time.perf_counter()
        try:
            result = trainer.train()
            series = metric_series(trainer.metrics.registry)
        finally:
            trainer.close()
            from vlm_trainer.distributed import shutdown

            shutdown(ctx)
        train_s = time.perf_counter() - t0

    used, contended = harness.select_clean(inter.foreign, threshold=harness.CONTENDED, min_clean=min(rounds, MIN_CLEAN))
    a = [inter.a[i] for i in used]
    b = [inter.b[i] for i in used]
    r = harness.ratios(a, b)
    cw = [inter.chunk_waits[i] for i in used]
    shares = [w / t for w, t, _ in cw if t > 0]
    total_wait = sum(w for w, _, _ in cw)
    total_time = sum(t for _, t, _ in cw)
    n_steps = sum(n for _, _, n in cw)
    rss0_step, rss0 = inter.rss[0]
    end_step = rss0_step + rss_steps
    rss_end = next(((s, b) for s, b in inter.rss if s >= end_step), inter.rss[-1])
    growth = (rss_end[1] - rss0) / rss0
    rss_span = rss_end[0] - rss0_step
    # the target is over 500 steps: a shorter span (quick mode, or out of time) is named for what it is
    rss_name = "rss_growth_500_steps" if rss_span >= 500 else f"rss_growth_{rss_span}_steps"
    seqs = trainer.global_batch
    seq_len = trainer.spec.data.seq_length
    tokens_per_step = seqs * seq_len
    a_med = harness.median(a)
    ts_med = harness.median([inter.chunk_train_step[i] for i in used])
    clean_note = (f"{len(used)} of {len(inter.a)} rounds (those where other processes used <= "
                  f"{100 * harness.CONTENDED:.0f}% of the CPU)" if not contended else
                  f"all {len(inter.a)} rounds: too few were free of other processes' load")
    figures = [
        harness.Figure.from_samples(
            "step_time_ratio", r, unit="ratio",
            baseline="bare fwd/bwd/AdamW loop, same model copy and batches, same process, A B A B",
            description="trainer step time / bare loop step time", target_id="trainer.step_overhead",
            extra={"chunk_steps": chunk, "timed_steps_per_chunk": chunk - PREFETCH_SKIP, "warmup_steps": warmup,
                   "rounds": clean_note}),
        harness.Figure.from_samples(
            "data_wait_share", shares, unit="share",
            baseline=f"trainer's own data-wait accounting over the measured steps ({n_steps} steps)",
            description="data wait / step time (median over chunks)", target_id="trainer.data_wait_share",
            extra={"all_chunks_pooled": total_wait / total_time if total_time else math.nan, "steps": n_steps}),
        harness.Figure(rss_name, growth, "share", n=rss_span,
                       baseline=f"RSS at step {rss0_step} (after warm-up) vs. step {rss_end[0]}",
                       description=f"RSS growth over {rss_end[0] - rss0_step} trainer steps",
                       target_id="trainer.rss_growth" if rss_span >= 500 else None,
                       extra={"rss_start_mib": rss0 / 2**20, "rss_end_mib": rss_end[1] / 2**20,
                              "steps": rss_end[0] - rss0_step}),
        harness.Figure.from_samples("trainer_step_ms", [1000 * x for x in a], unit="ms",
                                    description="trainer loop iteration (median of chunk means)"),
        harness.Figure.from_samples("bare_step_ms", [1000 * x for x in b], unit="ms",
                                    description="bare fwd/bwd/AdamW step (median of chunk means)"),
        harness.Figure("train_step_call_ms", 1000 * ts_med, "ms", n=len(used),
                       description="Trainer.train_step alone (no data, no metrics): the compute part of A"),
        harness.Figure("prometheus_series_per_run", float(series["series"]), "series", baseline="rank-0 /metrics after the run",
                       description=f"{series['families']} families; {series['series_without_created']} without `_created` "
                                   f"(demo: 3 sources, 2 validation sources)", extra=series),
        harness.Figure("trainer_tokens_per_s", tokens_per_step / a_med, "tokens/s",
                       description=f"sequence capacity {seqs} x {seq_len} per step / trainer step time"),
    ]
    return {
        "status": "ok",
        "contended": contended,  # the area's own verdict: its figures use only pairs free of other load
        "figures": [f.as_dict() for f in figures],
        "params": {"config": "examples/demo.yaml (visualIntroduceAt 0, no eval)", "world_size": 1,
                   "strategy": trainer.par.strategy, "global_batch_sequences": seqs, "seq_length": seq_len,
                   "micro_batch_size": trainer.stage.micro_batch_size, "llm_params": trainer.llm_params,
                   "vision_params": trainer.vision_params, "torch_threads": torch.get_num_threads(),
                   "warmup_steps": warmup, "chunk_steps": chunk, "rounds": len(inter.a),
                   "trainer_steps": result.step, "out_of_time": inter.out_of_time, "setup_s": round(setup_s, 2), "train_s": round(train_s, 2)},
        "samples": {"a_step_s": inter.a, "b_step_s": inter.b, "ratios_used": r, "rounds_used": used,
                    "foreign_cpu_per_round": inter.foreign, "order": inter.order,
                    "rss": [{"step": s, "mib": round(b / 2**20, 2)} for s, b in inter.rss]},
    }
