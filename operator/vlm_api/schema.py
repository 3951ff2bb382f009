"""The VLMPretrainRun spec and status: the single source of truth.

The CRD's OpenAPI schema (`vlm_api.crd`), `vlmpretrain validate`, the rendered trainer
config and the trainer itself all come from these models. Field names are the API
contract (README, "The API"): add fields freely, rename none.

Cross-field rules live twice on purpose: as CEL (`x-kubernetes-validations`, enforced by
the API server at admission) and as Python validators (the same rules for `validate`,
the operator and the trainer, which cannot assume the CRD is installed).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.alias_generators import to_camel

from . import limits
from .quantities import (
    DURATION_PATTERN,
    MAX_SHARDS,
    QUANTITY_PATTERN,
    count_shards,
    k8s_quantity,
    parse_interval,
    parse_quantity,
)

GROUP = "pretrain.vlm.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "VLMPretrainRun"
PLURAL = "vlmpretrainruns"
SINGULAR = "vlmpretrainrun"
SHORT_NAMES = ["vlmrun", "vpr"]

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# The run's own name (metadata.name) starts every child's name: PyTorchJob `<run>-<stage>`
# (`-r<N>` for retries), cut to 50 characters with a hash (render._fit); the Kubeflow
# controller's Services and pods `<job>-worker-<i>` (<= 62), the store `<job>-rdzv` (<= 55),
# the ConfigMap `<job>-config` (<= 57), the PodMonitor `<run>`, and the run label's value
# (<= 63). Services need DNS-1035 labels (a letter first, no dots). At most 40 characters
# keeps the whole run name readable in every child (render._fit keeps the first 43).
RUN_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_RUN_NAME = 40
RUN_NAME_RULE = (
    f"size(self.metadata.name) <= {MAX_RUN_NAME} && self.metadata.name.matches('{RUN_NAME_PATTERN}')"
)
RUN_NAME_MESSAGE = (
    f"metadata.name must be a DNS label (RFC 1035: lowercase letters, digits and '-', starting with a letter) "
    f"of at most {MAX_RUN_NAME} characters: child objects are named <name>-<stage>[-r<N>]-..."
)
# A stage name must not look like a retry (`<stage>-r<N>`: the N-th retry of stage `sft` is
# the PyTorchJob `<run>-sft-r1`, which a stage `sft-r1` would also be named) or like the
# checkpoint directory of a pruned stage (`<stage>-pruned`, vlm_trainer.prune).
RESERVED_STAGE_SUFFIX = r"-(r[0-9]+|pruned)$"
# Label keys (nodeSelector, tolerations): an optional DNS-subdomain prefix and '/', then a
# name of at most 63 characters; label values: at most 63 characters.
DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
QUALIFIED_NAME_PATTERN = rf"^({DNS_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
OPTIONAL_QUALIFIED_NAME_PATTERN = f"^$|{QUALIFIED_NAME_PATTERN}"
OPTIONAL_DNS_SUBDOMAIN_PATTERN = f"^$|^{DNS_SUBDOMAIN}$"
# An extended resource: a domain-prefixed name (nvidia.com/gpu, amd.com/gpu), never a
# native resource (cpu, memory, ephemeral-storage, hugepages-*, *.kubernetes.io/*).
EXTENDED_RESOURCE_PATTERN = rf"^{DNS_SUBDOMAIN}/[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
KUBERNETES_DOMAIN = r"^([^/]*[.])?kubernetes[.]io/"
# A Kubernetes quantity as a string: a plain decimal and an optional SI or binary suffix.
K8S_QUANTITY_PATTERN = r"^([0-9]+([.][0-9]+)?|[.][0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
# A container image reference: [registry[:port]/]path[:tag][@digest], no whitespace.
IMAGE_PATTERN = (
    r"^([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?([.][a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*(:[0-9]{1,5})?/)?"
    r"[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
    r"(:[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?(@[a-z0-9]+([+._-][a-z0-9]+)*:[a-fA-F0-9]{32,128})?$"
)
# Data, model and checkpoint locations: s3://bucket/key, file:///abs, file://./rel, /abs,
# ./rel or a relative path. No userinfo (user:secret@), no query or fragment (a presigned
# URL's X-Amz-Signature=...), no whitespace or control characters.
URI_PATTERN = (
    r"^(s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/[^?#\s]*)?|file://[.]{0,2}/[^?#\s]*|[.]{0,2}/[^?#\s]*"
    r"|[^:{}?#\s/.][^:{}?#\s]*)$"
)
# An S3-compatible endpoint: http(s)://host[:port][/path], no userinfo, query or fragment.
ENDPOINT_PATTERN = (
    r"^(https?://([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?([.][a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]{2,45}\])(:[0-9]{1,5})?(/[-a-zA-Z0-9._~%/]*)?)?$"
)
# Ports of a worker pod other than metrics.port: the c10d rendezvous (launch.DEFAULT_RDZV_PORT),
# and the external store's health port (render.STORE_HEALTH_PORT), kept apart so one
# NetworkPolicy rule per port means one thing.
RDZV_PORT = 29400
STORE_HEALTH_PORT = 8081
RESERVED_PORTS = (RDZV_PORT, STORE_HEALTH_PORT)
MAX_TOKENS = 10**15  # 1000T: far beyond any run, far below int64
MAX_STEPS = 10**12
MIN_MEMORY = 64 * 2**20  # bytes: less is a missing unit ('8' is 8 bytes), not a trainer
# What a pattern means, for error messages (a pattern failure never echoes the value).
PATTERN_HELP = {
    NAME_PATTERN: "a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit",
    QUALIFIED_NAME_PATTERN: "a label key: [prefix/]name, name at most 63 characters of letters, digits, '-', '_', '.'",
    LABEL_VALUE_PATTERN: "a label value: at most 63 letters, digits, '-', '_', '.', starting and ending alphanumeric",
    EXTENDED_RESOURCE_PATTERN: "an extended resource name with a domain, e.g. nvidia.com/gpu",
    K8S_QUANTITY_PATTERN: "a Kubernetes quantity such as '32', '500m', '512Gi'",
    IMAGE_PATTERN: "an image reference such as ghcr.io/acme/trainer:0.1.0 (no whitespace)",
    URI_PATTERN: "s3://bucket/key, file:///path, /path or ./path, without user:password@, a query (?...) or whitespace",
    ENDPOINT_PATTERN: "http(s)://host[:port][/path], without user:password@, a query (?...) or whitespace",
    OPTIONAL_QUALIFIED_NAME_PATTERN: "empty or a label key: [prefix/]name, name at most 63 characters of letters, "
                                     "digits, '-', '_', '.'",
    OPTIONAL_DNS_SUBDOMAIN_PATTERN: "empty or a DNS subdomain: lowercase letters, digits, '-' and '.'",
}
MULTIMODAL = ("image-text", "interleaved")
# LLM model types (transformers 5.x) whose forward lets packed samples see each other, so
# data.packing must be false for them: recurrent or hybrid state that runs across the whole
# row, or positions/biases not taken from position_ids. Measured: samples packed with
# restarted position_ids vs. alone (vlm_trainer.model.packing_isolation_error runs the same
# check on any other LLM when the trainer starts).
PACKING_UNSUPPORTED_LLMS = {
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "xlstm"),
                    "recurrent state spans the sequence"),
    **dict.fromkeys(("jamba", "bamba", "zamba", "zamba2", "falcon_h1", "nemotron_h", "granitemoehybrid", "qwen3_next"),
                    "hybrid attention/state-space layers: the state spans the sequence"),
    **dict.fromkeys(("opt", "bloom", "mpt", "xglm", "biogpt", "gpt_oss"),
                    "its attention does not isolate samples given restarted position_ids"),
}


def run_name_problem(name: Any) -> str | None:
    """Why `name` cannot be a run's metadata.name (None: it can). The CRD's root CEL rule
    (RUN_NAME_RULE) says the same to the API server."""
    if not isinstance(name, str) or not name:
        return "required: " + RUN_NAME_MESSAGE.removeprefix("metadata.name ")
    if len(name) > MAX_RUN_NAME or not re.match(RUN_NAME_PATTERN, name):
        return RUN_NAME_MESSAGE.removeprefix("metadata.name ")
    return None


Quantity = Union[int, Annotated[str, StringConstraints(max_length=32)]]
QUANTITY_CEL = [
    {
        "rule": f"type(self) == int ? self > 0 && self <= {MAX_TOKENS} : self.matches('{QUANTITY_PATTERN}')",
        "message": f"must be a positive integer (at most {MAX_TOKENS}) or a number with a K/M/B/T suffix, e.g. '4M'",
    }
]
INTERVAL_CEL = [
    {
        "rule": f"type(self) == int ? self >= 1 && self <= {MAX_STEPS} : self.matches('{DURATION_PATTERN}')",
        "message": "must be steps (integer >= 1) or a duration such as '30m' or '2h'",
    }
]


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict:
    out: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def free_form(description: str) -> dict:
    """Field arguments of a free-form mapping (model configs): the CRD keeps it as written
    (x-kubernetes-preserve-unknown-fields), bounded at the top; depth and size are capped by
    vlm_api.limits (the CRD cannot bound the depth of such a subtree)."""
    return {
        "description": f"{description} At most {limits.MAX_CONFIG_DEPTH} levels deep and "
        f"{limits.MAX_CONFIG_BYTES // 1024} KiB as JSON.",
        "json_schema_extra": {"maxProperties": limits.MAX_CONFIG_KEYS},
    }


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )

    def dump(self) -> dict:
        """The camelCase dict a user would write (defaults included)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------- model


