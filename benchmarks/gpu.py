"""GPU section (issues 4, 8): tokens/s and MFU of OUR trainer code on a 1B-class VLM, bf16,
FSDP2, activation checkpointing, sequence length 2048, on realistic batches; plus the same
LLM text-only as the anchor (MPT-1B reports ~42% MFU text-only on H100, packed; the goal
for the VLM is >= 40% on real tokens).

    python -m benchmarks gpu [--quick] [--only vlm llm] [--steps N] [--peak-tflops T] [--out DIR]
    python -m benchmarks.gpu ... [--no-packed]             # without the VLM's packed arm
    torchrun --nproc-per-node 8 -m benchmarks gpu          # FSDP2 over 8 GPUs
    python -m benchmarks gpu --cpu-smoke --quick --steps 1  # the same code at toy size on CPU (tests)

Without CUDA (and without ``--cpu-smoke``) it prints why and exits 0 (``status: skipped``
under ``benchmarks all``). No network: inline configs, random weights, generated data.

What runs is the trainer's own code: ``vlm_trainer.model.build_vlm`` (a transformers
``LlamaForCausalLM`` + ``SiglipVisionModel`` + the ``mlp2x_gelu`` projector, image
placeholders replaced by projected patch embeddings), ``vlm_trainer.policy.apply_trainable``
(``examples/run.yaml``'s pretrain stage: vision encoder frozen, projector and LLM trained),
``vlm_trainer.distributed.parallelize`` (FSDP2 ``fully_shard`` per decoder and vision layer
then the root, ``MixedPrecisionPolicy(bf16 params, fp32 reduce)``, transformers'
non-reentrant activation checkpointing), the trainer's AdamW groups, ``loss_sum``, and the
micro-step of ``Trainer.train_step`` (forward, loss, backward, grad clip, AdamW step,
zero_grad; not its per-step count all-reduce, loss ``.item()`` and ``float(grad_norm)``,
which synchronise with the GPU once per step).

**Batches** are what the trainer's data path would build, without shard I/O: samples
generated from a length mix like ``examples/run.yaml``'s pretrain stage after images enter
(token fractions dclm 0.85, datacomp-dr 0.10, obelics 0.05; the anchor: dclm alone), planned
by the trainer's ``MixturePlanner`` (token fractions -> per-sample probabilities from the
sources' mean lengths), encoded by its ``SequenceBuilder`` (bos, text, 729 placeholders per
image, eos; truncation at seqLength, an image never cut) and padded by its ``collate`` to the
longest sequence of the micro-batch. The VLM also trains **packed** in the same invocation
(issue 18; ``PACKED_ARMS``, :func:`packed_steps`), on the same generated mix, as the trainer's
packed data path builds it: its ``PackingPlanner`` (token budget = the unpacked arm's
positions, micro-batch x world x seqLength), ``rank_slice`` of the rows, ``micro_batches``,
``collate_packed``; the attention implementation is the trainer's (``packed_attention`` then
``check_packing`` on the CPU copy before sharding: ``flash_attention_2`` on CUDA with
flash-attn, else ``sdpa`` with block-diagonal masks; ``vlm_packed_sdpa`` on CPU) and, where it
flattens, every micro-batch is one row of real tokens with ``flash_kwargs`` (cu_seq_lens built
on the CPU: no device sync). A packed step is all of the rank's micro-batches (gradient
accumulation, as ``Trainer.train_step``); the forward gets ``position_ids`` and
``flash_kwargs``. The result JSON has ``configs`` (unpacked), ``packed_configs`` and
``packed_vs_unpacked_real_tokens_per_s`` (packed / unpacked real tokens/s). The generated
lengths (in tokens; the builtin byte tokenizer makes one token per ASCII character) are
assumptions, not statistics of the real data sets:

* dclm (web text): log-normal, median 600 tokens, sigma 1.0 (mean ~1,000; ~20% longer than
  2048 and truncated);
* datacomp-dr (image-caption pairs): one image + a caption, log-normal median 30 tokens;
* obelics (interleaved documents): 1-3 images, each after a paragraph of log-normal median
  120 tokens, then a closing paragraph.

Every step has a different micro-batch (``warmup + steps`` of them, generated and pinned
before the clock starts). The timed loop has no GPU-CPU synchronisation of its own: label
counts come from the CPU-side batch, host-to-device copies are non-blocking from pinned
memory, per-step times are CUDA events read after the loop, and the headline step time is
the wall time of the whole loop (one synchronisation before, one after) / steps. After the
loop one more step runs under ``torch.cuda.set_sync_debug_mode("warn")`` to count the
synchronisations the model code itself makes (``syncs_per_step``; they are part of what is
measured). Between configurations everything is deleted, then ``gc.collect()`` and
``torch.cuda.empty_cache()``; peak memory is reset per configuration.

**FLOPs** (MFU = model FLOPs / time / (peak x GPUs)), the convention of PaLM (app. B) and
MPT/llm-foundry; :func:`step_flops`:

* LLM: ``6 x N x T + 12 x L x d x sum_i S_i^2`` over the sequences i of the step (T = sum of
  their lengths S_i): N = the parameters that do matmuls (all but the input embedding table,
  a lookup; the untied LM head counts), L layers, d hidden. The attention term counts the
  full S x S score matrix (QK^T and AV, forward and backward); a causal kernel computes
  about half of it (``mfu_causal``: 6 instead of 12).
* Vision encoder on P patch tokens per image and I images: forward only when frozen
  (``2 x N_v x P x I + 4 x L_v x d_v x P^2 x I``), ``3x`` that when it trains.
* Projector: ``6 x N_p x P x I`` (it trains).
* Activation-checkpoint recomputation is not counted (MFU, not HFU).

Two MFUs per configuration: ``mfu`` counts the real (non-padding) positions only, each
sequence at its own length: the useful work, the figure the >= 40% target is about;
``mfu_dense`` counts the padded batch shape [B, L_pad], what the GPU computed. Their
difference is the padding. Packed, ``mfu`` counts attention per sample (``Batch.spans``) on the
real tokens (``Batch.n_tokens``); ``mfu_dense`` counts whole rows (a masked kernel) or, for a
flattened micro-batch (a variable-length kernel: per sample, no padding), equals ``mfu``;
``row_padding_share`` is the padding of the collated rows before flattening.
``tests/test_bench_gpu.py`` checks the formula against ``torch.utils.flop_counter.FlopCounterMode``
(within 5%) on a small model with padding, and on packed rows.
``mfu_trainer_formula`` is what the trainer's ``vlmtrain_mfu_ratio`` metric would report for
the same step (``6 x all LLM params x tokens + 2 x vision params x patches``: no attention
term), so the dashboard figure can be read against this one.

**Peak** dense bf16 tensor-core FLOP/s per GPU from :data:`PEAK_TABLE` (NVIDIA datasheets,
the sparse figures halved), matched on ``torch.cuda.get_device_name()``; a device the table
does not know is an error unless ``--peak-tflops`` gives its peak (a wrong peak would make
every MFU wrong, silently).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import socket
import sys
import time
import warnings
import zlib
from pathlib import Path

LLM_CONFIG = {
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
}
VISION_CONFIG = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
}
# The CPU smoke configuration (tests: the same code path at toy size).
TINY_LLM = {**LLM_CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}
TINY_VISION = {**VISION_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
TINY_SEQ = 128

LABELS = {
    "vlm": "VLM: 1.1B Llama + SigLIP-so400m (frozen) + mlp2x_gelu, bf16, FSDP2, act. ckpt, seq 2048",
    "llm": "anchor: the same 1.1B Llama text-only, bf16, FSDP2, act. ckpt, seq 2048",
}

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU: NVIDIA's datasheet figures, whose
# headline numbers are "with sparsity", halved. First match on the upper-cased device name wins,
# so the NVL/PCIe variants come before the SXM pattern of the same chip.
PEAK_TABLE: tuple[tuple[str, str, float], ...] = (
    ("H100 NVL", r"H100.*NVL", 835.5e12),
    ("H100 PCIe", r"H100.*PCIE", 756.5e12),
    ("H100 SXM", r"H100.*(SXM|HBM3)", 989.5e12),  # SXM5 reports "NVIDIA H100 80GB HBM3"
    ("H200 NVL", r"H200.*NVL", 835.5e12),
    ("H200 SXM", r"H200", 989.5e12),  # SXM reports "NVIDIA H200"
    ("A100", r"A100", 312e12),  # SXM4 and PCIe, 40 and 80 GB
    ("B200", r"\bB200\b", 2250e12),  # HGX B200
)
CPU_SMOKE_PEAK = 1e12  # nominal: CPU smoke MFU is only comparable with itself

# examples/run.yaml's pretrain stage once images enter (token fractions), and the text anchor
MIXTURES = {"vlm": {"dclm": 0.85, "datacomp-dr": 0.10, "obelics": 0.05}, "llm": {"dclm": 1.0}}
MODALITY = {"dclm": "text", "datacomp-dr": "image-text", "obelics": "interleaved"}
PACKED_ARMS = ("vlm",)  # configurations that also train packed (issue 18), right after their unpacked arm


class UnknownDevice(RuntimeError):
    pass


def peak_flops_for(device_name: str, peak_tflops: float | None = None) -> tuple[float, str]:
    """(dense bf16 peak FLOP/s, where it came from) for a CUDA device name."""
    if peak_tflops:
        return float(peak_tflops) * 1e12, "--peak-tflops"
    name = device_name.upper()
    for label, pattern, peak in PEAK_TABLE:
        if re.search(pattern, name):
            return peak, f"table: {label}"
    known = ", ".join(label for label, _, _ in PEAK_TABLE)
    raise UnknownDevice(f"no dense bf16 peak known for the device {device_name!r} (the table has {known}): "
                        "pass --peak-tflops with its dense (not sparse) bf16 tensor-core TFLOP/s per GPU")


def spec_dict(*, vision: bool, tiny: bool = False, seq_length: int = 2048, micro_batch: int = 8) -> dict:
    model = {"llm": {"config": dict(TINY_LLM if tiny else LLM_CONFIG)}, "projector": {"type": "mlp2x_gelu"},
             "tokenizer": {"builtin": "bytes"}}
    sources = [{"name": "dclm", "modality": "text", "uri": "s3://bench/dclm/{0000..0009}.tar"}]
    mixture = dict(MIXTURES["llm"])
    trainable = {"projector": True, "llm": "all"}
    if vision:
        model["visionEncoder"] = {"config": dict(TINY_VISION if tiny else VISION_CONFIG)}
        sources += [{"name": "datacomp-dr", "modality": "image-text", "uri": "s3://bench/dcdr/{0000..0009}.tar"},
                    {"name": "obelics", "modality": "interleaved", "uri": "s3://bench/obelics/{0000..0009}.tar"}]
        mixture = dict(MIXTURES["vlm"])
        trainable["visionEncoder"] = False
    return {
        "model": model,
        "data": {"seqLength": seq_length, "sources": sources},
        "stages": [{"name": "pretrain", "steps": 1000, "mixture": mixture, "trainable": trainable,
                    "optimizer": {"lr": 3.0e-4, "schedule": "cosine", "warmupSteps": 10, "weightDecay": 0.1},
                    "globalBatchTokens": micro_batch * seq_length, "microBatchSize": micro_batch}],
        "resources": {"nodes": {"min": 1, "max": 1}, "gpusPerNode": 1},
        "parallelism": {"strategy": "fsdp", "precision": "bf16", "activationCheckpointing": True},
        "checkpoint": {"uri": "s3://bench/ckpt/", "interval": 1000, "keep": 1},
        "metrics": {"port": 9400, "podMonitor": False},
    }


# --------------------------------------------------------------------------- FLOPs


def matmul_params(llm) -> int:
    """LLM parameters that take part in matmuls: all but the input embedding table (a
    lookup); a tied head shares the table and then counts once."""
    total = sum(p.numel() for p in llm.parameters())
    emb = llm.get_input_embeddings().weight
    out = llm.get_output_embeddings()
    tied = out is not None and out.weight is emb
    return total if tied else total - emb.numel()


def step_flops(*, n_llm: int, llm_layers: int, llm_hidden: int, seq_lens, n_vision: int = 0,
               vision_layers: int = 0, vision_hidden: int = 0, patches_per_image: int = 0, images: int = 0,
               vision_trains: bool = False, n_projector: int = 0, causal: bool = False) -> dict:
    """Model FLOPs of one training step, by part (see module doc). ``seq_lens``: the length
    of every sequence the LLM processes in the step (the padded length for the dense
    figure, each sequence's real length for the real-token one)."""
    seq_lens = [int(s) for s in seq_lens]
    tokens = sum(seq_lens)
    attn_factor = 6 if causal else 12
    llm_dense = 6.0 * n_llm * tokens
    llm_attn = float(attn_factor) * llm_layers * llm_hidden * sum(s * s for s in seq_lens)
    vis_mult = 3.0 if vision_trains else 1.0  # forward + backward = 3 x forward
    patches = patches_per_image * images
    vis_dense = vis_mult * 2.0 * n_vision * patches
    vis_attn = vis_mult * 4.0 * vision_layers * vision_hidden * patches_per_image * patches
    proj = 6.0 * n_projector * patches
    return {"llm_dense": llm_dense, "llm_attention": llm_attn, "vision_dense": vis_dense, "vision_attention": vis_attn,
            "projector": proj, "total": llm_dense + llm_attn + vis_dense + vis_attn + proj, "tokens": tokens}


def model_shape(vlm, trainable_vision: bool) -> dict:
    """The step_flops arguments that depend on the model only."""
    from vlm_trainer.model import count_params

    cfg = vlm.llm.config
    vcfg = vlm.vision.config if vlm.vision is not None else None
    return dict(n_llm=matmul_params(vlm.llm), llm_layers=int(cfg.num_hidden_layers), llm_hidden=int(cfg.hidden_size),
                n_vision=count_params(vlm.vision), vision_layers=int(vcfg.num_hidden_layers) if vcfg else 0,
                vision_hidden=int(vcfg.hidden_size) if vcfg else 0, patches_per_image=int(vlm.tokens_per_image),
                vision_trains=bool(trainable_vision), n_projector=count_params(vlm.projector))


def batch_flops(shape: dict, batch, *, dense: bool, causal: bool = False) -> dict:
    """FLOPs of one micro-batch: ``dense`` counts every row at the padded length (what a
    masked kernel computes); otherwise each sample at its own length. A packed batch's
    samples are its ``spans``; flattened (one row of real tokens, ``flash_kwargs``), its
    variable-length kernel attends per sample, so its dense figure is its real one."""
    rows, length = (int(x) for x in batch.attention_mask.shape)
    if batch.spans is not None and not (dense and batch.flash_kwargs is None):
        seq_lens = [int(n) for _, _, n in batch.spans]
    elif dense:
        seq_lens = [length] * rows
    else:
        seq_lens = [int(n) for n in batch.attention_mask.sum(dim=1).tolist()]
    return step_flops(**shape, seq_lens=seq_lens, images=batch.n_images, causal=causal)


# --------------------------------------------------------------------------- realistic batches


def _text(rng, n: int) -> str:
    """n ASCII characters (n tokens with the byte tokenizer): words of 2-9 letters."""
    out, size = [], 0
    while size < n:
        w = "".join(chr(97 + c) for c in rng.integers(0, 26, int(rng.integers(2, 10))))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:max(1, n)]


