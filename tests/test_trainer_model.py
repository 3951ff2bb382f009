"""Model assembly, tokenizer, sequences, trainable policies and LR schedules (real tiny models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.fixtures_trainer import TINY_LLM, tiny_bundle
from vlm_api.schema import ModelSpec, Optimizer, Trainable
from vlm_api.validate import visual_region_layers
from vlm_trainer.model import IGNORE_INDEX, ImageTokenMismatch, build_vlm
from vlm_trainer.policy import apply_trainable, param_groups, selected_llm_layers
from vlm_trainer.schedule import LRSchedule
from vlm_trainer.data.sequences import SequenceBuilder, collate
from vlm_trainer.data.shards import ImageSeg, Sample, TextSeg
from vlm_trainer.tokenizer import build_byte_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def test_byte_tokenizer_ids_are_bytes_and_literal_placeholder_is_text():
    spec = ModelSpec.model_validate({"llm": {"config": TINY_LLM}, "tokenizer": {"builtin": "bytes"}})
    tok = load_tokenizer(spec)
    text = "héllo <image> wörld"
    assert tok.encode_text(text) == list(text.encode("utf-8"))
    assert tok.image_token_id not in tok.encode_text(text)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id) == (256, 257, 258, 259)
    assert len(tok) == 260 == len(build_byte_tokenizer())


def test_llm_embeddings_resized_for_added_tokens():
    small = {**TINY_LLM, "vocab_size": 100}
    spec = ModelSpec.model_validate({"llm": {"config": small}, "tokenizer": {"builtin": "bytes"}})
    tok = load_tokenizer(spec)
    vlm = build_vlm(spec, tok)
    assert vlm.llm.get_input_embeddings().weight.shape[0] == len(tok)


def _ids_with_images(tok, vlm, layout):
    """layout: list of str (text) or int (image number) -> input_ids [1, L]."""
    ids = [tok.bos_id]
    for part in layout:
        ids += tok.encode_text(part) if isinstance(part, str) else [tok.image_token_id] * vlm.tokens_per_image
    return torch.tensor([ids])


def test_image_embeddings_replace_placeholders_exactly(bundle):
    tok, vlm = bundle
    assert vlm.tokens_per_image == 16  # (32 / 8) ** 2 SigLIP patches
    ids = _ids_with_images(tok, vlm, ["a ", 0, " b ", 1, " c"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        embeds = vlm.embed(ids, pixels)
        image_feats = vlm.encode_images(pixels).reshape(-1, embeds.shape[-1])
        token_embeds = vlm.llm.get_input_embeddings()(ids)
    is_img = ids[0] == tok.image_token_id
    assert int(is_img.sum()) == 32
    torch.testing.assert_close(embeds[0][is_img], image_feats, rtol=0, atol=0)  # in order, exact
    torch.testing.assert_close(embeds[0][~is_img], token_embeds[0][~is_img], rtol=0, atol=0)


@pytest.mark.parametrize("n_images", [1, 3])
def test_placeholder_count_mismatch_is_a_clear_error(bundle, n_images):
    tok, vlm = bundle
    ids = _ids_with_images(tok, vlm, ["x", 0, "y", 1])  # two images' placeholders
    with pytest.raises(ImageTokenMismatch, match=r"32 image placeholder positions but %d image" % n_images):
        vlm.embed(ids, torch.zeros(n_images, 3, 32, 32))
    with pytest.raises(ImageTokenMismatch):
        vlm.embed(ids[:, :-3], torch.zeros(2, 3, 32, 32))  # a cut placeholder block


def test_text_only_batch_skips_the_vision_tower(bundle):
    tok, vlm = bundle
    calls = []
    handle = vlm.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        ids = torch.tensor([[tok.bos_id] + tok.encode_text("only text here")])
        vlm(ids, torch.ones_like(ids))
        assert calls == []
        vlm(ids, torch.ones_like(ids), force_vision=True)  # a peer has images: zero-weighted dummy
        assert calls == [1]
    finally:
        handle.remove()


def test_sequences_label_and_truncate_around_images(bundle):
    tok, vlm = bundle
    tpi = vlm.tokens_per_image
    img = np.zeros((3, 32, 32), np.float32)
    builder = SequenceBuilder(tok, tokens_per_image=tpi, seq_length=40)
    enc = builder.encode(Sample("k", "s", [ImageSeg(img), TextSeg("a red circle")], 0), "image-text")
    assert enc.input_ids[0] == tok.bos_id and enc.input_ids[1:1 + tpi] == [tok.image_token_id] * tpi
    assert enc.labels[:1 + tpi] == [IGNORE_INDEX] * (1 + tpi)
    assert enc.labels[1 + tpi:] == enc.input_ids[1 + tpi:]  # caption + eos are targets
    assert enc.input_ids[-1] == tok.eos_id and enc.n_image_tokens == tpi
    # the second image does not fit whole: the sequence ends before it, never inside it
    enc = builder.encode(Sample("k", "s", [TextSeg("x" * 10), ImageSeg(img), ImageSeg(img), TextSeg("t")], 1), "interleaved")
    assert len(enc.images) == 1 and enc.input_ids.count(tok.image_token_id) == tpi and len(enc.input_ids) <= 40
    batch = collate([enc, builder.encode(Sample("k", "s", [TextSeg("hi")], 2), "text")], tok.pad_id)
    assert batch.input_ids.shape[1] % 8 == 0 and batch.n_image_tokens == tpi and batch.n_images == 1
    assert batch.n_text_tokens + batch.n_image_tokens == int(batch.attention_mask.sum())
    logits_ok = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values)  # counts line up
    assert logits_ok.shape[:2] == batch.input_ids.shape


@pytest.mark.parametrize("fraction,depth", [(0.25, 32), (0.25, 8), (0.5, 4), (0.3, 10), (1.0, 6), (0.1, 5)])
def test_visual_region_selection_follows_the_documented_rule(fraction, depth):
    n = max(1, math.floor(fraction * depth + 0.5))
    expected = [math.floor((i + 0.5) * depth / n) for i in range(n)]
    assert selected_llm_layers(Trainable.model_validate({"llm": {"visualRegion": {"fraction": fraction}}}).llm, depth) == expected
    assert visual_region_layers(fraction, depth) == expected
    if (fraction, depth) == (0.25, 32):
        assert expected == [2, 6, 10, 14, 18, 22, 26, 30]


def test_policy_sets_requires_grad(bundle):
    _, vlm = bundle
    plan = apply_trainable(vlm, Trainable.model_validate(
        {"visionEncoder": False, "projector": True, "llm": {"visualRegion": {"fraction": 0.5}}}))
    assert plan.llm_layers == [1, 3]
    layers = vlm.decoder_layers()
    for i, layer in enumerate(layers):
        assert all(p.requires_grad == (i in (1, 3)) for p in layer.parameters())
    assert not any(p.requires_grad for p in vlm.vision.parameters())
    assert all(p.requires_grad for p in vlm.projector.parameters())
    assert not vlm.llm.get_input_embeddings().weight.requires_grad
    groups = param_groups(vlm, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    apply_trainable(vlm, Trainable.model_validate({"visionEncoder": True, "llm": "all"}))
    emb = vlm.llm.get_input_embeddings().weight
    assert emb.requires_grad and id(emb) not in {id(p) for g in param_groups(vlm, 0.1) for p in g["params"] if g["weight_decay"]}
    assert decayed  # matrices of the trained layers were decayed


def test_schedules():
    def lrs(**kw):
        s = LRSchedule(Optimizer.model_validate({"lr": 1.0, "minLrRatio": 0.1, **kw}), 100)
        return [s.lr(i) for i in range(100)]

    cos = lrs(schedule="cosine", warmupSteps=10)
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0) and cos[10] == pytest.approx(1.0)
    assert cos[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(cos[10:], cos[11:]))
    lin = lrs(schedule="linear")
    assert lin[0] == 1.0 and lin[50] == pytest.approx(0.1 + 0.9 * 0.5) and lin[-1] == pytest.approx(0.1, abs=0.01)
    assert set(lrs(schedule="constant", warmupSteps=0)) == {1.0}
    wsd = lrs(schedule="wsd", decayFraction=0.2)
    assert set(wsd[:80]) == {1.0} and wsd[-1] == pytest.approx(0.1) and wsd[80] < 1.0
    # continueSchedule: no warmup, starts at the previous stage's last lr, decays to lr * minLrRatio
    cont = LRSchedule(Optimizer.model_validate({"lr": 1.0, "warmupSteps": 50, "continueSchedule": True}), 100, start_lr=0.5)
    assert cont.warmup == 0 and cont.lr(0) == pytest.approx(0.5) and cont.lr(99) == pytest.approx(0.1, abs=1e-3)