class ModelPart(Model):
    """A pretrained component loaded from `path`, or built from scratch from `config`."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.path) != has(self.config)", "set exactly one of path or config")
            ]
        }
    )
    path: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        pattern=URI_PATTERN,
        description="Directory that transformers' from_pretrained loads (local, file:// or s3://, downloaded first).",
    )
    config: dict[str, Any] | None = Field(
        None, **free_form("Inline transformers config (must contain model_type); the part starts from random weights.")
    )

    @model_validator(mode="after")
    def _one_of(self) -> "ModelPart":
        if (self.path is None) == (self.config is None):
            raise ValueError("set exactly one of path or config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config.model_type is required (e.g. llama, siglip_vision_model)")
        return self


class Projector(Model):
    """Maps vision-encoder features into the LLM's embedding space."""

    type: Literal["mlp2x_gelu", "linear"] = Field(
        "mlp2x_gelu", description="mlp2x_gelu (LLaVA-1.5: Linear-GELU-Linear) or linear."
    )


class Tokenizer(Model):
    """The tokenizer; the image placeholder token is added when missing."""

    path: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        pattern=URI_PATTERN,
        description="Directory AutoTokenizer.from_pretrained loads (local or s3://). Defaults to the LLM's path.",
    )
    builtin: Literal["bytes"] | None = Field(
        None,
        description="A tokenizer generated in-process: 'bytes' is byte-level (256 tokens + specials); "
        "for tests, demos and inline-config LLMs, where nothing may be downloaded.",
    )
    image_token: str = Field(
        "<image>", min_length=1, max_length=64, description="Placeholder token that image embeddings replace."
    )