def _lognormal(rng, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(float(rng.lognormal(math.log(median), sigma))))))


def make_sample(source: str, index: int, *, seq: int, image_size: int, seed: int = 0):
    """Sample ``index`` of a generated source (deterministic for (source, index, seed)).
    Text lengths scale with ``seq`` / 2048 so that the toy CPU smoke keeps the mix's shape."""
    import numpy as np

    from vlm_trainer.data.shards import ImageSeg, Sample, TextSeg

    rng = np.random.default_rng([seed, zlib.crc32(source.encode()), index])
    k = seq / 2048

    def image():
        return ImageSeg(rng.standard_normal((3, image_size, image_size), dtype=np.float32))

    if source == "dclm":
        segs = [TextSeg(_text(rng, _lognormal(rng, 600 * k, 1.0, 8, 16 * seq)))]
    elif source == "datacomp-dr":
        segs = [image(), TextSeg(_text(rng, _lognormal(rng, 30 * k, 0.5, 3, 200)))]
    elif source == "obelics":
        segs = []
        for _ in range(int(rng.integers(1, 4))):
            segs += [TextSeg(_text(rng, _lognormal(rng, 120 * k, 0.8, 3, 2 * seq))), image()]
        segs.append(TextSeg(_text(rng, _lognormal(rng, 120 * k, 0.8, 3, 2 * seq))))
    else:
        raise ValueError(f"unknown generated source {source!r}")
    return Sample(key=f"{source}-{index:08d}", source=source, segments=segs, index=index)


