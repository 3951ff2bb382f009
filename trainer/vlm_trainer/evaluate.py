"""Held-out loss per source and per modality (text vs image-text vs interleaved).

Every source with a ``validationUri`` (multimodal ones only when the model has a vision
encoder) contributes a fixed set: its first ``evalBatches x microBatchSize`` decodable
samples in shard order, the same whatever the world size. Ranks split each set like a
training batch (`mixture.rank_slice` / `mixture.micro_batches`), sum token losses and
label counts, and all-reduce them once, so the result is the exact mean next-token loss
over the set's label tokens (image positions and padding excluded). A modality's loss is
pooled over its sources' tokens. Run by every rank (collectives), reported by rank 0.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from .data.loader import validation_set
from .distributed import DistContext, Parallel
from .data.mixture import micro_batches, rank_slice
from .model import token_losses
from .data.sequences import Encoded, SequenceBuilder, collate, dummy_batch
from .data.shards import ShardedSource

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalResult:
    by_modality: dict[str, float]
    by_source: dict[str, float]
    tokens: dict[str, int]


class Evaluator:
    def __init__(self, sources: dict[str, ShardedSource], builder: SequenceBuilder, *, samples_per_source: int,
                 micro_batch_size: int, ctx: DistContext):
        self.sources = dict(sorted(sources.items()))
        self.builder = builder
        self.samples_per_source = samples_per_source
        self.micro_batch_size = micro_batch_size
        self.ctx = ctx
        self._sets: dict[str, list[Encoded]] | None = None
        self._layout: list[tuple[str, list]] | None = None
        self._global_images: list[int] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.sources) and self.samples_per_source > 0

    def _prepare(self) -> None:
        if self._sets is not None:
            return
        self._sets = {name: validation_set(src, self.builder, self.samples_per_source) for name, src in self.sources.items()}
        ctx = self.ctx
        self._layout = []
        local_images = []
        for name, items in self._sets.items():
            mine = [items[i] for i in rank_slice(len(items), ctx.world_size, ctx.rank)]
            parts = micro_batches(len(mine), max(len(items), 1), ctx.world_size, self.micro_batch_size)
            micro = [[mine[i] for i in part] for part in parts]
            self._layout.append((name, micro))
            local_images += [sum(len(e.images) for e in m) for m in micro]
        counts = torch.tensor(local_images, dtype=torch.float64, device=ctx.device)
        self._global_images = [int(x) for x in ctx.all_reduce_sum(counts).tolist()]

    @torch.no_grad()
    def run(self, par: Parallel) -> EvalResult:
        self._prepare()
        model = par.module if par.strategy == "fsdp" else par.inner
        was_training = model.training
        model.eval()
        sums = torch.zeros(2 * len(self._layout), dtype=torch.float64, device=par.device)
        k = 0
        try:
            for s_idx, (name, micro) in enumerate(self._layout):
                for items in micro:
                    batch = collate(items, self.builder.tok.pad_id) if items else dummy_batch(self.builder.tok)
                    batch = batch.to(par.device)
                    force = self._global_images[k] > 0 and batch.n_images == 0
                    k += 1
                    with par.autocast():
                        logits = model(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                       n_image_positions=batch.n_image_tokens, force_vision=force)
                    losses = token_losses(logits, batch.labels)
                    sums[2 * s_idx] += losses.sum().double()
                    sums[2 * s_idx + 1] += float(batch.n_label_tokens)
        finally:
            model.train(was_training)
        sums = self.ctx.all_reduce_sum(sums).tolist()
        by_source, tokens, pooled = {}, {}, {}
        for s_idx, (name, _) in enumerate(self._layout):
            total, count = sums[2 * s_idx], sums[2 * s_idx + 1]
            by_source[name] = total / count if count else math.nan
            tokens[name] = int(count)
            modality = self.sources[name].modality
            acc = pooled.setdefault(modality, [0.0, 0.0])
            acc[0] += total
            acc[1] += count
        by_modality = {m: (t / c if c else math.nan) for m, (t, c) in sorted(pooled.items())}
        return EvalResult(by_modality, by_source, tokens)