class ModelSpec(Model):
    """The VLM: an LLM, a vision encoder and a projector between them."""

    llm: ModelPart = Field(description="The causal language model (any AutoModelForCausalLM).")
    vision_encoder: ModelPart | None = Field(
        None, description="Vision encoder (SigLIP or CLIP vision model). Required when any stage uses image data."
    )
    projector: Projector = Field(default_factory=Projector, description="Vision-to-LLM projector.")
    tokenizer: Tokenizer = Field(default_factory=Tokenizer, description="Tokenizer (defaults to the LLM's).")

    @model_validator(mode="after")
    def _tokenizer_source(self) -> "ModelSpec":
        if self.tokenizer.path is None and self.tokenizer.builtin is None and self.llm.path is None:
            raise ValueError("tokenizer: set tokenizer.path or tokenizer.builtin when the LLM is built from config")
        return self


# --------------------------------------------------------------------------- data


class DataSource(Model):
    """A named stream of webdataset tar shards of one modality."""

    name: str = Field(max_length=63, pattern=NAME_PATTERN, description="Name that stage mixtures refer to.")
    modality: Literal["text", "image-text", "interleaved"] = Field(
        description="text (<key>.txt), image-text (<key>.png|jpg|webp + <key>.txt caption) or "
        "interleaved (<key>.json segments referencing images of the same sample)."
    )
    uri: str = Field(
        max_length=2048,
        pattern=URI_PATTERN,
        description="Shards: s3://, file:// or a local path, with {00000..00099} brace ranges "
        f"(at most {MAX_SHARDS:,} shards per URI); no user:password@ or query string.",
    )
    validation_uri: str | None = Field(
        None,
        max_length=2048,
        pattern=URI_PATTERN,
        description="Held-out shards for per-modality validation loss (same format).",
    )

    @field_validator("uri", "validation_uri")
    @classmethod
    def _braces(cls, value: str | None) -> str | None:
        if value is not None:
            count_shards(value)  # counted, never expanded: validation stays cheap whatever the range
        return value