def realistic_batches(name: str, *, tok, tokens_per_image: int, image_size: int, seq: int, micro_batch: int,
                      n_steps: int, rank: int = 0, world_size: int = 1, seed: int = 0, probe: int = 64) -> list:
    """``n_steps`` micro-batches (one per step) of this rank, as the trainer's data path
    builds them from the generated mix: MixturePlanner -> SequenceBuilder -> collate."""
    from vlm_trainer.data.mixture import MixturePlanner, rank_slice
    from vlm_trainer.data.sequences import collate

    mixture, encoded, stats = _source(name, tok=tok, tokens_per_image=tokens_per_image, image_size=image_size, seq=seq,
                                      seed=seed, probe=probe)
    planner = MixturePlanner(stage="pretrain", mixture=mixture, modality=MODALITY, stats=stats,
                             global_batch=micro_batch * world_size, total_steps=max(1, n_steps),
                             visual_introduce_at=0.0, seed=seed)
    batches = []
    for _ in range(n_steps):
        plan = planner.next()
        slots = [plan.slots[i] for i in rank_slice(len(plan.slots), world_size, rank)]
        batches.append(collate([encoded(sl.source, sl.index) for sl in slots], tok.pad_id))
    return batches


def _source(name: str, *, tok, tokens_per_image: int, image_size: int, seq: int, seed: int, probe: int):
    """(mixture, encode(source, index), the trainer's probe SourceStats) of a generated mix."""
    from vlm_trainer.data.mixture import SourceStats
    from vlm_trainer.data.sequences import SequenceBuilder

    builder = SequenceBuilder(tok, tokens_per_image=tokens_per_image, seq_length=seq)
    mixture = MIXTURES[name]

    def encoded(source: str, index: int):
        return builder.encode(make_sample(source, index, seq=seq, image_size=image_size, seed=seed), MODALITY[source])

    stats = {}
    for s in mixture:  # the probe the trainer makes (SourceStats): mean tokens and image share per sample
        enc = [encoded(s, 10**6 + i) for i in range(probe)]
        tokens = sum(e.n_tokens for e in enc)
        stats[s] = SourceStats(mean_tokens=tokens / probe, image_fraction=sum(e.n_image_tokens for e in enc) / tokens,
                               probed=probe)
    return mixture, encoded, stats


