"""The training loop of one stage (the process around it: `vlm_trainer/main.py`).

Build order (:class:`Trainer`): process group -> tokenizer -> VLM (same seed on every
rank) -> trainable policy -> DDP/FSDP2 -> AdamW groups -> data (probe, planner, stage
length) -> schedule -> metrics/progress. Then :meth:`Trainer.train`:

    checkpoint.restore()                    # resume this stage / init from the previous one
    loop until step == stop_at:
        rank batches of the step (prefetched)
        one all-reduce: label/text/image token counts, images per micro-step, stop flag
        micro-steps: loss_sum * world / global_label_tokens, backward (sync on the last)
        clip, lr, AdamW step; metrics, log line, progress line
        evaluation every evalInterval steps
        checkpoint.after_step(step)         # the manager decides (interval)
    final evaluation; checkpoint.finalize(step) -> committed?
    rank 0: the stage's final checkpoint committed -> confirmation (termination message)

Loss normalisation: every micro-step's summed token loss is divided by the GLOBAL number
of label tokens of the optimizer step (all-reduced before the first forward) and
multiplied by the world size (DDP/FSDP average gradients over ranks), so the gradient is
the exact per-token mean over the global batch whatever the world size or micro-batching.

Packing (``data.packing``, default true; `vlm_trainer.data.packing`): a step carries
``globalBatchTokens`` real (text + image) tokens, packed whole samples per row of
``seqLength``, attention and positions isolated per sample; cumulative real tokens stay
within one sequence of ``steps x globalBatchTokens``. Unpacked: G = globalBatchTokens //
seqLength sequences of one sample each, right-padded.

Stage length: ``steps``; ``tokens`` -> ceil(tokens / globalBatchTokens) when packed (the
stage trains its stated real tokens within one global batch), ceil(tokens / (G x
seqLength)) unpacked (sequence capacity, padding included); ``epochs`` ->
`mixture.steps_for_epochs` over the sources' sizes (samples per step: G, or the token
budget over the mean sample length when packed). ``max_steps`` caps the
step this process stops at (an absolute stage step) but never changes the stage's length:
the LR schedule and ``visualIntroduceAt`` are those of the whole stage, so a capped run is
a prefix of the full one.

Exit status: 0 when the run reached ``stop_at = min(stage steps, max_steps)`` and the
final checkpoint is committed; 1 on any failure; 3 when stopped by
SIGTERM/SIGINT before the end (the stop is agreed collectively at a step boundary).

Checkpoints: ``Trainer.states`` names the training state as DCP ``Stateful`` components
(model, optimizer, the trainer's progress/data/schedule/seed: `vlm_trainer/trainer_state.py`);
``Trainer.checkpoint`` is the `vlm_trainer/checkpoint/manager.py` manager over them, None
when ``VLM_NO_CHECKPOINT=1`` (nothing restored or saved; the end counts as committed).
A signal stop checkpoints its step synchronously, so the restart loses nothing.

Completion confirmed (vlm_api/stage_policy.py): once the committed checkpoint of the end of
the stage is known (``stage_policy.is_final`` of the one ``finalize`` committed), global
rank 0 writes ``stage_policy.confirmation(stage, step, uri, tokens, final validation loss)``
to ``$VLM_TERMINATION_LOG``, else to ``/dev/termination-log`` when that exists and is
writable (Kubernetes' termination message), else nowhere. Also when the stage had already
ended and this process only resumed its final checkpoint (a node that joins late trains
nothing). A capped (``max_steps``) or stopped run confirms nothing.

RNG: reseeded every step from (seed, global step, rank), so the random state is a function
of the step and needs no checkpointing beyond the seed (kept in the trainer state and checked).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time

import torch
import yaml

from vlm_api import stage_policy
from vlm_api.quantities import parse_quantity
from vlm_api.schema import TrainerConfig

from .data.loader import StepLoader, open_sources, probe_stats
from .distributed import DistContext, Parallel, init_distributed, parallelize
from .checkpoint.errors import CheckpointError
from .checkpoint.state import MODEL_KEY, OPTIM_KEY, ModelState, OptimizerState
from .evaluate import EvalResult, Evaluator
from .observe import StepObserver
from .data.mixture import MULTIMODAL, MixturePlanner, steps_for_epochs
from .model import build_vlm, check_packing, count_params, flattens, loss_sum, packed_attention
from .data.packing import PackingPlanner, stage_steps_for_tokens
from .policy import apply_trainable, param_groups
from .schedule import LRSchedule, build_optimizer, init_optimizer_state
from .stage_io import write_termination_log
from .trainer_state import Progress, TrainerState
from .data.sequences import SequenceBuilder
from .tokenizer import load_tokenizer

log = logging.getLogger("vlm_trainer")

EXIT_OK, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3


# --------------------------------------------------------------------------- state


@dataclasses.dataclass
class TrainResult:
    completed: bool  # reached stop_at
    stage_finished: bool  # reached the stage's full length (not just max_steps)
    committed: bool  # the final checkpoint is committed
    stopped: bool  # a signal stopped the run early
    step: int
    total_steps: int
    loss: float | None
    eval: EvalResult | None

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return EXIT_STOPPED
        return EXIT_OK if self.completed and self.committed else EXIT_FAILED


# --------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: TrainerConfig, *, ctx: DistContext | None = None, serve_metrics: bool = True):
        self.cfg = cfg
        self.spec = spec = cfg.spec
        self.stage = cfg.stage_spec
        self.stage_index = spec.stage_index(cfg.stage)
        self.ctx = ctx or init_distributed(spec.elastic.process_group_timeout)
        self.seed = spec.seed
        self._stop_signal = False
        t0 = time.perf_counter()

        # model
        self.tok = load_tokenizer(spec.model)
        vlm = build_vlm(spec.model, self.tok, seed=self.seed)
        self.policy = apply_trainable(vlm, self.stage.trainable)
        self.llm_params = count_params(vlm.llm)
        self.vision_params = count_params(vlm.vision)
        self.tokens_per_image = vlm.tokens_per_image
        self._llm_trains = self.policy.llm != "none" or vlm.vision is None
        self.packing = spec.data.packing
        self.attention = None
        if self.packing:
            # refuses an LLM that would let packed samples see each other
            self.attention = check_packing(vlm.llm, packed_attention(vlm.llm, self.ctx.device, spec.data.seq_length))
        self.flatten = self.packing and flattens(self.attention)
        self.par: Parallel = parallelize(vlm, strategy=spec.parallelism.strategy, precision=spec.parallelism.precision,
                                         activation_checkpointing=spec.parallelism.activation_checkpointing, ctx=self.ctx)
        self.vlm = vlm
        opt = self.stage.optimizer
        self.optimizer = build_optimizer(param_groups(self.par.module, opt.weight_decay), opt,
                                         fused=self.ctx.device.type == "cuda" and spec.parallelism.strategy != "fsdp")
        init_optimizer_state(self.optimizer)  # complete, stable optimizer state dicts from step 0
        self.trainable_params = [p for g in self.optimizer.param_groups for p in g["params"]]

        # data
        seq_len = spec.data.seq_length
        self.global_batch = max(1, self.stage.batch_tokens // seq_len)
        self.builder = SequenceBuilder(self.tok, tokens_per_image=vlm.tokens_per_image, seq_length=seq_len)
        names = sorted(n for n, f in self.stage.mixture.items() if f > 0)
        endpoint = spec.checkpoint.endpoint or None
        self.sources = open_sources(spec.data, names, image=vlm.image_spec, seed=self.seed, endpoint_url=endpoint)
        stats = probe_stats(self.sources, self.builder, int(os.environ.get("VLM_PROBE_SAMPLES", "64")))
        modality = {s.name: s.modality for s in spec.data.sources}
        plan_kw = dict(stage=self.stage.name, mixture=self.stage.mixture, modality=modality, stats=stats,
                       global_batch=self.global_batch, total_steps=1, visual_introduce_at=self.stage.visual_introduce_at,
                       seed=self.seed)
        if self.packing:
            lookahead = os.environ.get("VLM_PACK_LOOKAHEAD")  # tokens (benchmarks, experiments)
            self.planner = PackingPlanner(seq_length=seq_len, token_budget=self.stage.batch_tokens,
                                          lookahead=int(lookahead) if lookahead else None, **plan_kw)
        else:
            self.planner = MixturePlanner(**plan_kw)
        self.total_steps = self._stage_steps()
        self.planner.set_total_steps(self.total_steps)
        self.stop_at = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        self.schedule = LRSchedule(opt, self.total_steps)
        val_names = [s.name for s in spec.data.sources if s.validation_uri
                     and (vlm.vision is not None or s.modality not in MULTIMODAL)]
        self.evaluator = Evaluator(
            open_sources(spec.data, val_names, image=vlm.image_spec, seed=self.seed, split="validation", endpoint_url=endpoint),
            self.builder, samples_per_source=self.stage.eval_batches * self.stage.micro_batch_size,
            micro_batch_size=self.stage.micro_batch_size, ctx=self.ctx)
        self.progress = Progress()
        self.last_eval: EvalResult | None = None

        # observability: metrics (and their server), the progress file, log lines
        self.observer = StepObserver(self, serve=serve_metrics)
        self.metrics, self.progress_file = self.observer.metrics, self.observer.progress_file
        self.metrics_port = self.observer.port
        self.states = {MODEL_KEY: ModelState(self.par.module),
                       OPTIM_KEY: OptimizerState(self.par.module, self.optimizer, continue_schedule=bool(opt.continue_schedule)),
                       "trainer": TrainerState(self)}
        self.checkpoint = self._checkpoint_manager()
        if self.ctx.is_main:
            layout = (f"{self.stage.batch_tokens} real tokens packed into ~{self.global_batch} sequences of {seq_len} "
                      f"(attention {self.attention})" if self.packing else
                      f"{self.global_batch} sequences x {seq_len} tokens, unpacked")
            log.info("stage %s (%d/%d): %d steps x %s, world %d, %s, %s; built in %.1fs",
                     self.stage.name, self.stage_index + 1, len(spec.stages), self.total_steps, layout,
                     self.ctx.world_size, self.par.strategy, self.policy.describe(), time.perf_counter() - t0)
            log.info("mixture %s; images enter at step %d; probe: %s", self.stage.mixture, self.planner.intro_step,
                     {k: f"{v.mean_tokens:.1f} tok, {v.image_fraction:.2f} img" for k, v in stats.items()})

    # ---- construction helpers
    def _stage_steps(self) -> int:
        st = self.stage
        if st.steps is not None:
            return int(st.steps)
        if st.tokens is not None:
            if self.packing:
                return stage_steps_for_tokens(parse_quantity(st.tokens), st.batch_tokens)
            return max(1, math.ceil(parse_quantity(st.tokens) / (self.global_batch * self.spec.data.seq_length)))
        sizes = {name: src.epoch_length() for name, src in self.sources.items()}
        return steps_for_epochs(float(st.epochs), sizes, self.planner)

    def stated_tokens(self) -> int:
        """The tokens the recipe states for this stage: ``tokens``, else steps x globalBatchTokens
        (what a packed stage trains, within one sequence; an unpacked one trains less)."""
        if self.stage.tokens is not None:
            return parse_quantity(self.stage.tokens)
        return self.total_steps * self.stage.batch_tokens

    def device_name(self) -> str:
        if self.ctx.device.type == "cuda":
            return torch.cuda.get_device_name(self.ctx.device)
        return "cpu"

    # ---- checkpoints
    def _checkpoint_manager(self):
        if os.environ.get("VLM_NO_CHECKPOINT") == "1":
            if self.cfg.init_from:
                log.warning("init_from=%s ignored: checkpoints are off (VLM_NO_CHECKPOINT=1)", self.cfg.init_from)
            return None
        from .checkpoint.manager import CheckpointManager
        from .checkpoint.settings import CheckpointSettings

        cfg, spec = self.cfg, self.spec
        # the config the checkpoint carries: analysis, pruning, export rebuild the model from the URI alone
        config = yaml.safe_dump(cfg.model_dump(by_alias=True, exclude_none=True, mode="json"), sort_keys=False)
        return CheckpointManager(
            CheckpointSettings.from_spec(spec.checkpoint, ctl_timeout_s=float(spec.elastic.process_group_timeout)),
            self.states, stage=cfg.stage, init_from=cfg.init_from,
            prev_stage=spec.stages[self.stage_index - 1].name if self.stage_index > 0 else None,
            registry=self.metrics.registry, progress=self.progress_file, run_name=f"{cfg.run.namespace}-{cfg.run.name}",
            config_yaml=config, describe=lambda: {"strategy": self.par.strategy, "total_steps": self.total_steps,
                                                  "tokens": self.progress.tokens, "run": cfg.run.name})

    def _save_now(self, *, final: bool):
        """The synchronous checkpoint of this step, the stage's (``final``) or this run's end:
        (committed, its SaveOutcome); a failure is logged; (True, None) without checkpoints."""
        if self.checkpoint is None:
            return True, None
        try:
            return True, self.checkpoint.finalize(self.progress.step, final=final)
        except CheckpointError as e:
            log.error("%s", e)
            return False, None

    # ---- signals
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            log.warning("signal %d: stopping at the next step boundary", signum)
            self._stop_signal = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def request_stop(self) -> None:
        self._stop_signal = True

    # ---- one optimizer step
    def train_step(self, rank_step) -> dict:
        ctx, par = self.ctx, self.par
        micro = rank_step.micro
        counts = [rank_step.n_label_tokens, rank_step.n_text_tokens, rank_step.n_image_tokens, rank_step.skipped,
                  1.0 if self._stop_signal else 0.0, rank_step.n_positions, rank_step.n_samples,
                  rank_step.n_rows] + [b.n_images for b in micro]
        glob = ctx.all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=ctx.device)).tolist()
        label_tokens, text_tokens, image_tokens, skipped, stop, positions, samples, rows = glob[:8]
        images_per_micro = glob[8:]
        scale = ctx.world_size / max(label_tokens, 1.0)
        loss_acc = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for j, batch in enumerate(micro):
            if self.flatten:
                batch = batch.flattened()  # padding-free: one row of real tokens, cu_seq_lens
            batch = batch.to(ctx.device)
            # a peer has images in this micro-step (or only the vision path trains): run the
            # vision tower on a zero-weighted dummy so collectives and graphs match everywhere
            force = (images_per_micro[j] > 0 or not self._llm_trains) and batch.n_images == 0
            with par.sync_context(j == len(micro) - 1):
                with par.autocast():
                    logits = par.module(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                        n_image_positions=batch.n_image_tokens, force_vision=force,
                                        position_ids=batch.position_ids, flash_kwargs=batch.flash_kwargs)
                ls = loss_sum(logits, batch.labels)
                (ls * scale).backward()
            loss_acc += ls.detach().double()
        max_norm = self.stage.optimizer.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.schedule.apply(self.optimizer, self.progress.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(ctx.all_reduce_sum(loss_acc).item()) / max(label_tokens, 1.0)
        return {"loss": loss if label_tokens > 0 else math.nan, "lr": lr, "grad_norm": float(grad_norm),
                "text_tokens": int(text_tokens), "image_tokens": int(image_tokens), "label_tokens": int(label_tokens),
                "skipped": int(skipped), "stop": stop > 0, "positions": int(positions), "samples": int(samples),
                "sequences": int(rows)}

    # ---- evaluation
    def evaluate(self) -> EvalResult | None:
        if not self.evaluator.enabled:
            return None
        result = self.evaluator.run(self.par)
        self.last_eval = result
        if self.ctx.is_main:
            self.observer.evaluated(result)
        return result

    def _eval_due(self, step: int) -> bool:
        every = self.stage.eval_interval
        return bool(every) and step % every == 0 and step < self.stop_at

    # ---- the loop
    def train(self) -> TrainResult:
        ctx, m = self.ctx, self.metrics
        if self.checkpoint is not None:
            self.checkpoint.restore()
        start_step = self.progress.step
        m.steps.inc(start_step)
        m.tokens.labels(modality="text").inc(self.progress.text_tokens)
        m.tokens.labels(modality="image").inc(self.progress.image_tokens)
        for src, n in self.planner.stage_samples.items():
            m.samples.labels(source=src).inc(n)
        self.progress_file.write("start", step=start_step, total_steps=self.total_steps, stop_at=self.stop_at,
                                 world_size=ctx.world_size, global_batch=self.global_batch,
                                 seq_length=self.spec.data.seq_length, packing=self.packing,
                                 global_batch_tokens=self.stage.batch_tokens, tokens_stated=self.stated_tokens(),
                                 metrics_port=self.metrics_port,
                                 restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))
        loader = StepLoader(self.planner, self.sources, self.builder, rank=ctx.rank, world_size=ctx.world_size,
                            micro_batch_size=self.stage.micro_batch_size,
                            worker=os.environ.get("VLM_DATA_WORKER", "process"))
        t_start = time.perf_counter()
        self.observer.start()
        last_loss = None
        stopped = False
        self.vlm.train()
        try:
            while self.progress.step < self.stop_at:
                t0 = time.perf_counter()
                wait0 = loader.wait_seconds
                rank_step = loader.next()
                wait = loader.wait_seconds - wait0
                if rank_step.plan.step != self.progress.step:
                    raise RuntimeError(f"data plan for step {rank_step.plan.step} at step {self.progress.step}")
                torch.manual_seed(_step_seed(self.seed, self.progress.global_step, ctx.rank))
                out = self.train_step(rank_step)
                self.planner.load_state_dict(rank_step.plan.state_after)
                self.progress.step += 1
                self.progress.text_tokens += out["text_tokens"]
                self.progress.image_tokens += out["image_tokens"]
                self.progress.skipped_samples += out["skipped"]
                last_loss = out["loss"]
                dt = time.perf_counter() - t0
                self.observer.observe(rank_step, out, dt, wait)
                if self._eval_due(self.progress.step):
                    self.evaluate()
                if self.checkpoint is not None and self.progress.step < self.stop_at:  # _save_now writes the last
                    self.checkpoint.after_step(self.progress.step)
                if out["stop"]:
                    stopped = True
                    self._save_now(final=False)  # suspend, preemption, scale-in: the restart loses nothing
                    break
            completed = self.progress.step >= self.stop_at
            committed = False
            if completed:
                if self.evaluator.enabled:
                    self.evaluate()
                committed, saved = self._save_now(final=self.progress.step >= self.total_steps)
                if saved is not None and ctx.is_main:
                    self.confirm_final(saved)
            result = TrainResult(completed, self.progress.step >= self.total_steps, committed, stopped,
                                 self.progress.step, self.total_steps, last_loss, self.last_eval)
            status = "completed" if result.exit_code == EXIT_OK else ("stopped" if stopped else "failed")
            self.progress_file.write("end", status=status, step=self.progress.step, tokens=self.progress.tokens,
                                     elapsed_s=round(time.perf_counter() - t_start, 3), committed=committed,
                                     loss=last_loss, eval=self.last_eval.by_modality if self.last_eval else None)
            if ctx.is_main:
                log.info("stage %s %s at step %d/%d (%.1fs)", self.stage.name, status, self.progress.step,
                         self.total_steps, time.perf_counter() - t_start)
            return result
        except BaseException as exc:
            self.progress_file.write("end", status="failed", step=self.progress.step, tokens=self.progress.tokens,
                                     elapsed_s=round(time.perf_counter() - t_start, 3), error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            loader.close()

    def confirm_final(self, saved) -> str | None:
        """Rank 0, once ``saved`` (a SaveOutcome: a new save, the same step marked final, or the
        final checkpoint this process resumed) is committed: write the stage's confirmation
        when it ends the stage (`stage_policy.is_final`); returns the text written."""
        if not saved.uri or not stage_policy.is_final(self.stage, saved.step, saved.final):
            return None
        losses = self.last_eval.by_modality if self.last_eval is not None else None
        try:
            text = stage_policy.confirmation(self.stage.name, saved.step, saved.uri, self.progress.tokens, losses)
            path = write_termination_log(text)
        except (OSError, ValueError) as exc:  # the checkpoint stays committed; the operator reports it unconfirmed
            log.error("could not write the stage's confirmation: %s", exc)
            return None
        if path is not None:
            log.info("stage %s confirmed: final checkpoint step %s %s (%s)", self.stage.name, saved.step, saved.uri, path)
        return text

    def close(self) -> None:
        try:
            if self.checkpoint is not None:
                self.checkpoint.close(wait=False)
        finally:
            self.observer.close()


def _step_seed(seed: int, global_step: int, rank: int) -> int:
    return ((seed * 1_000_003 + global_step) * 65_537 + rank) % (2**63 - 1)
