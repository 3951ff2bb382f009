"""What the training loop reports: Prometheus metrics (served by global rank 0, or every
node's for the PodMonitor), the progress file (`progress.py`), and after each step its
metrics and progress line, every ``VLM_LOG_EVERY`` steps a log line with throughput, MFU and
padding over the steps since the last one."""

from __future__ import annotations

import collections
import logging
import math
import os
import time

from .metrics import TrainerMetrics, peak_flops, registry, serve_for, step_flops
from .progress import ProgressFile

log = logging.getLogger("vlm_trainer")


def _fresh_window() -> dict:
    return {"t": time.perf_counter(), "tokens": 0, "flops": 0.0, "wait": 0.0, "steps": 0, "positions": 0,
            "samples": 0, "sequences": 0}


class StepObserver:
    def __init__(self, trainer, *, serve: bool = True) -> None:
        t = self.t = trainer
        self.metrics = TrainerMetrics(registry())
        self.metrics.set_static(run=t.cfg.run.name, stage=t.stage.name, stage_index=t.stage_index,
                                stage_steps=t.total_steps, world_size=t.ctx.world_size,
                                device=t.device_name(), strategy=t.par.strategy)
        self._server, self.port = None, None
        if serve:
            self._server, self.port = serve_for(
                rank=t.ctx.rank, local_rank=t.ctx.local_rank,
                port=int(os.environ.get("VLM_METRICS_PORT", t.spec.metrics.port)), reg=self.metrics.registry)
        self.progress_file = ProgressFile.from_env(run=t.cfg.run.name, stage=t.stage.name, enabled=t.ctx.is_main)
        self.peak_flops = peak_flops(t.device_name(), t.par.compute_dtype is not None)
        self.log_every = max(1, int(os.environ.get("VLM_LOG_EVERY", "10")))
        # the image-token ratio over the last steps (a step alone is noisy)
        self.ratios = collections.deque(maxlen=max(1, int(os.environ.get("VLM_RATIO_WINDOW", "20"))))
        self.window = _fresh_window()

    def start(self) -> None:
        """The throughput window starts now (after the restore and the first batch's wait)."""
        self.window = _fresh_window()

    def evaluated(self, result) -> None:
        """Rank 0, after an evaluation: its losses as metrics, an ``eval`` line, a log line."""
        step = self.t.progress.step
        for m, v in result.by_modality.items():
            self.metrics.val_loss.labels(modality=m).set(v)
        for s, v in result.by_source.items():
            self.metrics.val_source_loss.labels(source=s).set(v)
        self.progress_file.write("eval", step=step, losses=result.by_modality, sources=result.by_source)
        log.info("eval step %d: %s", step, " ".join(f"{m}={v:.4f}" for m, v in result.by_modality.items()))

    def close(self) -> None:
        self.progress_file.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe(self, rank_step, out: dict, dt: float, wait: float) -> None:
        """After optimizer step ``t.progress.step``: its metrics and progress line; every
        ``self.log_every`` steps the log line and the window's throughput, MFU and padding."""
        t, w = self.t, self.window
        m, step = self.metrics, t.progress.step
        tokens = out["text_tokens"] + out["image_tokens"]
        self.ratios.append((out["image_tokens"], tokens))
        img, tot = map(sum, zip(*self.ratios))
        ratio = img / tot if tot else 0.0
        images = out["image_tokens"] // max(t.tokens_per_image, 1) if t.tokens_per_image else 0
        w["tokens"] += tokens
        w["wait"] += wait
        w["steps"] += 1
        w["positions"] += out["positions"]
        w["samples"] += out["samples"]
        w["sequences"] += out["sequences"]
        padding = 1.0 - tokens / out["positions"] if out["positions"] else 0.0
        per_sequence = out["samples"] / out["sequences"] if out["sequences"] else 0.0
        w["flops"] += step_flops(llm_params=t.llm_params, vision_params=t.vision_params, tokens=tokens,
                                 patches=images * t.tokens_per_image, vision_trains=t.policy.vision_encoder)
        m.steps.inc()
        m.tokens.labels(modality="text").inc(out["text_tokens"])
        m.tokens.labels(modality="image").inc(out["image_tokens"])
        for src, n in rank_step.plan.counts.items():
            if n:
                m.samples.labels(source=src).inc(n)
        if math.isfinite(out["loss"]):
            m.loss.set(out["loss"])
        m.image_ratio.set(ratio)
        target = t.planner.target_image_fraction(step - 1)
        m.image_target.set(target)
        m.lr.set(out["lr"])
        m.grad_norm.set(out["grad_norm"])
        m.step_seconds.observe(dt)
        m.data_wait.inc(wait)
        elapsed = time.perf_counter() - w["t"]
        tps = w["tokens"] / elapsed if elapsed > 0 else 0.0
        self.progress_file.write("step", step=step, total_steps=t.total_steps, loss=out["loss"], lr=out["lr"],
                                 grad_norm=out["grad_norm"], tokens=t.progress.tokens, text_tokens=out["text_tokens"],
                                 image_tokens=out["image_tokens"], image_token_ratio=ratio, tokens_per_s=tps,
                                 step_s=round(dt, 4), data_wait_s=round(wait, 4), positions=out["positions"],
                                 sequences=out["sequences"],
                                 samples=out["samples"], samples_per_sequence=round(per_sequence, 3),
                                 padding_fraction=round(padding, 5),
                                 **({"pack_buffer": rank_step.plan.buffer} if t.packing else {}))
        if step % self.log_every == 0 or step == t.stop_at:
            mfu = w["flops"] / (elapsed * self.peak_flops * t.ctx.world_size) if elapsed > 0 else 0.0
            w_padding = 1.0 - w["tokens"] / w["positions"] if w["positions"] else 0.0
            w_per_seq = w["samples"] / w["sequences"] if w["sequences"] else 0.0
            m.tokens_per_second.set(tps)
            m.mfu.set(mfu)
            m.padding_fraction.set(w_padding)
            m.samples_per_sequence.set(w_per_seq)
            if t.ctx.is_main:
                log.info("step %d/%d | loss %.4f | lr %.3g | %.0f tok/s | img %.3f (target %.3f) | grad %.3f | "
                         "pad %.1f%% | %.1f samples/seq | data wait %.1f%% | mfu %.2f%%", step, t.total_steps,
                         out["loss"], out["lr"], tps, ratio, target, out["grad_norm"], 100 * w_padding, w_per_seq,
                         100 * w["wait"] / elapsed if elapsed > 0 else 0.0, 100 * mfu)
            w.update(t=time.perf_counter(), tokens=0, flops=0.0, wait=0.0, steps=0, positions=0, samples=0,
                          sequences=0)