def packed_steps(name: str, *, tok, tokens_per_image: int, image_size: int, seq: int, micro_batch: int,
                 n_steps: int, rank: int = 0, world_size: int = 1, seed: int = 0, probe: int = 64) -> list:
    """``n_steps`` packed steps of this rank (each a list of micro-batches, not flattened), as
    the trainer's packed data path builds them from the same generated mix: PackingPlanner
    (token budget micro_batch x world x seq: the unpacked arm's positions) -> rank_slice of
    the rows -> micro_batches -> collate_packed."""
    from vlm_trainer.data.mixture import micro_batches, rank_slice
    from vlm_trainer.data.packing import Measured, PackingPlanner
    from vlm_trainer.data.sequences import collate_packed, dummy_batch

    mixture, encoded, stats = _source(name, tok=tok, tokens_per_image=tokens_per_image, image_size=image_size, seq=seq,
                                      seed=seed, probe=probe)
    planner = PackingPlanner(seq_length=seq, token_budget=micro_batch * world_size * seq, stage="pretrain",
                             mixture=mixture, modality=MODALITY, stats=stats, global_batch=micro_batch * world_size,
                             total_steps=max(1, n_steps), visual_introduce_at=0.0, seed=seed)
    cache = {}

    def measure(source: str, index: int):
        e = cache[(source, index)] = encoded(source, index)
        return Measured(e.n_tokens, e.n_image_tokens)

    steps = []
    for _ in range(n_steps):
        plan = planner.next_packed(measure)
        mine = [[cache[(sl.source, sl.index)] for sl in plan.rows[r]]
                for r in rank_slice(len(plan.rows), world_size, rank)]
        # as the trainer: a rank-independent number of micro-batches, a dummy where a rank has no row
        steps.append([collate_packed([mine[i] for i in part], tok.pad_id) if len(part) else dummy_batch(tok)
                      for part in micro_batches(len(mine), len(plan.rows), world_size, micro_batch)])
    return steps


