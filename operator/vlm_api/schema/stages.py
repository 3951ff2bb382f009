"""A stage: what it trains, on which mixture, for how long, and with which optimizer."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..quantities import parse_quantity
from .common import MAX_STEPS, MAX_TOKENS, NAME_PATTERN, QUANTITY_CEL, RESERVED_STAGE_SUFFIX, Model, Quantity, cel


class VisualRegion(Model):
    """Train a sparse, uniformly spread subset of LLM layers (arXiv 2412.12785)."""

    fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Fraction of LLM layers to train: n = max(1, round(fraction * depth)) layers at "
        "indices floor((i + 0.5) * depth / n) for i in 0..n-1 (8 of 32 -> 2, 6, 10, ..., 30).",
    )


class LayerSelection(Model):
    """A trainable subset of LLM layers."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.layers) != has(self.visualRegion)", "set exactly one of layers or visualRegion")
            ]
        }
    )
    layers: list[int] | None = Field(
        None, min_length=1, max_length=1024, description="Explicit 0-based LLM layer indices to train."
    )
    visual_region: VisualRegion | None = Field(None, description="Sparse uniform layer subset.")

    @model_validator(mode="after")
    def _one_of(self) -> "LayerSelection":
        if (self.layers is None) == (self.visual_region is None):
            raise ValueError("set exactly one of layers or visualRegion")
        if self.layers is not None:
            if any(i < 0 for i in self.layers):
                raise ValueError("layers: indices must be >= 0")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError("layers: indices must be unique")
        return self