# Lists of named items are `x-kubernetes-list-type: map` keyed by name: the API server itself
# refuses a duplicate name (in linear time; a CEL rule comparing every pair costs n^2).
def list_map(key: str = "name") -> dict:
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


class DataSpec(Model):
    """Declared data sources and sequence layout."""

    sources: list[DataSource] = Field(
        min_length=1, max_length=64, description="All sources any stage may mix (names unique).",
        json_schema_extra=list_map(),
    )
    seq_length: int = Field(2048, ge=16, le=1_048_576, description="Tokens per training sequence (image tokens included).")
    packing: bool = Field(
        True,
        description="Pack several whole samples into each sequence (attention and positions isolated per sample; "
        "tokens and globalBatchTokens count real tokens). false: one sample per padded sequence (ablations).",
    )

    @model_validator(mode="after")
    def _unique(self) -> "DataSpec":
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: duplicate names {dup}")
        return self

    def source(self, name: str) -> DataSource:
        return next(s for s in self.sources if s.name == name)


# --------------------------------------------------------------------------- stages


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
        lt=1,
        description="Fraction of the stage before which multimodal sources weigh 0 (text sources are renormalised); "
        "after it the stage's mixture applies. The LR schedule continues across the switch.",
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


# --------------------------------------------------------------------------- infrastructure


class NodeRange(Model):
    """Elastic bounds on worker nodes (PyTorchJob Worker replicas)."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [cel("self.min <= self.max", "min must be <= max", ".min")]}
    )
    min: int = Field(1, ge=1, le=4096, description="Fewest nodes the job runs with.")
    max: int = Field(1, ge=1, le=4096, description="Most nodes the job scales to.")

    @model_validator(mode="after")
    def _order(self) -> "NodeRange":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class Toleration(Model):
    """A Kubernetes toleration."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.value) || self.value == '' || !has(self.operator) || self.operator == 'Equal'",
                    "operator Exists takes no value", ".value"),
                cel("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                    "an empty key requires operator Exists (it tolerates every taint)", ".operator"),
                cel("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                    "tolerationSeconds requires effect NoExecute", ".tolerationSeconds"),
            ]
        }
    )
    key: str | None = Field(None, max_length=317, pattern=OPTIONAL_QUALIFIED_NAME_PATTERN, description="Taint key (a label key).")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal.")
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE_PATTERN, description="Taint value (a label value).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect.")
    tolerationSeconds: int | None = Field(None, ge=0, le=10**10, description="How long a NoExecute taint is tolerated.")

    @model_validator(mode="after")
    def _rules(self) -> "Toleration":
        if self.value and self.operator == "Exists":
            raise ValueError("operator Exists takes no value")
        if not self.key and self.operator != "Exists":
            raise ValueError("an empty key requires operator Exists (it tolerates every taint)")
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds requires effect NoExecute")
        return self


class Resources(Model):
    """Where and how big the job runs. `nodes` may change while running (in-place rescale)."""

    nodes: NodeRange = Field(default_factory=NodeRange, description="Elastic node range.")
    gpus_per_node: int = Field(8, ge=0, le=64, description="Worker processes (one per GPU) per node; 0 runs one CPU process.")
    gpu_resource_name: str = Field(
        "nvidia.com/gpu",
        max_length=317,
        pattern=EXTENDED_RESOURCE_PATTERN,
        description="Extended resource that counts GPUs: a name with a domain (nvidia.com/gpu, amd.com/gpu), "
        "never cpu, memory, ephemeral-storage, hugepages-* or a kubernetes.io resource.",
        json_schema_extra={"x-kubernetes-validations": [
            cel(f"!self.matches('{KUBERNETES_DOMAIN}')", "must not be a kubernetes.io resource: name an extended resource")
        ]},
    )
    cpu: str | None = Field(
        None, max_length=32, pattern=K8S_QUANTITY_PATTERN, description="CPU request per worker pod (e.g. '32', '500m')."
    )
    memory: str | None = Field(
        None, max_length=32, pattern=K8S_QUANTITY_PATTERN,
        description="Memory request and limit per worker pod (e.g. '512Gi'); at least 64Mi.",
    )
    node_selector: dict[
        Annotated[str, StringConstraints(max_length=317, pattern=QUALIFIED_NAME_PATTERN)],
        Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE_PATTERN)],
    ] = Field(
        default_factory=dict,
        max_length=64,
        description="Node labels worker pods require (label keys and values).",
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Tolerations of worker pods.")
    priority_class_name: str = Field(
        "", max_length=253, pattern=OPTIONAL_DNS_SUBDOMAIN_PATTERN, description="PriorityClass of worker pods."
    )

    @field_validator("gpu_resource_name")
    @classmethod
    def _extended(cls, value: str) -> str:
        if re.match(KUBERNETES_DOMAIN, value):
            raise ValueError("must not be a kubernetes.io resource: name an extended resource")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and k8s_quantity(value) < MIN_MEMORY:
            raise ValueError(f"{value} is less than 64Mi: a trainer cannot start in it (a unit missing? e.g. '512Gi')")
        return value

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)


