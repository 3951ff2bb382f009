"""The GPU benchmark's accounting, checked on CPU: its FLOP formula against torch's own
FLOP counter (padded and packed batches), its peak table, its realistic batches, and its
packed vs unpacked arms in one CPU smoke run. (The whole script, both configurations, runs
in its CPU smoke mode in tests/test_benchmarks.py.)"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu


def _tiny(name: str, vision_config: dict | None = None):
    from vlm_api.schema import parse_spec
    from vlm_trainer.model import build_vlm
    from vlm_trainer.policy import apply_trainable
    from vlm_trainer.tokenizer import load_tokenizer

    d = gpu.spec_dict(vision=name == "vlm", tiny=True, seq_length=gpu.TINY_SEQ, micro_batch=4)
    if vision_config:
        d["model"]["visionEncoder"]["config"].update(vision_config)
    spec = parse_spec(d)
    tok = load_tokenizer(spec.model)
    vlm = build_vlm(spec.model, tok, seed=0)
    apply_trainable(vlm, spec.stages[0].trainable)
    # eager attention: plain matmuls, which FlopCounterMode counts on every torch build (the
    # CPU SDPA kernels are not all registered with it); the FLOPs are the same as SDPA's
    vlm.llm.set_attn_implementation("eager")
    if vlm.vision is not None:
        vlm.vision.set_attn_implementation("eager")
    batches = gpu.realistic_batches(name, tok=tok, tokens_per_image=vlm.tokens_per_image,
                                    image_size=vlm.image_spec.size if vlm.image_spec else 0, seq=gpu.TINY_SEQ,
                                    micro_batch=4, n_steps=3)
    return vlm, tok, gpu.model_shape(vlm, bool(spec.stages[0].trainable.vision_encoder)), batches


REPO = Path(__file__).resolve().parents[1]


def _counted(vlm, b) -> int:
    from vlm_trainer.model import loss_sum

    with FlopCounterMode(display=False) as fc:
        logits = vlm(b.input_ids, b.attention_mask, b.pixel_values, n_image_positions=b.n_image_tokens,
                     position_ids=b.position_ids, flash_kwargs=b.flash_kwargs)
        (loss_sum(logits, b.labels) / max(1, b.n_label_tokens)).backward()
    vlm.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def _rows(b, image_token_id: int, tokens_per_image: int):
    """Each sequence of a padded batch alone, at its real length (its own images with it)."""
    lengths = b.attention_mask.sum(dim=1).tolist()
    first_image = 0
    for row, n in enumerate(lengths):
        ids = b.input_ids[row:row + 1, :n]
        images = int((ids == image_token_id).sum()) // max(1, tokens_per_image)
        pixels = None if not images else b.pixel_values[first_image:first_image + images]
        first_image += images
        yield dataclasses.replace(b, input_ids=ids, attention_mask=b.attention_mask[row:row + 1, :n],
                                  labels=b.labels[row:row + 1, :n], pixel_values=pixels,
                                  n_image_tokens=images * tokens_per_image)


def _samples(b, image_token_id: int, tokens_per_image: int):
    """Each sample of a packed batch alone (its span, its own images with it), unpacked."""
    first_image = 0
    for row, start, n in b.spans:
        ids = b.input_ids[row:row + 1, start:start + n]
        images = int((ids == image_token_id).sum()) // max(1, tokens_per_image)
        pixels = None if not images else b.pixel_values[first_image:first_image + images]
        first_image += images
        yield dataclasses.replace(b, input_ids=ids, attention_mask=torch.ones_like(ids),
                                  labels=b.labels[row:row + 1, start:start + n], pixel_values=pixels,
                                  n_image_tokens=images * tokens_per_image, position_ids=None, spans=None,
                                  flash_kwargs=None)


@pytest.mark.parametrize("name", ["vlm", "llm"])
def test_flop_formula_within_5_percent_of_flop_counter(name):
    """The dense formula (padded shape) against FlopCounterMode on a padded micro-batch,
    and the real-token formula (each sequence at its own length) against FlopCounterMode
    on the same sequences run one by one without padding."""
    torch.manual_seed(0)
    vlm, tok, shape, batches = _tiny(name)
    assert any(b.attention_mask.sum() < b.attention_mask.numel() for b in batches)  # padding is exercised
    if name == "vlm":
        assert any(b.n_images for b in batches)
    for b in batches:
        counted = _counted(vlm, b)
        formula = gpu.batch_flops(shape, b, dense=True)["total"]
        assert abs(formula / counted - 1) < 0.05, (formula, counted)
    b = batches[0]
    counted_real = sum(_counted(vlm, r) for r in _rows(b, tok.image_token_id, vlm.tokens_per_image))
    formula_real = gpu.batch_flops(shape, b, dense=False)["total"]
    assert abs(formula_real / counted_real - 1) < 0.05, (formula_real, counted_real)


def test_vision_and_projector_flops_within_5_percent():
    """The frozen vision tower and the projector alone (their share of the whole step is too
    small in the tiny model for the test above to see a mistake in their formula). A tower
    wider than the smoke's, so that biases, norms and position embeddings (parameters
    without matmuls, < 1% of SigLIP-so400m) weigh as little as in a real one."""
    vlm, _, shape, batches = _tiny("vlm", {"hidden_size": 256, "intermediate_size": 512, "image_size": 64})
    pixels = next(b.pixel_values for b in batches if b.n_images)
    images = int(pixels.shape[0])
    with FlopCounterMode(display=False) as fc:
        vlm.encode_images(pixels).sum().backward()  # vision frozen: forward only; the projector trains
    f = gpu.step_flops(**{**shape, "n_llm": 0, "llm_layers": 0, "llm_hidden": 0}, seq_lens=[], images=images)
    # (the projector's first layer computes no input gradient, its input needing none: 2 x N_1 x P
    # fewer than the 6 x N_p x P convention; small next to the tower's forward)
    assert abs((f["vision_dense"] + f["vision_attention"] + f["projector"]) / fc.get_total_flops() - 1) < 0.05


def test_peak_table_names_each_variant_and_refuses_unknown_devices():
    assert gpu.peak_flops_for("NVIDIA H100 80GB HBM3") == (989.5e12, "table: H100 SXM")
    assert gpu.peak_flops_for("NVIDIA H100 PCIe")[0] == 756.5e12
    assert gpu.peak_flops_for("NVIDIA H100 NVL")[0] == 835.5e12
    assert gpu.peak_flops_for("NVIDIA H200")[1] == "table: H200 SXM"
    assert gpu.peak_flops_for("NVIDIA H200 NVL")[0] == 835.5e12
    assert gpu.peak_flops_for("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert gpu.peak_flops_for("NVIDIA A100 80GB PCIe")[0] == 312e12
    assert gpu.peak_flops_for("NVIDIA B200")[0] == 2250e12
    for unknown in ("NVIDIA GeForce RTX 4090", "NVIDIA H100", "NVIDIA L40S", "cpu"):
        with pytest.raises(gpu.UnknownDevice, match="--peak-tflops"):
            gpu.peak_flops_for(unknown)
    assert gpu.peak_flops_for("NVIDIA GeForce RTX 4090", 165.2) == (165.2e12, "--peak-tflops")


def test_realistic_batches_follow_the_mix_and_are_deterministic():
    from vlm_api.schema import parse_spec
    from vlm_trainer.tokenizer import load_tokenizer

    tok = load_tokenizer(parse_spec(gpu.spec_dict(vision=True)).model)
    kw = dict(tok=tok, tokens_per_image=729, image_size=8, seq=2048, micro_batch=8, n_steps=12)
    vlm = gpu.realistic_batches("vlm", **kw)
    again = gpu.realistic_batches("vlm", **kw)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(vlm, again))
    positions = sum(b.attention_mask.numel() for b in vlm)
    real = sum(int(b.attention_mask.sum()) for b in vlm)
    image_share = sum(b.n_image_tokens for b in vlm) / real
    assert all(b.input_ids.shape == (8, b.input_ids.shape[1]) and b.input_ids.shape[1] <= 2048 for b in vlm)
    assert 0.05 < image_share < 0.25  # run.yaml's mix after images enter: ~15% image tokens
    assert 0.2 < 1 - real / positions < 0.8  # right padding to the longest row, no packing
    text = gpu.realistic_batches("llm", **kw)
    assert all(b.n_images == 0 for b in text)


def test_packed_flop_formula_within_5_percent_of_flop_counter():
    """The packed arm's micro-batches (the trainer's PackingPlanner -> collate_packed): the
    dense formula (whole rows, what a masked kernel computes) against FlopCounterMode on the
    packed rows, and the real-token formula (attention per sample, from ``spans``) against
    the samples run one by one; flattened, the dense figure is the per-sample one."""
    torch.manual_seed(0)
    vlm, tok, shape, _ = _tiny("vlm")
    steps = gpu.packed_steps("vlm", tok=tok, tokens_per_image=vlm.tokens_per_image, image_size=vlm.image_spec.size,
                             seq=gpu.TINY_SEQ, micro_batch=4, n_steps=2)
    micros = [b for s in steps for b in s]
    assert all(b.packed and b.n_sequences <= 5 for b in micros) and any(b.n_images for b in micros)
    b = max(micros, key=lambda m: m.n_samples)
    assert b.n_samples > b.n_sequences  # rows hold several samples
    counted = _counted(vlm, b)
    formula = gpu.batch_flops(shape, b, dense=True)["total"]
    assert abs(formula / counted - 1) < 0.05, (formula, counted)
    counted_real = sum(_counted(vlm, r) for r in _samples(b, tok.image_token_id, vlm.tokens_per_image))
    formula_real = gpu.batch_flops(shape, b, dense=False)["total"]
    assert abs(formula_real / counted_real - 1) < 0.05, (formula_real, counted_real)
    flat = b.flattened()
    assert flat.n_tokens == b.n_tokens
    assert gpu.batch_flops(shape, flat, dense=True) == gpu.batch_flops(shape, b, dense=False)


def test_cpu_smoke_trains_the_vlm_packed_and_unpacked(tmp_path):
    """One invocation, both arms of the VLM: the packed one pads less, and the result JSON
    carries both arms and their real-tokens/s ratio."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--cpu-smoke", "--quick", "--steps", "1", "--only",
                           "vlm", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("gpu-*-cpu-smoke.json")
    rec = json.loads(path.read_text())
    (unpacked,), (packed,) = rec["configs"], rec["packed_configs"]
    assert not unpacked["packing"] and packed["packing"] and packed["name"] == unpacked["name"] == "vlm"
    assert packed["attention"] == "vlm_packed_sdpa"  # CPU: flattened rows, SDPA per sample
    assert packed["samples_per_step"] > unpacked["samples_per_step"]
    assert packed["padding_share"] < unpacked["padding_share"]
    assert packed["row_padding_share"] < unpacked["row_padding_share"]
    for c in (unpacked, packed):
        assert c["images_per_step"] > 0 and c["real_tokens_per_s_per_gpu"] > 0 and 0 < c["mfu"] <= c["mfu_dense"] < 1
    assert packed["mfu"] == pytest.approx(packed["mfu_dense"])  # flattened: no padding, attention per sample
    ratio = rec["packed_vs_unpacked_real_tokens_per_s"]["vlm"]
    assert ratio == pytest.approx(packed["real_tokens_per_s_per_gpu"] / unpacked["real_tokens_per_s_per_gpu"])
    names = {f["name"] for f in rec["figures"]}
    assert {"vlm_mfu", "vlm_packed_mfu", "vlm_packed_mfu_dense", "vlm_packed_padding_share",
            "vlm_packed_vs_unpacked_real_tokens_per_s"} <= names
    assert "packed / unpacked" in proc.stdout
