"""Per-sample losses and gradients of the same samples packed and unpacked (issue 18's
correctness check), shared by the one-process test and the torchrun worker
(`tests/support/packing_worker.py`, DDP and FSDP2 at world size 2).

A rank's samples (text, image-text, interleaved) are trained three ways on the same
weights: unpacked (one right-padded row per sample, attention mask), packed into one row
with transformers' SDPA document mask (rows kept, position ids restart per sample), and
packed padding-free (the row flattened, ``cu_seq_lens``, SDPA per sample:
``vlm_packed_sdpa``, the CPU default). For every sample k the rank backpropagates only
sample k's summed token loss, so the gradient (averaged over the ranks by DDP / FSDP2) is
a per-sample gradient; a sample that could see another one would change both its loss and
its gradient.
"""

from __future__ import annotations

import torch

from vlm_trainer.model import IGNORE_INDEX, PACKED_SDPA, set_attention, token_losses
from vlm_trainer.data.sequences import Encoded, SequenceBuilder, collate, collate_packed

SOURCES = ("text", "captions", "interleaved")
VARIANTS = ("unpacked", "packed-sdpa-mask", "packed-padding-free")


def encoded_samples(data: dict, builder: SequenceBuilder, image, per_source: int = 2) -> dict[str, list[Encoded]]:
    """The first ``per_source`` samples of each of text, captions and interleaved."""
    from vlm_trainer.data.shards import ImageTransform, ShardedSource

    transform = ImageTransform(image.size, image.mean, image.std)
    out = {}
    for name in SOURCES:
        d = data[name]
        src = ShardedSource(name=name, modality=d["modality"], shards=d["uri"], seed=0, shuffle=False, image=transform)
        items = []
        for raw in src.raw(0):
            sample = src.decode(raw)
            if sample is not None:
                items.append(builder.encode(sample, src.modality))
            if len(items) == per_source:
                break
        out[name] = items
    return out


def _sample_losses(logits: torch.Tensor, labels: torch.Tensor, spans) -> list[torch.Tensor]:
    """Summed next-token loss of each sample: (row, start, length) -> the losses predicting
    its labels start+1 .. start+length-1 (token_losses index t predicts label t+1)."""
    losses = token_losses(logits, labels)
    return [losses[row, start:start + n - 1].sum() for row, start, n in spans]


def _grads(params) -> torch.Tensor:
    parts = []
    for p in params:
        g = p.grad
        if g is None:
            parts.append(torch.zeros(p.numel()))
            continue
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        parts.append(g.detach().reshape(-1).clone())
    return torch.cat(parts)


def run_variants(module, inner, items: list[Encoded], pad_id: int, *, images_elsewhere: bool = True) -> dict:
    """{variant: {"losses": [float], "labels": [int], "grads": [tensor]}} for ``items``
    (this rank's samples, in order). ``module`` is what forward runs on (DDP, FSDP2 or the
    VLM), ``inner`` the VLM. Every rank must call this with the same number of samples."""
    params = [p for _, p in sorted(inner.named_parameters()) if p.requires_grad]
    out = {}
    for variant in VARIANTS:
        if variant == "unpacked":
            set_attention(inner.llm, "sdpa")
            batch = collate(items, pad_id)
            spans = [(i, 0, e.n_tokens) for i, e in enumerate(items)]
        else:
            set_attention(inner.llm, "sdpa" if variant == "packed-sdpa-mask" else PACKED_SDPA)
            batch = collate_packed([items], pad_id)  # every sample of the rank in one row
            if variant == "packed-padding-free":
                batch = batch.flattened()
            spans = batch.spans
        rec = {"losses": [], "labels": [], "grads": []}
        for k in range(len(items)):
            force = images_elsewhere and batch.n_images == 0
            logits = module(batch.input_ids, batch.attention_mask, batch.pixel_values,
                            n_image_positions=batch.n_image_tokens, force_vision=force,
                            position_ids=batch.position_ids, flash_kwargs=batch.flash_kwargs)
            losses = _sample_losses(logits, batch.labels, spans)
            losses[k].backward()
            rec["losses"].append(float(losses[k].detach()))
            row, start, n = spans[k]
            rec["labels"].append(int((batch.labels[row, start + 1:start + n] != IGNORE_INDEX).sum()))
            rec["grads"].append(_grads(params))
            for p in params:
                p.grad = None
        out[variant] = rec
    set_attention(inner.llm, "sdpa")
    return out


def compare(results: dict, *, rtol: float = 1e-4, atol: float = 1e-6) -> dict:
    """Assert every packed variant equals the unpacked one per sample; returns the largest
    relative differences seen (for the test's report)."""
    ref = results["unpacked"]
    worst = {}
    for variant in VARIANTS[1:]:
        got = results[variant]
        assert got["labels"] == ref["labels"], (variant, got["labels"], ref["labels"])
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=atol,
                                   msg=lambda m, v=variant: f"{v} losses: {m}")
        loss_rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got["losses"], ref["losses"]))
        grad_rel = 0.0
        for k, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol * max(1.0, float(r.abs().max())),
                                       msg=lambda m, v=variant, k=k: f"{v} gradient of sample {k}: {m}")
            grad_rel = max(grad_rel, float((g - r).abs().max() / r.abs().max().clamp_min(1e-12)))
        worst[variant] = {"loss_rel": loss_rel, "grad_rel": grad_rel}
    return worst