# --------------------------------------------------------------------------- process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(allow_cpu: bool = False):
    """Join torchrun's group, or make a group of one (plain python)."""
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    if allow_cpu:
        os.environ["VLM_FORCE_CPU"] = "1"
    from vlm_trainer.distributed import init_distributed

    return init_distributed(600)


# --------------------------------------------------------------------------- one configuration


def _pinned(batch):
    import torch

    return dataclasses.replace(
        batch, input_ids=batch.input_ids.pin_memory(), attention_mask=batch.attention_mask.pin_memory(),
        labels=batch.labels.pin_memory(),
        pixel_values=None if batch.pixel_values is None else batch.pixel_values.pin_memory(),
        position_ids=None if batch.position_ids is None else batch.position_ids.pin_memory(),
        flash_kwargs=None if batch.flash_kwargs is None else {
            k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.flash_kwargs.items()})


def _sum_parts(parts: list[dict]) -> dict:
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def measure(name: str, *, ctx, tiny: bool, micro_batch: int, seq: int, steps: int, warmup: int,
            peak: tuple[float, str], packed: bool = False) -> dict:
    import torch

    from vlm_api.schema import parse_spec
    from vlm_trainer.distributed import parallelize
    from vlm_trainer.metrics import step_flops as trainer_step_flops
    from vlm_trainer.model import build_vlm, check_packing, count_params, flattens, loss_sum, packed_attention
    from vlm_trainer.policy import apply_trainable, param_groups
    from vlm_trainer.schedule import build_optimizer
    from vlm_trainer.tokenizer import load_tokenizer

    vision = name == "vlm"
    spec = parse_spec(spec_dict(vision=vision, tiny=tiny, seq_length=seq, micro_batch=micro_batch))
    stage = spec.stages[0]
    device = ctx.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_build = time.perf_counter()
    tok = load_tokenizer(spec.model)
    vlm = build_vlm(spec.model, tok, seed=0)
    apply_trainable(vlm, stage.trainable)
    shape = model_shape(vlm, bool(stage.trainable.vision_encoder))
    n_llm_all, n_vision, n_proj = count_params(vlm.llm), count_params(vlm.vision), count_params(vlm.projector)
    tpi = int(vlm.tokens_per_image)
    attention = None
    if packed:  # as the trainer: checked and set on the CPU copy, before sharding
        attention = check_packing(vlm.llm, packed_attention(vlm.llm, device, seq))
    par = parallelize(vlm, strategy="fsdp", precision="bf16", activation_checkpointing=True, ctx=ctx)
    optimizer = build_optimizer(param_groups(par.module, stage.optimizer.weight_decay), stage.optimizer, fused=False)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    build_s = time.perf_counter() - t_build

    t_data = time.perf_counter()
    data_kw = dict(tok=tok, tokens_per_image=tpi, image_size=vlm.image_spec.size if vlm.image_spec else 0, seq=seq,
                   micro_batch=micro_batch, n_steps=warmup + steps, rank=ctx.rank, world_size=ctx.world_size)
    if packed:  # each step: the rank's micro-batches of packed rows
        batches = packed_steps(name, **data_kw)
        row_positions = [sum(b.n_positions for b in s) for s in batches[warmup:]]  # before flattening
        if flattens(attention):
            batches = [[b.flattened() for b in s] for s in batches]
    else:  # each step: one padded micro-batch
        batches = [[b] for b in realistic_batches(name, **data_kw)]
        row_positions = [sum(b.n_positions for b in s) for s in batches[warmup:]]
    if cuda:
        batches = [[_pinned(b) for b in s] for s in batches]
    data_s = time.perf_counter() - t_data

    def step(micro) -> None:
        labels = max(1, sum(b.n_label_tokens for b in micro))  # label count from the CPU batches
        for i, batch in enumerate(micro):
            b = batch.to(device)  # non-blocking from pinned memory on CUDA
            with par.sync_context(i == len(micro) - 1):  # reduce gradients on the last micro-batch
                with par.autocast():  # packed: position_ids (+ flash_kwargs) and no mask, as Trainer.train_step
                    logits = par.module(b.input_ids, b.attention_mask, b.pixel_values,
                                        n_image_positions=b.n_image_tokens, position_ids=b.position_ids,
                                        flash_kwargs=b.flash_kwargs)
                (loss_sum(logits, b.labels) / labels).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
        if ctx.world_size > 1:
            ctx.barrier()

    for i in range(warmup):  # untimed; synchronising here is harmless
        step(batches[i])
        sync()
    timed = batches[warmup:]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in timed] if cuda else []
    cpu_times = []
    sync()
    t0 = time.perf_counter()
    for i, batch in enumerate(timed):  # no synchronisation in here
        if cuda:
            events[i][0].record()
        else:
            tc = time.perf_counter()
        step(batch)
        if cuda:
            events[i][1].record()
        else:
            cpu_times.append(time.perf_counter() - tc)
    sync()
    wall = time.perf_counter() - t0
    per_step = [a.elapsed_time(b) / 1000 for a, b in events] if cuda else cpu_times

    syncs, sync_sites = None, []
    if cuda:  # one more step, outside the timing, to count the model code's own synchronisations
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(timed[0])
            finally:
                torch.cuda.set_sync_debug_mode(0)
        msgs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        syncs, sync_sites = len(msgs), sorted(set(msgs))[:10]
        sync()

    step_s = wall / len(timed)
    micros = [b for s in timed for b in s]
    dense = _sum_parts([batch_flops(shape, b, dense=True) for b in micros])
    real = _sum_parts([batch_flops(shape, b, dense=False) for b in micros])
    real_causal = _sum_parts([batch_flops(shape, b, dense=False, causal=True) for b in micros])
    n = len(timed)
    positions = dense["tokens"] / n
    real_tokens = real["tokens"] / n
    images = sum(b.n_images for b in micros) / n
    image_tokens = sum(b.n_image_tokens for b in micros) / n
    trainer_flops = sum(trainer_step_flops(llm_params=n_llm_all, vision_params=n_vision,
                                           tokens=b.n_text_tokens + b.n_image_tokens, patches=b.n_images * tpi,
                                           vision_trains=bool(stage.trainable.vision_encoder)) for b in micros) / n
    peak_flops, peak_source = peak
    per_step_sorted = sorted(per_step)
    rec = {
        "name": name,
        "label": LABELS[name] + (f", packed ({attention})" if packed else "") + (" (tiny CPU smoke)" if tiny else ""),
        "packing": packed, "attention": attention if packed else "sdpa (padding mask)",
        "micro_batches_per_step": len(micros) / n, "samples_per_step": sum(b.n_samples for b in micros) / n,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "world_size": ctx.world_size,
        "micro_batch": micro_batch, "seq_length": seq, "steps": n, "warmup": warmup,
        "mixture": MIXTURES[name], "images_per_step": images, "image_token_share": image_tokens / real_tokens,
        "positions_per_step": positions, "real_tokens_per_step": real_tokens,
        "padding_share": 1.0 - real_tokens / positions,
        "row_padding_share": 1.0 - real_tokens * n / sum(row_positions),  # of the collated rows, before flattening
        "params_b": (n_llm_all + n_vision + n_proj) / 1e9, "llm_params": n_llm_all, "llm_matmul_params": shape["n_llm"],
        "vision_params": n_vision, "projector_params": n_proj,
        "step_s": step_s, "step_s_median": per_step_sorted[len(per_step_sorted) // 2], "step_s_min": per_step_sorted[0],
        "step_s_max": per_step_sorted[-1], "step_s_each": per_step,
        "tokens_per_s_per_gpu": positions / step_s, "real_tokens_per_s_per_gpu": real_tokens / step_s,
        "flops_per_step_per_gpu": {k: v / n for k, v in real.items()},
        "flops_dense_per_step_per_gpu": {k: v / n for k, v in dense.items()},
        "peak_flops": peak_flops, "peak_source": peak_source,
        "mfu": real["total"] / wall / peak_flops, "mfu_dense": dense["total"] / wall / peak_flops,
        "mfu_causal": real_causal["total"] / wall / peak_flops,
        "mfu_trainer_formula": trainer_flops / step_s / peak_flops,
        "syncs_per_step": syncs, "sync_sites": sync_sites,
        "build_s": build_s, "data_s": data_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }
    del optimizer, trainable, par, vlm, batches, timed
    return rec


def release_memory() -> None:
    """Between configurations: nothing of the last one may stay alive into the next."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------- entry points


def split_arms(configs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the unpacked configurations, the packed ones)."""
    return [c for c in configs if not c.get("packing")], [c for c in configs if c.get("packing")]


def packed_vs_unpacked(configs: list[dict]) -> dict:
    """Per configuration with both arms: packed real tokens/s / unpacked real tokens/s."""
    unpacked, packed = split_arms(configs)
    by = {c["name"]: c for c in unpacked}
    return {c["name"]: c["real_tokens_per_s_per_gpu"] / by[c["name"]]["real_tokens_per_s_per_gpu"]
            for c in packed if c["name"] in by}


def _figures(configs: list[dict]) -> list[dict]:
    from .harness import Figure

    out = []
    by = {c["name"]: c for c in configs if not c.get("packing")}
    for c in configs:
        on = f" on {c['world_size']} x {c['device']}"
        key = c["name"] + ("_packed" if c.get("packing") else "")
        out.append(Figure(f"{key}_mfu", c["mfu"], "share", n=c["steps"],
                          target_id="gpu.vlm_mfu" if key == "vlm" else None,
                          description=c["label"] + on + ": MFU on real (non-padding) tokens",
                          extra={"peak_source": c["peak_source"]}).as_dict())
        out.append(Figure(f"{key}_mfu_dense", c["mfu_dense"], "share", n=c["steps"],
                          description=c["label"] + on + ": MFU on the batch shape the kernels compute").as_dict())
        out.append(Figure(f"{key}_real_tokens_per_s_per_gpu", c["real_tokens_per_s_per_gpu"], "tokens/s",
                          description=c["label"] + ": real (non-padding) tokens per second per GPU").as_dict())
        out.append(Figure(f"{key}_padding_share", c["padding_share"], "share",
                          description=c["label"] + ": padding / positions the model computes").as_dict())
        if c["peak_memory_gib"] is not None:
            out.append(Figure(f"{key}_peak_memory_gib", c["peak_memory_gib"], "GiB",
                              description=c["label"] + on + ": peak allocated GPU memory").as_dict())
    for name, ratio in packed_vs_unpacked(configs).items():
        out.append(Figure(f"{name}_packed_vs_unpacked_real_tokens_per_s", ratio, "ratio",
                          baseline="the unpacked arm, same process",
                          description=LABELS[name] + ": packed real tokens/s / unpacked real tokens/s").as_dict())
    if "vlm" in by and "llm" in by:
        out.append(Figure("vlm_vs_llm_real_tokens_per_s",
                          by["vlm"]["real_tokens_per_s_per_gpu"] / by["llm"]["real_tokens_per_s_per_gpu"], "ratio",
                          baseline="the text-only anchor, same process",
                          description="VLM real tokens/s / text-only LLM real tokens/s").as_dict())
    return out


def skip_message() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}); run `python -m benchmarks gpu` on a GPU machine"
    return None