class Parallelism(Model):
    """Data-parallel strategy and numerics."""

    strategy: Literal["ddp", "fsdp"] = Field("fsdp", description="ddp (replicated) or fsdp (FSDP2 fully_shard per layer).")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 autocast where supported, else fp32.")
    activation_checkpointing: bool = Field(False, description="Recompute decoder-layer activations in backward.")


class Elastic(Model):
    """Rendezvous and failure-detection timing of the elastic job."""

    max_restarts: int = Field(10, ge=0, le=1000, description="torchrun restarts of the worker group before the job fails.")
    last_call_timeout: int = Field(3, ge=1, le=3600, description="Seconds the rendezvous waits for more nodes after min joined.")
    # torch's own defaults (5 s x 3). At 1 s x 2 a node whose agent stalls for 2 s (a loaded
    # host) is dropped from the rendezvous without being told, and its replacement then
    # trains beside it as a second worker group (README: faults on a real cluster).
    keep_alive_interval: int = Field(5, ge=1, le=600, description="Seconds between rendezvous heartbeats.")
    keep_alive_max_attempt: int = Field(
        3, ge=1, le=100,
        description="Missed heartbeats before a node counts as dead (interval x attempts: how long a dead node holds up the next round).",
    )
    process_group_timeout: int = Field(
        60, ge=5, le=7200, description="Seconds a collective (and init_process_group) waits for a hung (not dead) peer before the group fails and torchrun restarts it (torch default: 30 min). VLM_PG_TIMEOUT_SECONDS overrides it in the trainer."
    )
    external_store: bool = Field(
        True, description="Run the rendezvous store as its own Deployment + Service so losing worker-0 does not end the job."
    )
    shutdown_timeout: int = Field(
        90, ge=10, le=3600,
        description="Seconds torchrun gives its workers on SIGTERM (pod deletion, eviction, suspend) to finish the step and commit a stop checkpoint before SIGKILL (TORCH_ELASTIC_SHUTDOWN_TIMEOUT); the pod's termination grace period is this plus 30 s.",
    )


class Checkpoint(Model):
    """Sharded checkpoints (torch.distributed.checkpoint) uploaded to object storage."""

    uri: str = Field(max_length=2048, pattern=URI_PATTERN, description="s3://bucket/prefix/ (or file:// / a path for local runs).")
    interval: Quantity = Field(
        "30m",
        description="Steps (integer) or wall time ('30m', '2h') between checkpoints; stage ends always checkpoint.",
        json_schema_extra={"x-kubernetes-validations": INTERVAL_CEL},
    )
    keep: int = Field(3, ge=1, le=1000, description="Committed checkpoints kept per stage (stage-final ones are always kept).")
    credentials_secret: str | None = Field(
        None,
        max_length=253,
        pattern=NAME_PATTERN,
        description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (optional AWS_SESSION_TOKEN), injected as env via secretKeyRef.",
    )
    endpoint: str = Field(
        "", max_length=2048, pattern=ENDPOINT_PATTERN,
        description="Endpoint URL of an S3-compatible store (path-style addressing): http(s)://host[:port], "
        "no credentials (they come from credentialsSecret).",
    )
    region: str = Field("", max_length=64, pattern=r"^[a-z0-9-]*$", description="S3 region (default from the environment).")

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: Quantity) -> Quantity:
        unit, n = parse_interval(value)
        if unit == "steps" and n > MAX_STEPS:
            raise ValueError(f"at most {MAX_STEPS} steps")
        return value


