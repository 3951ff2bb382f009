"""Packing (issue 18): padding unpacked vs packed, and real tokens/s packed / unpacked.

    python -m benchmarks all --only packing          # in its own process, with the others' method
    python -m benchmarks area packing [--quick]      # in this process

**The mix** (generated, no I/O; ``seqLength`` 2048, lengths in tokens): token fractions
web text 0.5, captions 0.3, interleaved 0.2 (a VLM pretraining blend after images enter).

* web documents: log-normal, median 600, sigma 1.2 (heavy tail: ~16% longer than 2048 and
  truncated there; mean ~1,230 before truncation);
* captions: one image of 64-729 placeholder tokens (8x8, 12x12, 14x14, 16x16, 24x24 or
  27x27 patches: the range of LLaVA-style encoders) and a caption, log-normal median 30;
* interleaved documents: 1-4 images of 64-729 tokens, each after a paragraph (log-normal
  median 120), then a closing paragraph; an image that does not fit ends the document
  (the trainer's truncation rule: never cut an image).

Every sample is bos + tokens + eos, image placeholders labelled ignore, as
`vlm_trainer.data.sequences.SequenceBuilder` encodes them. Samples are drawn and packed by the
trainer's own `vlm_trainer.data.packing.PackingPlanner` (token budget 8 x 2048 per step; 4 x
2048 quick), collated by `collate_packed` and flattened (`Batch.flattened`: one row,
``cu_seq_lens``), and trained with the trainer's CPU attention (``vlm_packed_sdpa``: SDPA
per sample). Unpacked: *the same samples*, in draw order, one per row, micro-batches of 8
rows right-padded to their longest (the trainer's `collate`, ``data.packing: false``),
SDPA with the padding mask.

**Padding** (``padding_fraction_unpacked`` / ``_packed``): padding / sequence positions
over the whole plan. Packed positions are the planned rows x 2048 (what a row-shaped
kernel with a document mask computes; the padding-free path computes none of it).

**Speed** (``real_tokens_per_s_ratio``, target >= 1.5): a small Llama (d=256, 4 layers,
4 heads, byte vocabulary; ~3.3M parameters) in fp32 on one thread: forward, summed token
loss, backward, AdamW, over the same samples in both arms; A = packed, B = unpacked,
alternating A B A B after a warm-up round (`harness.paired`), real (text + image) tokens
per second each. Image positions are embeddings of a placeholder token: the vision
encoder's work is the same in both arms (the same images) and left out, so the ratio is
the LLM's.

**The demo mixture** (``padding_share``, ``tokens_trained_vs_stated``: the targets #18
registered): `examples/demo.yaml`'s stages on the data `vlmpretrain demo` generates
(`vlm_trainer.data.synthdata`, seed 0), planned by the trainer's data path (`StepLoader`) for
the whole stage (1500 + 100 steps; 300 + 100 quick): padding / positions, and real tokens
planned (= trained: every planned sample is trained) / steps x globalBatchTokens.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

from . import harness

SEQ = 2048
MIXTURE = {"web": 0.5, "captions": 0.3, "interleaved": 0.2}
MODALITY = {"web": "text", "captions": "image-text", "interleaved": "interleaved"}
GRIDS = (8, 12, 14, 16, 24, 27)  # patches per side: 64 .. 729 image tokens
LLM = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
       "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 272, "max_position_embeddings": SEQ,
       "tie_word_embeddings": True}
MICRO_BATCH = 8
BOS, EOS, IMAGE, PAD = 256, 257, 258, 259
THREADS = 1


# --------------------------------------------------------------------------- the generated mix


def _lognormal(rng, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(float(rng.lognormal(math.log(median), sigma))))))


def make_sample(source: str, index: int, seed: int = 0):
    """Sample ``index`` of a generated source as the trainer encodes it (an ``Encoded``)."""
    import zlib

    import numpy as np

    from vlm_trainer.model import IGNORE_INDEX
    from vlm_trainer.data.sequences import Encoded

    rng = np.random.default_rng([seed, zlib.crc32(source.encode()), index])
    ids, labels, images = [BOS], [IGNORE_INDEX], 0

    def text(n: int) -> None:
        t = rng.integers(0, 256, n).tolist()
        ids.extend(t)
        labels.extend(t)

    def image() -> bool:
        nonlocal images
        n = int(rng.choice(GRIDS)) ** 2
        if len(ids) + n > SEQ:
            return False  # never cut an image: the sequence ends before it
        ids.extend([IMAGE] * n)
        labels.extend([IGNORE_INDEX] * n)
        images += n
        return True

    complete = True
    if source == "web":
        text(_lognormal(rng, 600, 1.2, 8, 16 * SEQ))
    elif source == "captions":
        complete = image()
        text(_lognormal(rng, 30, 0.5, 3, 200))
    elif source == "interleaved":
        for _ in range(int(rng.integers(1, 5))):
            text(_lognormal(rng, 120, 0.8, 3, 2 * SEQ))
            if not image():
                complete = False
                break
        else:
            text(_lognormal(rng, 120, 0.8, 3, 2 * SEQ))
    else:
        raise ValueError(source)
    if complete:
        ids.append(EOS)
        labels.append(EOS)
    ids, labels = ids[:SEQ], labels[:SEQ]
    return Encoded(ids, labels, [], source, MODALITY[source], images, index)


def plan(steps: int, budget: int, seed: int = 0):
    """(the packed steps' rows of samples, every sample in draw order) from the trainer's
    PackingPlanner over the generated mix."""
    from vlm_trainer.data.mixture import SourceStats
    from vlm_trainer.data.packing import Measured, PackingPlanner

    stats = {}
    for s in MIXTURE:  # the probe the trainer makes (first 64 samples of each source)
        enc = [make_sample(s, 10**6 + i, seed) for i in range(64)]
        tokens = sum(e.n_tokens for e in enc)
        stats[s] = SourceStats(tokens / 64, sum(e.n_image_tokens for e in enc) / tokens, 64)
    planner = PackingPlanner(seq_length=SEQ, token_budget=budget, stage="bench", mixture=MIXTURE, modality=MODALITY,
                             stats=stats, global_batch=budget // SEQ, total_steps=steps, visual_introduce_at=0.0,
                             seed=seed)
    cache = {}  # in draw order

    def measure(source: str, index: int):
        e = cache[(source, index)] = make_sample(source, index, seed)
        return Measured(e.n_tokens, e.n_image_tokens)

    packed, placed = [], set()
    for _ in range(steps):
        p = planner.next_packed(measure)
        packed.append([[cache[(s.source, s.index)] for s in row] for row in p.rows])
        placed.update((s.source, s.index) for s in p.slots)
    drawn = [e for key, e in cache.items() if key in placed]  # what was trained, in draw order
    return packed, drawn


def padding(packed, drawn) -> dict:
    from vlm_trainer.data.sequences import collate, collate_packed

    real = sum(e.n_tokens for e in drawn)
    rows = sum(len(step) for step in packed)
    unpacked_positions = sum(collate(drawn[i:i + MICRO_BATCH], PAD).n_positions for i in range(0, len(drawn), MICRO_BATCH))
    packed_batches = [collate_packed(step, PAD) for step in packed]
    return {"real_tokens": real, "samples": len(drawn), "rows": rows,
            "unpacked": 1 - real / unpacked_positions, "packed": 1 - real / (rows * SEQ),
            "samples_per_row": len(drawn) / rows,
            "row_tensor_positions": sum(b.n_positions for b in packed_batches)}


# --------------------------------------------------------------------------- speed


def _model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm_trainer.model import VLM

    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLM))
    return VLM(llm, None, None, image_token_id=-1, tokens_per_image=0, image_spec=None)


def speed(packed, drawn, *, repeats: int, warmup: int = 1) -> tuple:
    import torch

    from vlm_trainer.model import check_packing, flattens, loss_sum, packed_attention, set_attention
    from vlm_trainer.data.sequences import collate, collate_packed

    torch.set_num_threads(THREADS)
    vlm_a, vlm_b = _model(), _model()
    attention = check_packing(vlm_a.llm, packed_attention(vlm_a.llm, torch.device("cpu"), SEQ))
    set_attention(vlm_b.llm, "sdpa")
    opt_a = torch.optim.AdamW(vlm_a.parameters(), lr=1e-4)
    opt_b = torch.optim.AdamW(vlm_b.parameters(), lr=1e-4)
    a_batches = []
    for step in packed:  # micro-batches of MICRO_BATCH rows, as the trainer splits a rank's rows
        for i in range(0, len(step), MICRO_BATCH):
            b = collate_packed(step[i:i + MICRO_BATCH], PAD)
            a_batches.append(b.flattened() if flattens(attention) else b)
    b_batches = [collate(drawn[i:i + MICRO_BATCH], PAD) for i in range(0, len(drawn), MICRO_BATCH)]
    real = sum(e.n_tokens for e in drawn)
    assert real == sum(b.n_tokens for b in a_batches) == sum(b.n_tokens for b in b_batches)

    labels = sum(b.n_label_tokens for b in b_batches)

    def train(vlm, opt, batches) -> float:
        """One optimizer step over all the batches (gradient accumulation, as a step's micro-batches)."""
        t0 = time.perf_counter()
        for b in batches:
            logits = vlm(b.input_ids, b.attention_mask, position_ids=b.position_ids, flash_kwargs=b.flash_kwargs)
            (loss_sum(logits, b.labels) / labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return real / (time.perf_counter() - t0)

    p = harness.paired(lambda: train(vlm_a, opt_a, a_batches), lambda: train(vlm_b, opt_b, b_batches),
                       repeats=repeats, warmup=warmup, exclude_contended=harness.CONTENDED, min_clean=3)
    return p, attention, len(a_batches), len(b_batches)


# --------------------------------------------------------------------------- the demo mixture


def demo_mixture(steps: dict[str, int] | None) -> dict:
    """Each stage of examples/demo.yaml over its generated data, planned by the trainer's
    data path (StepLoader, inline): padding / positions and real tokens / stated tokens."""
    import yaml

    from vlm_api.schema import VLMPretrainRunSpec
    from vlm_trainer.data import synthdata
    from vlm_trainer.data.loader import StepLoader, open_sources, probe_stats
    from vlm_local.demo import SAMPLES_PER_SHARD, SEED
    from vlm_trainer.model import build_vlm
    from vlm_trainer.data.packing import PackingPlanner
    from vlm_trainer.data.sequences import SequenceBuilder
    from vlm_trainer.tokenizer import load_tokenizer

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        data = synthdata.generate(Path(tmp) / "demo-data", seed=SEED, samples_per_shard=SAMPLES_PER_SHARD)
        doc = yaml.safe_load((harness.REPO / "examples" / "demo.yaml").read_text())
        for src in doc["spec"]["data"]["sources"]:
            src.update(uri=data[src["name"]]["uri"], validationUri=data[src["name"]]["validationUri"])
        spec = VLMPretrainRunSpec.model_validate(doc["spec"])
        tok = load_tokenizer(spec.model)
        vlm = build_vlm(spec.model, tok)
        S = spec.data.seq_length
        builder = SequenceBuilder(tok, tokens_per_image=vlm.tokens_per_image, seq_length=S)
        modality = {s.name: s.modality for s in spec.data.sources}
        for st in spec.stages:
            n = (steps or {}).get(st.name, st.steps)
            srcs = open_sources(spec.data, sorted(st.mixture), image=vlm.image_spec, seed=spec.seed)
            p = PackingPlanner(seq_length=S, token_budget=st.batch_tokens, stage=st.name, mixture=st.mixture,
                               modality=modality, stats=probe_stats(srcs, builder, 64), global_batch=st.batch_tokens // S,
                               total_steps=n, visual_introduce_at=st.visual_introduce_at, seed=spec.seed)
            ld = StepLoader(p, srcs, builder, rank=0, world_size=1, micro_batch_size=st.micro_batch_size, worker="inline")
            real = positions = samples = rows = 0
            t0 = time.perf_counter()
            for _ in range(n):
                rs = ld.next()
                real += sum(b.n_tokens for b in rs.micro)
                positions += rs.n_positions
                samples += rs.n_samples
                rows += rs.n_rows
            out[st.name] = {"steps": n, "stated_tokens": n * st.batch_tokens, "real_tokens": real,
                            "positions": positions, "padding": 1 - real / positions, "samples_per_row": samples / rows,
                            "trained_vs_stated": real / (n * st.batch_tokens), "plan_ms_per_step": 1000 * (time.perf_counter() - t0) / n}
    return out


# --------------------------------------------------------------------------- the area


def run(quick: bool) -> dict:
    logging.getLogger("vlm_trainer").setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    budget = (4 if quick else 8) * SEQ
    plan_steps = 1  # packed steps trained per arm and round (the unpacked arm: the same samples)
    pad_steps = 40 if quick else 200
    repeats = 3 if quick else 8

    t0 = time.perf_counter()
    packed, drawn = plan(pad_steps, budget)
    pad = padding(packed, drawn)
    pad["plan_s"] = round(time.perf_counter() - t0, 2)
    speed_packed, speed_drawn = plan(plan_steps, budget, seed=1)
    p, attention, n_a, n_b = speed(speed_packed, speed_drawn, repeats=repeats)
    demo = demo_mixture({"pretrain": 300, "sft": 100} if quick else None)
    demo_real = sum(d["real_tokens"] for d in demo.values())
    demo_positions = sum(d["positions"] for d in demo.values())
    demo_stated = sum(d["stated_tokens"] for d in demo.values())

    where = f"generated mix at seqLength {SEQ} ({pad['samples']} samples, {pad_steps} packed steps of {budget} tokens)"
    figures = [
        harness.Figure.from_paired(
            "real_tokens_per_s_ratio", p, target={"op": ">=", "value": 1.5, "issue": 18},
            baseline=f"unpacked: the same samples one per row, micro-batches of {MICRO_BATCH} padded to their longest, "
                     "same process, A B A B",
            description=f"real tokens/s packed ({attention}, flattened) / unpacked, small Llama, CPU, 1 thread"),
        harness.Figure("packed_real_tokens_per_s", p.a_summary.median, "tokens/s", p.a_summary.min, p.a_summary.max,
                       p.a_summary.n, description="packed arm: real (text + image) tokens per second"),
        harness.Figure("unpacked_real_tokens_per_s", p.b_summary.median, "tokens/s", p.b_summary.min, p.b_summary.max,
                       p.b_summary.n, description="unpacked arm: real (text + image) tokens per second"),
        harness.Figure("padding_fraction_unpacked", pad["unpacked"], "share",
                       description=f"padding / positions, {where}, unpacked (micro-batches of {MICRO_BATCH} rows)"),
        harness.Figure("padding_fraction_packed", pad["packed"], "share",
                       description=f"padding / row positions, {where}, packed (rows x {SEQ})"),
        harness.Figure("samples_per_sequence_packed", pad["samples_per_row"], "samples",
                       description=f"samples per packed row, {where}"),
        harness.Figure("padding_share", 1 - demo_real / demo_positions, "share",
                       target_id="data.padding_share",
                       description="padding / positions on the demo mixture (examples/demo.yaml, both stages, packed)"),
        harness.Figure("tokens_trained_vs_stated", demo_real / demo_stated, "ratio",
                       target_id="data.tokens_trained_vs_stated",
                       description="real tokens the demo's stages train / steps x globalBatchTokens"),
    ]
    return {"status": "ok", "contended": p.contended, "figures": [f.as_dict() for f in figures],
            "params": {"seq_length": SEQ, "mixture": MIXTURE, "image_tokens": [g * g for g in GRIDS], "llm": LLM,
                       "token_budget": budget, "micro_batch_rows": MICRO_BATCH, "threads": THREADS,
                       "speed_steps_per_round": plan_steps, "packed_micro_batches": n_a, "unpacked_micro_batches": n_b,
                       "attention": attention},
            "padding": pad, "demo": demo, "samples": p.as_dict()}