def run_configs(*, quick: bool, only=None, steps: int | None = None, tiny: bool = False, micro_batch: int = 8,
                seq: int = 2048, peak_tflops: float | None = None, packed: bool = True) -> tuple[list[dict], object]:
    """Every configuration (``packed``: the PACKED_ARMS ones twice, unpacked then packed);
    :func:`split_arms` separates the arms."""
    ctx = init(allow_cpu=tiny)
    if tiny:
        peak = (CPU_SMOKE_PEAK, "nominal CPU smoke peak (1e12)")
    else:
        import torch

        peak = peak_flops_for(torch.cuda.get_device_name(ctx.device), peak_tflops)  # before any model is built
    names = list(only or ("vlm", "llm"))
    warmup = 2 if quick else 3
    steps = steps or (4 if quick else 10)
    configs = []
    for name in names:
        for arm in (False, True) if packed and name in PACKED_ARMS else (False,):
            configs.append(measure(name, ctx=ctx, tiny=tiny, micro_batch=micro_batch, seq=seq, steps=steps,
                                   warmup=warmup, peak=peak, packed=arm))
            release_memory()
    return configs, ctx


def run(quick: bool) -> dict:
    """The `benchmarks all` entry: skipped without CUDA, else one GPU (world of one).
    ``BENCH_PEAK_TFLOPS`` gives the peak of a device the table does not know."""
    why = skip_message()
    if why:
        return {"status": "skipped", "message": why, "figures": []}
    env_peak = os.environ.get("BENCH_PEAK_TFLOPS")
    configs, ctx = run_configs(quick=quick, peak_tflops=float(env_peak) if env_peak else None)
    from vlm_trainer.distributed import shutdown

    shutdown(ctx)
    unpacked, packed = split_arms(configs)
    return {"status": "ok", "configs": unpacked, "packed_configs": packed,
            "packed_vs_unpacked_real_tokens_per_s": packed_vs_unpacked(configs), "figures": _figures(configs)}