class Trainable(Model):
    """What is updated in this stage; everything else stays frozen (no optimizer state)."""

    vision_encoder: bool = Field(False, description="Train the vision encoder.")
    projector: bool = Field(True, description="Train the projector.")
    llm: Union[Literal["all", "none"], LayerSelection] = Field(
        "all",
        description="all | none | {layers: [...]} | {visualRegion: {fraction: 0.25}}.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "type(self) == string ? self in ['all', 'none'] : "
                    "((has(self.layers) ? 1 : 0) + (has(self.visualRegion) ? 1 : 0) == 1)",
                    "must be 'all', 'none', {layers: [...]} or {visualRegion: {fraction: f}}",
                )
            ]
        },
    )

    @field_validator("llm", mode="before")
    @classmethod
    def _llm_string(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("all", "none"):
            raise ValueError(f"{value!r} is not one of 'all', 'none', {{layers: [...]}}, {{visualRegion: ...}}")
        return value

    def trains_anything(self) -> bool:
        return self.vision_encoder or self.projector or self.llm != "none"


class Optimizer(Model):
    """AdamW with a learning-rate schedule."""

    lr: float = Field(3.0e-4, gt=0, le=1, description="Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="Decay after warmup: cosine, linear, constant, or wsd (warmup-stable-decay)."
    )
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup steps (ignored when continueSchedule).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd only: fraction of the stage spent decaying.")
    weight_decay: float = Field(0.1, ge=0, le=10, description="Decoupled weight decay (not applied to norms and biases).")
    betas: list[float] = Field([0.9, 0.95], min_length=2, max_length=2, description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Max global gradient norm (0 disables clipping).")
    continue_schedule: bool = Field(
        False,
        description="Continue the previous stage's schedule position and optimizer state instead of re-warming. "
        "Within a stage the schedule always continues when images enter (visualIntroduceAt).",
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: list[float]) -> list[float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError("betas must lie in [0, 1)")
        return value


class PruneCalibration(Model):
    """Data used to measure layer importance before pruning."""

    source: str = Field(max_length=63, pattern=NAME_PATTERN, description="Source to draw calibration samples from.")
    samples: int = Field(64, ge=1, le=100_000, description="Calibration samples.")


class Prune(Model):
    """Visual-region pruning after the stage's training (arXiv 2412.12785)."""

    remove_layers: int = Field(ge=1, le=1024, description="LLM layers to remove, least influential first, never inside the visual region.")
    calibration: PruneCalibration = Field(description="Calibration data for block influence.")


class Stage(Model):
    """One training stage; each runs as its own PyTorchJob, initialised from the previous stage."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "(has(self.tokens) ? 1 : 0) + (has(self.steps) ? 1 : 0) + (has(self.epochs) ? 1 : 0) == 1",
                    "set exactly one of tokens, steps or epochs",
                ),
                # The sum is bound once (a one-element list) rather than computed twice.
                cel(
                    "[self.mixture.map(k, self.mixture[k]).sum()].all(t, t >= 0.999999 && t <= 1.000001)",
                    "mixture fractions must sum to 1 (within 1e-6)",
                    ".mixture",
                ),
                cel(
                    f"!self.name.matches('{RESERVED_STAGE_SUFFIX}')",
                    "a stage name must not end in -r<N> (the N-th retry of stage <s> is named <run>-<s>-r<N>) "
                    "or -pruned (a pruned stage's checkpoints)",
                    ".name",
                ),
            ]
        }
    )
    name: str = Field(
        max_length=40, pattern=NAME_PATTERN,
        description="Stage name (part of child object names); must not end in -r<N> (retries) or -pruned.",
    )
    tokens: Quantity | None = Field(
        None,
        description=f"Stage length in tokens: integer or K/M/B/T suffix, e.g. 100B (at most 1000T).",
        json_schema_extra={"x-kubernetes-validations": QUANTITY_CEL},
    )
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Stage length in optimizer steps.")
    epochs: float | None = Field(None, gt=0, le=1000, description="Stage length in passes over its mixture's smallest-coverage source.")
    # Keys are checked against data.sources (names that match NAME_PATTERN) by the run's rules.
    mixture: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        min_length=1,
        max_length=64,
        description="Token fractions per source name, each in [0, 1]; must sum to 1.",
    )
    visual_introduce_at: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of the stage before which multimodal sources weigh 0 (text sources are renormalised); "
        "after it the stage's mixture applies (1: never in this stage, a text-only stage). The LR schedule "
        "continues across the switch.",
    )
    trainable: Trainable = Field(default_factory=Trainable, description="What is trained; the rest is frozen.")
    optimizer: Optimizer = Field(default_factory=Optimizer, description="Optimizer and LR schedule.")
    global_batch_tokens: Quantity = Field(
        "4M",
        description="Tokens per optimizer step across all workers; fixed under rescaling (gradient accumulation absorbs it).",
        json_schema_extra={"x-kubernetes-validations": QUANTITY_CEL},
    )
    micro_batch_size: int = Field(8, ge=1, le=4096, description="Sequences per worker per forward pass.")
    eval_interval: int = Field(1000, ge=0, le=MAX_STEPS, description="Steps between validation passes (0: only at the end).")
    eval_batches: int = Field(8, ge=0, le=100_000, description="Batches per validation source per pass.")
    prune: Prune | None = Field(None, description="Prune LLM layers after training; the next stage continues from the pruned model.")

    @field_validator("tokens", "global_batch_tokens")
    @classmethod
    def _quantity(cls, value: Quantity | None) -> Quantity | None:
        if value is not None:
            n = parse_quantity(value)
            if n <= 0:
                raise ValueError("must be > 0")
            if n > MAX_TOKENS:
                raise ValueError(f"at most {MAX_TOKENS} (1000T)")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if re.search(RESERVED_STAGE_SUFFIX, value):
            raise ValueError(
                "a stage name must not end in -r<N> (the N-th retry of stage <s> is named <run>-<s>-r<N>) "
                "or -pruned (a pruned stage's checkpoints)"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> "Stage":
        given = [k for k in ("tokens", "steps", "epochs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of tokens, steps or epochs (got {given or 'none'})")
        if any(not (0 <= v <= 1) or math.isnan(v) for v in self.mixture.values()):
            raise ValueError("mixture: fractions must lie in [0, 1]")
        total = sum(self.mixture.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"mixture: fractions must sum to 1 (got {total:.6g})")
        return self

    @property
    def total_tokens(self) -> int | None:
        return parse_quantity(self.tokens) if self.tokens is not None else None

    @property
    def batch_tokens(self) -> int:
        return parse_quantity(self.global_batch_tokens)