class Metrics(Model):
    """Prometheus metrics served by global rank 0."""

    port: int = Field(
        9400, ge=1024, le=65535,
        description=f"Port of the /metrics endpoint on every worker; not {RDZV_PORT} (rendezvous) or {STORE_HEALTH_PORT} "
        "(store health).",
        json_schema_extra={"x-kubernetes-validations": [
            cel(f"!(self in {list(RESERVED_PORTS)})",
                f"must differ from the rendezvous port {RDZV_PORT} and the store's health port {STORE_HEALTH_PORT}")
        ]},
    )

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        if value in RESERVED_PORTS:
            raise ValueError(f"must differ from the rendezvous port {RDZV_PORT} and the store's health port {STORE_HEALTH_PORT}")
        return value
    pod_monitor: bool = Field(True, description="Create a PodMonitor (when the prometheus-operator CRD exists).")


IMMUTABLE = [cel("self == oldSelf", "is immutable once created; a changed recipe is a new run")]


class VLMPretrainRunSpec(Model):
    """A VLM pretraining recipe and where it runs."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                # Linear in stages x sources: map membership (`in s.mixture`) instead of a
                # search of the sources per mixture key. Source names are unique (list-map),
                # so as many sources named in a mixture as it has keys means all keys are sources.
                cel(
                    "self.stages.all(s, size(self.data.sources.filter(d, d.name in s.mixture)) == size(s.mixture))",
                    "every mixture key must name a source declared in data.sources",
                    ".stages",
                ),
                cel(  # a conditional, not ||: only the taken branch is evaluated
                    "has(self.model.visionEncoder) ? true : self.data.sources.all(d, d.modality == 'text' || "
                    "self.stages.all(s, !(d.name in s.mixture)))",
                    "a stage mixes image data, so model.visionEncoder is required",
                    ".model",
                ),
            ]
        }
    )
    image: str = Field(
        "ghcr.io/vlm-pretrain-operator/trainer:0.1.0", min_length=1, max_length=512, pattern=IMAGE_PATTERN,
        description="Trainer container image: [registry/]path[:tag][@digest], no whitespace.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Pull policy of the trainer image.")
    model: ModelSpec = Field(description="The VLM's parts.", json_schema_extra={"x-kubernetes-validations": IMMUTABLE})
    data: DataSpec = Field(description="Data sources.", json_schema_extra={"x-kubernetes-validations": IMMUTABLE})
    stages: list[Stage] = Field(
        min_length=1, max_length=16, description="Stages, run in order (names unique).",
        json_schema_extra={"x-kubernetes-validations": IMMUTABLE, **list_map()},
    )
    resources: Resources = Field(default_factory=Resources, description="Nodes, GPUs and scheduling.")
    parallelism: Parallelism = Field(default_factory=Parallelism, description="Distributed strategy and numerics.")
    elastic: Elastic = Field(default_factory=Elastic, description="Elastic rendezvous and failure detection.")
    checkpoint: Checkpoint = Field(description="Checkpoint location and cadence.")
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus metrics.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for initialisation and data order.")
    suspend: bool = Field(False, description="Suspend the running stage (resumes from its last checkpoint).")
    max_retries: int = Field(3, ge=0, le=100, description="Times a failed stage job is recreated before the run fails.")

    @model_validator(mode="after")
    def _cross(self) -> "VLMPretrainRunSpec":
        declared = {s.name: s for s in self.data.sources}
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("stages: stage names must be unique")
        for i, stage in enumerate(self.stages):
            unknown = sorted(set(stage.mixture) - set(declared))
            if unknown:
                raise FieldError(f"stages[{i}].mixture", f"unknown source(s) {unknown}; declared: {sorted(declared)}")
            if self.model.vision_encoder is None and any(
                declared[k].modality in MULTIMODAL for k in stage.mixture
            ):
                raise FieldError("model.visionEncoder", f"required: stage {stage.name!r} mixes image data")
            if stage.prune is not None and stage.prune.calibration.source not in declared:
                raise FieldError(
                    f"stages[{i}].prune.calibration.source", f"unknown source {stage.prune.calibration.source!r}"
                )
        llm_type = (self.model.llm.config or {}).get("model_type")
        if self.data.packing and llm_type in PACKING_UNSUPPORTED_LLMS:
            raise FieldError("data.packing", f"model.llm {llm_type!r} cannot keep packed samples apart "
                             f"({PACKING_UNSUPPORTED_LLMS[llm_type]}): set data.packing: false")
        return self

    def stage_index(self, name: str) -> int:
        for i, s in enumerate(self.stages):
            if s.name == name:
                return i
        raise KeyError(name)


class FieldError(ValueError):
    """A cross-field error that knows its own path (relative to spec)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------- status