def main(args: argparse.Namespace) -> int:
    tiny = bool(getattr(args, "cpu_smoke", False)) or os.environ.get("BENCH_GPU_TINY_CPU") == "1"
    why = None if tiny else skip_message()
    if why:
        print(f"gpu benchmark skipped: {why}")
        return 0
    try:
        configs, ctx = run_configs(quick=args.quick, only=args.only, steps=args.steps, tiny=tiny,
                                   micro_batch=getattr(args, "micro_batch", None) or (4 if tiny else 8),
                                   seq=TINY_SEQ if tiny else 2048, peak_tflops=getattr(args, "peak_tflops", None),
                                   packed=not getattr(args, "no_packed", False))
    except UnknownDevice as exc:
        print(f"gpu benchmark: ERROR: {exc}", file=sys.stderr)
        return 2
    try:
        if ctx.rank == 0:
            from . import harness

            unpacked, packed = split_arms(configs)
            ratios = packed_vs_unpacked(configs)
            rec = {"area": "gpu", "status": "ok", "quick": args.quick, "cpu_smoke": tiny, "configs": unpacked,
                   "packed_configs": packed, "packed_vs_unpacked_real_tokens_per_s": ratios,
                   "figures": _figures(configs), "machine": harness.machine_info(), "run_id": harness.timestamp(),
                   "git": harness.git_commit(),
                   "command": "torchrun --nproc-per-node N -m benchmarks gpu" if ctx.world_size > 1 else "python -m benchmarks gpu"}
            out = Path(args.out) if args.out else harness.REPO / "benchmarks" / "results"
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"gpu-{rec['run_id']}{'-cpu-smoke' if tiny else ''}.json"
            path.write_text(json.dumps(rec, indent=2) + "\n")
            for c in configs:
                print(f"{c['label']}: {c['real_tokens_per_s_per_gpu']:,.0f} real tokens/s/GPU "
                      f"(padding {100 * c['padding_share']:.0f}%, of the rows {100 * c['row_padding_share']:.0f}%), "
                      f"MFU {100 * c['mfu']:.1f}% on real tokens, "
                      f"{100 * c['mfu_dense']:.1f}% dense (causal-exact {100 * c['mfu_causal']:.1f}%, trainer metric "
                      f"{100 * c['mfu_trainer_formula']:.1f}%), step {c['step_s']:.3f}s, "
                      f"peak mem {c['peak_memory_gib'] or 0:.1f} GiB, syncs/step {c['syncs_per_step']}, "
                      f"on {c['world_size']} x {c['device']} (peak: {c['peak_source']})")
            for name, ratio in ratios.items():
                print(f"{name}: packed / unpacked real tokens/s = {ratio:.2f}x")
            if tiny:
                print(f"wrote {path} (CPU smoke: not for latest.json)")
            else:
                print(f"wrote {path}; fold it into the README with: python -m benchmarks merge {path}")
    finally:
        from vlm_trainer.distributed import shutdown

        shutdown(ctx)
    return 0


if __name__ == "__main__":  # `torchrun -m benchmarks.gpu` works too
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out")
    p.add_argument("--only", nargs="+", choices=("vlm", "llm"))
    p.add_argument("--steps", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--no-packed", action="store_true", help="skip the packed arm (issue 18)")
    sys.exit(main(p.parse_args()))
