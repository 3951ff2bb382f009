"""Process group, device, precision and data-parallel wrapping (DDP or FSDP2).

* :func:`init_distributed` joins the torchrun group when ``WORLD_SIZE``/``RANK`` are set
  (``nccl`` on CUDA, ``gloo`` on CPU) with ``spec.elastic.processGroupTimeout`` seconds
  as the collective timeout (a hung peer fails the group in seconds, not 30 minutes, and
  torchrun restarts it); ``VLM_PG_TIMEOUT_SECONDS`` overrides it (the launcher sets it from
  the spec). Without torchrun it is a single process (no group).
* :func:`resolve_precision`: ``bf16`` means bf16 compute where the device supports it
  (CUDA with bf16 support). CPUs run fp32 unless ``VLM_CPU_BF16=1`` (bf16 on CPU works but
  is slower than fp32 on most CPUs). Master weights, gradients' reduction and optimizer
  state stay fp32 in every case.
* :func:`parallelize`:
  - ``ddp``: ``DistributedDataParallel`` + ``torch.autocast`` for bf16;
    ``find_unused_parameters`` is on when the vision tower or projector is trainable (a
    text-only step does not use them).
  - ``fsdp``: FSDP2 on a 1-D ``init_device_mesh``: ``fully_shard`` on every LLM decoder
    layer and every vision-encoder layer, then on the root (embeddings, norms, head,
    projector, patch embeddings); bf16 via ``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)``.
  - optional activation checkpointing (``parallelism.activationCheckpointing``): the
    transformers gradient checkpointing of the LLM and the vision tower (non-reentrant),
    applied before sharding.
* Gradient accumulation: see `vlm_trainer.data.mixture` (rank slices and micro-batches): every
  rank runs the same number of micro-steps. DDP all-reduces on the last one only
  (``no_sync`` before); FSDP2 reduce-scatters every micro-step (sharded gradients).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def initialized(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.initialized and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.initialized and self.world_size > 1:
            dist.barrier()


def pg_timeout_seconds(default: int = 60) -> int:
    """The collective timeout: ``VLM_PG_TIMEOUT_SECONDS`` (set by the launcher from
    ``spec.elastic.processGroupTimeout``) when present, else ``default`` (the spec's value)."""
    raw = os.environ.get("VLM_PG_TIMEOUT_SECONDS", "").strip()
    try:
        return int(raw) if raw and int(raw) > 0 else int(default)
    except ValueError:
        log.warning("ignoring VLM_PG_TIMEOUT_SECONDS=%r (not an integer)", raw)
        return int(default)


def init_distributed(timeout_seconds: int = 60) -> DistContext:
    timeout_seconds = pg_timeout_seconds(timeout_seconds)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and os.environ.get("VLM_FORCE_CPU") != "1":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        return DistContext(0, 1, 0, device, None)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_seconds), **kwargs)
    return DistContext(rank, world, local_rank, device, backend)


def shutdown(ctx: DistContext) -> None:
    if ctx.initialized and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group at exit must not mask the real result
            log.debug("destroy_process_group failed", exc_info=True)


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype for autocast / FSDP param_dtype, or None for plain fp32."""
    if requested != "bf16":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if os.environ.get("VLM_CPU_BF16") == "1" else None


@dataclasses.dataclass
class Parallel:
    """The wrapped model and how to run a micro-step on it."""

    module: nn.Module  # what forward() is called on (DDP / FSDP / plain)
    inner: nn.Module  # the VLM itself (FSDP2 shards it in place, so it is `module` there)
    strategy: str
    compute_dtype: torch.dtype | None
    device: torch.device

    def autocast(self):
        if self.compute_dtype is not None and self.strategy != "fsdp":
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def sync_context(self, sync: bool):
        """DDP: gradient all-reduce only on the last micro-step of an optimizer step (no_sync).
        FSDP2: reduce-scatter on every micro-step (the default), so gradients stay sharded
        between micro-steps; skipping it would keep unsharded gradients of the whole model
        (DDP's memory) and trips an FSDP2 bug with mixed precision when a module (the vision
        tower on a text-only step) did not run."""
        if self.strategy == "ddp" and not sync:
            return self.module.no_sync()
        return contextlib.nullcontext()


def enable_activation_checkpointing(vlm) -> None:
    for part in (vlm.llm, vlm.vision):
        if part is not None and getattr(part, "supports_gradient_checkpointing", False):
            part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def parallelize(vlm, *, strategy: str, precision: str, activation_checkpointing: bool, ctx: DistContext) -> Parallel:
    dtype = resolve_precision(precision, ctx.device)
    if precision == "bf16" and dtype is None:
        log.info("precision bf16 requested; %s runs fp32 (set VLM_CPU_BF16=1 to force bf16 on CPU)", ctx.device)
    if activation_checkpointing:
        enable_activation_checkpointing(vlm)
    vlm.to(ctx.device)
    if not ctx.initialized or (strategy == "ddp" and ctx.world_size == 1):
        # DDP over a group of one all-reduces with itself: pure overhead (~15% of a demo
        # step). A world-size change restarts the workers, so this is decided per group.
        return Parallel(vlm, vlm, "single", dtype, ctx.device)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None else MixedPrecisionPolicy()
        blocks = list(vlm.decoder_layers())
        vision_layers = vlm.vision_layers()
        if vision_layers is not None:
            blocks += list(vision_layers)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(vlm, mesh=mesh, mp_policy=mp)
        return Parallel(vlm, vlm, "fsdp", dtype, ctx.device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        find_unused = any(p.requires_grad for part in (vlm.vision, vlm.projector) if part is not None for p in part.parameters())
        ddp = DDP(vlm, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                  find_unused_parameters=find_unused, forward_sync_buffers=False)
        return Parallel(ddp, vlm, "ddp", dtype, ctx.device)
    raise ValueError(f"unknown parallelism strategy {strategy!r}")
