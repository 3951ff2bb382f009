"""AdamW and the learning-rate schedule of a stage.

``lr(step)`` for step = 0 .. total-1 (the lr used by the optimizer step number ``step``):

* warmup: ``peak * (step + 1) / warmup`` for step < warmup;
* then over the decay span ``d = (step - warmup) / (total - warmup)`` in [0, 1]:
  - ``cosine``:   ``min + (peak - min) * 0.5 * (1 + cos(pi * d))``
  - ``linear``:   ``peak - (peak - min) * d``
  - ``constant``: ``peak``
  - ``wsd``:      ``peak`` until the last ``decayFraction`` of the stage, then linear to ``min``
  where ``min = peak * minLrRatio``.

The schedule is a pure function of the step within the stage, so it never restarts when
images enter the mixture inside a stage (``visualIntroduceAt``): data composition and the
schedule are independent.

``continueSchedule: true`` (a stage continuing the previous one, e.g. a text phase and an
image phase split into two stages): no warmup; the stage starts at the learning rate the
previous stage's optimizer last used (from the init checkpoint's scheduler state) and
follows its own schedule shape from there down to ``min(start, lr * minLrRatio)``; AdamW
moments and the global step counter carry over (parameters that were frozen before start
with fresh moments). Without ``continueSchedule`` the optimizer starts fresh and warms up.
"""

from __future__ import annotations

import math

import torch

from vlm_api.schema import Optimizer as OptimizerSpec


class LRSchedule:
    def __init__(self, spec: OptimizerSpec, total_steps: int, *, start_lr: float | None = None):
        self.spec = spec
        self.total_steps = max(1, int(total_steps))
        self.continued = start_lr is not None
        self.peak = float(start_lr) if start_lr is not None else float(spec.lr)
        self.warmup = 0 if self.continued else min(int(spec.warmup_steps), self.total_steps)
        self.min_lr = min(self.peak, float(spec.lr) * float(spec.min_lr_ratio))
        self.last_lr = self.lr(0)

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        span = max(1, self.total_steps - self.warmup)
        d = min(1.0, max(0.0, (step - self.warmup) / span))
        kind = self.spec.schedule
        if kind == "constant":
            return self.peak
        if kind == "cosine":
            return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * d))
        if kind == "linear":
            return self.peak - (self.peak - self.min_lr) * d
        if kind == "wsd":
            decay_steps = max(1, round(self.spec.decay_fraction * self.total_steps))
            start = self.total_steps - decay_steps
            if step < start:
                return self.peak
            return self.peak - (self.peak - self.min_lr) * min(1.0, (step - start + 1) / decay_steps)
        raise ValueError(f"unknown schedule {kind!r}")

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.last_lr = lr
        return lr

    # the scheduler part of a checkpoint: enough to continue or to be continued from
    def state_dict(self) -> dict:
        return {"last_lr": self.last_lr, "peak": self.peak, "warmup": self.warmup,
                "total_steps": self.total_steps, "schedule": self.spec.schedule, "continued": self.continued}

    def load_state_dict(self, state: dict) -> None:
        self.last_lr = float(state.get("last_lr", self.last_lr))


def build_optimizer(groups: list[dict], spec: OptimizerSpec, *, fused: bool | None = None) -> torch.optim.AdamW:
    kwargs = {}
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), eps=1e-8, **kwargs)


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW state (zero moments, step 0) for every parameter up front.

    AdamW creates state lazily at a parameter's first gradient, so a checkpoint taken
    before images enter would lack the projector's state and a strict load would fail. A
    step with zero gradients at lr 0 leaves every parameter exactly unchanged; resetting
    ``step`` to 0 makes the state identical to a fresh optimizer's first real step.
    """
    lrs = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p in params:
        p.grad = None
        state = optimizer.state[p]
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0