class Condition(Model):
    """A Kubernetes-style condition."""

    type: str = Field(description="Ready, Progressing, Degraded or RendezvousReady.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, description="Generation the condition was computed for.")


class CheckpointRef(Model):
    """A committed checkpoint."""

    uri: str = Field(description="Checkpoint directory URI.")
    step: int = Field(description="Optimizer step.")
    time: str | None = Field(None, description="Commit time.")
    stage: str | None = Field(None, description="Stage it belongs to.")
    tokens: int | None = Field(None, description="Tokens the stage had trained at this checkpoint (final checkpoints).")
    validation_loss: dict[str, float] | None = Field(
        None, description="Held-out loss per modality at this checkpoint (final checkpoints of evaluating stages)."
    )


class VLMPretrainRunStatus(Model):
    """What the operator observed; written by the operator only."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Invalid"] | None = Field(
        None, description="Pending, Running, Succeeded, Failed, Suspended or Invalid."
    )
    stage: str | None = Field(None, description="Current stage name.")
    stage_index: int | None = Field(None, description="Index of the current stage.")
    step: int | None = Field(None, description="Latest optimizer step reported by rank 0.")
    tokens: int | None = Field(None, description="Tokens trained in this stage.")
    loss: float | None = Field(None, description="Latest training loss.")
    image_token_fraction: float | None = Field(None, description="Measured fraction of image tokens in recent steps.")
    world_size: int | None = Field(None, description="Worker processes in the current rendezvous.")
    nodes: int | None = Field(None, description="Nodes in the current rendezvous (from the trainer's metrics).")
    last_checkpoint: CheckpointRef | None = Field(None, description="Newest committed checkpoint.")
    final_checkpoints: dict[str, CheckpointRef] | None = Field(
        None, description="Final checkpoint of each finished stage, as its trainer confirmed it (termination message)."
    )
    restarts: int | None = Field(None, description="Elastic restarts reported by torchrun.")
    attempt: int | None = Field(None, description="Attempt number of the current stage job (0 = first).")
    job_name: str | None = Field(None, description="Current PyTorchJob.")
    start_time: str | None = Field(None, description="When the run started.")
    completion_time: str | None = Field(None, description="When the run finished.")
    observed_generation: int | None = Field(None, description="Generation the operator last acted on.")
    conditions: list[Condition] | None = Field(None, description="Ready, Progressing, Degraded.")


def parse_spec(spec: dict) -> VLMPretrainRunSpec:
    return VLMPretrainRunSpec.model_validate(spec)


# --------------------------------------------------------------------------- trainer config


class RunRef(Model):
    """The run a trainer process belongs to."""

    name: str = Field(description="VLMPretrainRun name.")
    namespace: str = Field("default", description="Namespace.")
    uid: str = Field("", description="Run uid (the rendezvous id).")


class TrainerConfig(Model):
    """What the operator renders into `<run>-<stage>-config` and the trainer reads:
    the whole spec plus which stage to run and where to start from. Never holds secrets."""

    api_version: Literal["pretrain.vlm.dev/v1alpha1"] = API_VERSION
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    run: RunRef
    stage: str = Field(description="Name of the stage this process trains.")
    spec: VLMPretrainRunSpec
    init_from: str | None = Field(
        None, description="Committed checkpoint (URI of its step directory) the stage starts from when it has none of its own."
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (local runs and tests).")

    @model_validator(mode="after")
    def _stage_exists(self) -> "TrainerConfig":
        if self.stage not in [s.name for s in self.spec.stages]:
            raise ValueError(f"stage {self.stage!r} is not in spec.stages")
        return self

    @property
    def stage_spec(self) -> Stage:
        return self.spec.stages[self.spec.stage_index(self.stage)]
