"""GPU section (issue 8): tokens/s and MFU of OUR trainer code on a 1B-class VLM, bf16,
FSDP2, activation checkpointing, sequence length 2048; plus the same LLM text-only as the
anchor (MPT-1B reports ~42% MFU text-only on H100; the goal for the VLM is >= 40%).

    python -m benchmarks gpu [--quick] [--only vlm llm] [--steps N] [--out DIR]
    torchrun --nproc-per-node 8 -m benchmarks gpu          # FSDP2 over 8 GPUs

Without CUDA it prints why and exits 0 (``status: skipped`` under ``benchmarks all``).
No network: inline configs, random weights, synthetic batches.

What runs is the trainer's own code: ``vlm_trainer.model.build_vlm`` (a transformers
``LlamaForCausalLM`` + ``SiglipVisionModel`` + the ``mlp2x_gelu`` projector, image
placeholders replaced by projected patch embeddings), ``vlm_trainer.policy.apply_trainable``
(``examples/run.yaml``'s pretrain stage: vision encoder frozen, projector and LLM trained),
``vlm_trainer.distributed.parallelize`` (FSDP2 ``fully_shard`` per decoder and vision layer
then the root, ``MixedPrecisionPolicy(bf16 params, fp32 reduce)``, transformers' non-reentrant
activation checkpointing), the trainer's AdamW groups, ``loss_sum`` and the micro-step of
``Trainer.train_step`` (forward, loss, backward, grad clip, AdamW step, zero_grad). Only the
data path is replaced by synthetic batches (its headroom is the ``data_loader`` area's).

Configurations (inline, random init):

* LLM: TinyLlama-1.1B's shape — Llama, hidden 2048, 22 layers, 32 heads (4 KV heads),
  intermediate 5632, vocab 32000, untied head: 1.10 B parameters.
* Vision: SigLIP-so400m-patch14-384's shape — hidden 1152, 27 layers, 16 heads,
  intermediate 4304, patch 14, image 384 -> 27 x 27 = 729 patch tokens per image: 0.43 B.
* Batch: ``micro_batch`` (default 8) sequences x 2048 tokens per GPU and step. The VLM
  batch carries images so that ~15% of positions are image embeddings (the image-token
  share of ``examples/run.yaml``'s pretrain mixture after images enter; ``--image-fraction``):
  with 8 x 2048 that is 3 images = 2187 positions (13.3%).

FLOPs per step (MFU = FLOPs / step time / (peak x GPUs)); the convention of PaLM (app. B)
and MPT/llm-foundry, so the anchor compares with MPT-1B's 42%:

* LLM: ``6 x N x T + 12 x L x d x S x T`` for T tokens of sequence length S: N = the
  parameters that do matmuls (all but the input embedding table, a lookup; the untied LM
  head counts), L layers, d hidden. The attention term counts the full S x S score matrix
  (QK^T and AV, forward and backward); a causal kernel computes about half of it, so a
  causal-exact MFU would be ``(6 N T + 6 L d S T) / ...`` (also reported, ``mfu_causal``).
* Vision encoder on P patch tokens per image and I images: forward only when frozen
  (``2 x N_v x P x I + 4 x L_v x d_v x P^2 x I``), ``3x`` that when it trains.
* Projector: ``6 x N_p x P x I`` (it trains).
* Activation-checkpoint recomputation is not counted (MFU, not HFU).
* Peak: dense bf16 tensor-core FLOP/s from the trainer's table (``vlm_trainer.metrics``;
  H100 SXM 989e12, H200 989e12, A100 312e12, ...), ``VLM_PEAK_FLOPS`` overrides (e.g. for
  H100 PCIe, 756e12).

``mfu_trainer_formula`` is what the trainer's ``vlmtrain_mfu_ratio`` metric would report
for the same step (``6 x all LLM params x tokens + 2 x vision params x patches``: no attention
term), so the dashboard figure can be read against this one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import sys
import time
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
# A CPU smoke configuration (tests: the same code path at toy size).
TINY_LLM = {**LLM_CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}
TINY_VISION = {**VISION_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8}

LABELS = {
    "vlm": "VLM: 1.1B Llama + SigLIP-so400m (frozen) + mlp2x_gelu, bf16, FSDP2, act. ckpt, seq 2048",
    "llm": "anchor: the same 1.1B Llama text-only, bf16, FSDP2, act. ckpt, seq 2048",
}


def spec_dict(*, vision: bool, tiny: bool = False, seq_length: int = 2048, micro_batch: int = 8) -> dict:
    model = {"llm": {"config": dict(TINY_LLM if tiny else LLM_CONFIG)}, "projector": {"type": "mlp2x_gelu"},
             "tokenizer": {"builtin": "bytes"}}
    sources = [{"name": "text", "modality": "text", "uri": "s3://bench/text/{0000..0009}.tar"}]
    mixture = {"text": 1.0}
    trainable = {"projector": True, "llm": "all"}
    if vision:
        model["visionEncoder"] = {"config": dict(TINY_VISION if tiny else VISION_CONFIG)}
        sources.append({"name": "pairs", "modality": "image-text", "uri": "s3://bench/pairs/{0000..0009}.tar"})
        mixture = {"text": 0.85, "pairs": 0.15}
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


def step_flops(*, n_llm: int, llm_layers: int, llm_hidden: int, seq: int, tokens: int, n_vision: int = 0,
               vision_layers: int = 0, vision_hidden: int = 0, patches_per_image: int = 0, images: int = 0,
               vision_trains: bool = False, n_projector: int = 0, causal: bool = False) -> dict:
    """FLOPs of one training step, by part (see module doc)."""
    attn_factor = 6 if causal else 12
    llm_dense = 6.0 * n_llm * tokens
    llm_attn = float(attn_factor) * llm_layers * llm_hidden * seq * tokens
    vis_mult = 3.0 if vision_trains else 1.0  # forward + backward = 3 x forward
    patches = patches_per_image * images
    vis_dense = vis_mult * 2.0 * n_vision * patches
    vis_attn = vis_mult * 4.0 * vision_layers * vision_hidden * patches_per_image * patches
    proj = 6.0 * n_projector * patches
    return {"llm_dense": llm_dense, "llm_attention": llm_attn, "vision_dense": vis_dense, "vision_attention": vis_attn,
            "projector": proj, "total": llm_dense + llm_attn + vis_dense + vis_attn + proj}


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


def synthetic_batch(*, micro_batch: int, seq: int, vocab: int, image_token_id: int, tokens_per_image: int,
                    images: int, image_size: int, device, generator):
    import torch

    ids = torch.randint(0, vocab, (micro_batch, seq), generator=generator)
    ids[ids == image_token_id] = (image_token_id + 1) % vocab
    labels = ids.clone()
    pixels = None
    if images:
        # images go to the first rows, one per row after a 16-token prefix, as a packed pair would
        for i in range(images):
            row = i % micro_batch
            start = 16 + (i // micro_batch) * tokens_per_image
            ids[row, start:start + tokens_per_image] = image_token_id
            labels[row, start:start + tokens_per_image] = -100
        pixels = torch.randn(images, 3, image_size, image_size, generator=generator)
    mask = torch.ones_like(ids)
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
           "pixel_values": None if pixels is None else pixels.to(device), "n_image_positions": images * tokens_per_image}
    return out


def measure(name: str, *, ctx, tiny: bool, micro_batch: int, seq: int, steps: int, warmup: int,
            image_fraction: float) -> dict:
    import torch

    from vlm_api.schema import parse_spec
    from vlm_trainer.distributed import parallelize
    from vlm_trainer.metrics import peak_flops
    from vlm_trainer.metrics import step_flops as trainer_step_flops
    from vlm_trainer.model import build_vlm, count_params, loss_sum
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
        torch.cuda.empty_cache()
    t_build = time.perf_counter()
    tok = load_tokenizer(spec.model)
    vlm = build_vlm(spec.model, tok, seed=0)
    apply_trainable(vlm, stage.trainable)
    n_llm_all = count_params(vlm.llm)
    n_llm = matmul_params(vlm.llm)
    n_vision = count_params(vlm.vision)
    n_proj = count_params(vlm.projector)
    par = parallelize(vlm, strategy="fsdp", precision="bf16", activation_checkpointing=True, ctx=ctx)
    optimizer = build_optimizer(param_groups(par.module, stage.optimizer.weight_decay), stage.optimizer,
                                fused=False)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    build_s = time.perf_counter() - t_build

    tpi = vlm.tokens_per_image
    images = 0
    if vision:
        images = max(1, round(image_fraction * micro_batch * seq / tpi))
        images = min(images, micro_batch * ((seq - 32) // tpi))
    gen = torch.Generator().manual_seed(1234 + ctx.rank)
    batch = synthetic_batch(micro_batch=micro_batch, seq=seq, vocab=int(vlm.llm.config.vocab_size),
                            image_token_id=tok.image_token_id, tokens_per_image=tpi, images=images,
                            image_size=vlm.image_spec.size if vlm.image_spec else 0, device=device, generator=gen)

    def step() -> float:
        with par.sync_context(True), par.autocast():
            logits = par.module(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                n_image_positions=batch["n_image_positions"])
        n_labels = max(1, int((batch["labels"][:, 1:] != -100).sum()))
        (loss_sum(logits, batch["labels"]) / n_labels).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return 0.0

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
        if ctx.world_size > 1:
            ctx.barrier()

    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
    tokens = micro_batch * seq  # per GPU
    cfg = vlm.llm.config
    vcfg = vlm.vision.config if vlm.vision is not None else None
    common = dict(n_llm=n_llm, llm_layers=int(cfg.num_hidden_layers), llm_hidden=int(cfg.hidden_size), seq=seq,
                  tokens=tokens, n_vision=n_vision, vision_layers=int(vcfg.num_hidden_layers) if vcfg else 0,
                  vision_hidden=int(vcfg.hidden_size) if vcfg else 0, patches_per_image=tpi, images=images,
                  vision_trains=bool(stage.trainable.vision_encoder), n_projector=n_proj)
    flops = step_flops(**common)
    flops_causal = step_flops(**common, causal=True)
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_flops(device_name, True)
    trainer_flops = trainer_step_flops(llm_params=n_llm_all, vision_params=n_vision, tokens=tokens,
                                       patches=images * tpi, vision_trains=bool(stage.trainable.vision_encoder))
    rec = {
        "name": name, "label": LABELS[name] + (" (tiny CPU smoke)" if tiny else ""), "device": device_name,
        "world_size": ctx.world_size, "micro_batch": micro_batch, "seq_length": seq, "images_per_step": images,
        "image_token_fraction": images * tpi / tokens, "params_b": (n_llm_all + n_vision + n_proj) / 1e9,
        "llm_params": n_llm_all, "llm_matmul_params": n_llm, "vision_params": n_vision, "projector_params": n_proj,
        "step_s": step_s, "step_s_min": times[0], "step_s_max": times[-1], "steps": steps, "warmup": warmup,
        "tokens_per_s_per_gpu": tokens / step_s, "flops_per_step_per_gpu": flops, "peak_flops": peak,
        "mfu": flops["total"] / step_s / peak, "mfu_causal": flops_causal["total"] / step_s / peak,
        "mfu_trainer_formula": trainer_flops / step_s / peak, "build_s": build_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }
    del optimizer, par, vlm, batch
    if cuda:
        torch.cuda.empty_cache()
    return rec


# --------------------------------------------------------------------------- entry points


def _figures(configs: list[dict]) -> list[dict]:
    from .harness import Figure

    out = []
    by = {c["name"]: c for c in configs}
    for c in configs:
        out.append(Figure(f"{c['name']}_mfu", c["mfu"], "share", n=c["steps"], target_id="gpu.vlm_mfu" if c["name"] == "vlm" else None,
                          description=c["label"] + f" on {c['world_size']} x {c['device']}").as_dict())
        out.append(Figure(f"{c['name']}_tokens_per_s_per_gpu", c["tokens_per_s_per_gpu"], "tokens/s",
                          description=c["label"]).as_dict())
    if "vlm" in by and "llm" in by:
        out.append(Figure("vlm_vs_llm_tokens_per_s", by["vlm"]["tokens_per_s_per_gpu"] / by["llm"]["tokens_per_s_per_gpu"],
                          "ratio", baseline="the text-only anchor, same process",
                          description="VLM tokens/s / text-only LLM tokens/s").as_dict())
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
                seq: int = 2048, image_fraction: float = 0.15) -> tuple[list[dict], object]:
    ctx = init(allow_cpu=tiny)
    names = list(only or ("vlm", "llm"))
    warmup = 2 if quick else 3
    steps = steps or (4 if quick else 10)
    configs = []
    for name in names:
        configs.append(measure(name, ctx=ctx, tiny=tiny, micro_batch=micro_batch, seq=seq, steps=steps, warmup=warmup,
                               image_fraction=image_fraction))
    return configs, ctx


def run(quick: bool) -> dict:
    """The `benchmarks all` entry: skipped without CUDA, else one GPU (world of one)."""
    why = skip_message()
    if why:
        return {"status": "skipped", "message": why, "figures": []}
    configs, ctx = run_configs(quick=quick)
    from vlm_trainer.distributed import shutdown

    shutdown(ctx)
    return {"status": "ok", "configs": configs, "figures": _figures(configs)}


def main(args: argparse.Namespace) -> int:
    tiny = os.environ.get("BENCH_GPU_TINY_CPU") == "1"  # the CPU smoke of the same code path (tests)
    why = None if tiny else skip_message()
    if why:
        print(f"gpu benchmark skipped: {why}")
        return 0
    configs, ctx = run_configs(quick=args.quick, only=args.only, steps=args.steps, tiny=tiny,
                               micro_batch=getattr(args, "micro_batch", None) or (2 if tiny else 8),
                               seq=64 if tiny else 2048, image_fraction=getattr(args, "image_fraction", 0.15))
    try:
        if ctx.rank == 0:
            from . import harness

            rec = {"area": "gpu", "status": "ok", "quick": args.quick, "configs": configs, "figures": _figures(configs),
                   "machine": harness.machine_info(), "run_id": harness.timestamp(),
                   "git": harness.git_commit(),
                   "command": "torchrun --nproc-per-node N -m benchmarks gpu" if ctx.world_size > 1 else "python -m benchmarks gpu"}
            out = Path(args.out) if args.out else harness.REPO / "benchmarks" / "results"
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"gpu-{rec['run_id']}.json"
            path.write_text(json.dumps(rec, indent=2) + "\n")
            for c in configs:
                print(f"{c['label']}: {c['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, MFU {100 * c['mfu']:.1f}% "
                      f"(causal-exact {100 * c['mfu_causal']:.1f}%, trainer metric {100 * c['mfu_trainer_formula']:.1f}%), "
                      f"step {c['step_s']:.3f}s, peak mem {c['peak_memory_gib'] or 0:.1f} GiB on {c['world_size']} x {c['device']}")
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
    p.add_argument("--image-fraction", type=float, default=0.15)
    sys.exit(main(p.parse_args()))
