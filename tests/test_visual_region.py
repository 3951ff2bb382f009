"""Visual-region tools: block influence per LLM layer, pruning outside the visual region,
the pruned checkpoint, and a pruning stage that the next stage continues from.

Tiny models throughout; the trained checkpoint comes from the real trainer + checkpoint manager
(one process, a few steps)."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.fixtures_trainer import PYTHON, REPO, TINY_LLM, make_data, spec_dict, stage, train_with_checkpoints, trainer_config, \
    write_config

DEPTH = 8
LLM8 = {**TINY_LLM, "num_hidden_layers": DEPTH}
REGION = {"visualRegion": {"fraction": 0.25}}  # 2 of 8 -> layers [2, 6]


# --------------------------------------------------------------------------- helpers


class _Identity(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Rotate(nn.Module):
    """h -> (-h[d/2:], h[:d/2]): orthogonal to h at every position; only where ``mask`` when set."""

    mask: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        d = hidden_states.shape[-1] // 2
        rot = torch.cat([-hidden_states[..., d:], hidden_states[..., :d]], dim=-1)
        if self.mask is None:
            return rot
        return torch.where(self.mask.unsqueeze(-1), rot, hidden_states)


class _Negate(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return -hidden_states


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("vr-data"), samples_per_shard=24)


def _bundle(depth: int):
    from vlm_api.schema import ModelSpec
    from vlm_trainer.model import build_vlm
    from vlm_trainer.tokenizer import load_tokenizer

    from tests.fixtures_trainer import TINY_VISION

    spec = ModelSpec.model_validate({"llm": {"config": {**TINY_LLM, "num_hidden_layers": depth}},
                                     "visionEncoder": {"config": TINY_VISION}, "tokenizer": {"builtin": "bytes"}})
    tok = load_tokenizer(spec)
    return tok, build_vlm(spec, tok, seed=0).eval()


def _batch(vlm, tok, data, n: int = 6):
    """A padded batch of real image-text and text samples (images + padding present)."""
    from vlm_trainer.data.sequences import SequenceBuilder, collate
    from vlm_trainer.data.shards import ImageTransform, ShardedSource

    builder = SequenceBuilder(tok, tokens_per_image=vlm.tokens_per_image, seq_length=96)
    spec = vlm.image_spec
    items = []
    for name in ("captions", "text"):
        src = ShardedSource(name=name, modality=data[name]["modality"], shards=data[name]["uri"], shuffle=False,
                            image=ImageTransform(spec.size, spec.mean, spec.std))
        for s, _ in zip(src.samples(0), range(n // 2)):
            items.append(builder.encode(s, src.modality))
    return collate(items, tok.pad_id), builder


@torch.no_grad()
def _manual_residual_stream(vlm, batch) -> list[torch.Tensor]:
    """[embeddings, after layer 0, after layer 1, ...] by calling the decoder layers in a loop
    as LlamaModel.forward does; checked against the model's own logits."""
    from transformers.masking_utils import create_causal_mask

    model = vlm.llm.model
    h = vlm.embed(batch.input_ids, batch.pixel_values)
    position_ids = torch.arange(h.shape[1]).unsqueeze(0)
    pos = model.rotary_emb(h, position_ids=position_ids)
    mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=batch.attention_mask,
                              past_key_values=None, position_ids=position_ids)
    out = [h]
    for layer in model.layers:
        h = layer(h, attention_mask=mask, position_embeddings=pos, position_ids=position_ids)
        h = h[0] if isinstance(h, tuple) else h
        out.append(h)
    logits = vlm.llm.lm_head(model.norm(h))
    assert torch.allclose(logits, vlm(batch.input_ids, batch.attention_mask, batch.pixel_values), atol=1e-4)
    return out


def _bi(h_in, h_out, mask):
    cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
    return 1.0 - float(cos[mask].mean())


# --------------------------------------------------------------------------- influence


def test_block_influence_matches_direct_computation(data):
    from vlm_trainer.visual_region.influence import BlockInfluenceMeter, measure, position_masks

    tok, vlm = _bundle(6)
    layers = vlm.llm.model.layers
    rotate_images = _Rotate()
    layers[2] = _Identity()
    layers[3] = _Rotate()
    layers[4] = _Negate()
    layers[5] = rotate_images
    batch, _ = _batch(vlm, tok, data)
    image, text = position_masks(batch, vlm.image_token_id)
    assert image.any() and text.any() and (batch.attention_mask == 0).any()  # images and padding present
    rotate_images.mask = image
    result, stats = measure(vlm, [batch])
    assert stats["image_positions"] == int(image.sum()) and stats["text_positions"] == int(text.sum())
    assert stats["image_positions"] + stats["text_positions"] == int(batch.attention_mask.sum())  # no padding

    # direct: run the decoder stack by hand (no hooks) and compare every layer
    hs = _manual_residual_stream(vlm, batch)
    for i in range(6):
        for mask, got in ((image, result[i].image), (text, result[i].text), (image | text, result[i].all)):
            assert got == pytest.approx(_bi(hs[i], hs[i + 1], mask), abs=1e-5), i
    assert 0.0 < result[0].image < 2.0 and 0.0 < result[1].text < 2.0  # the real layers
    assert result[2].image == pytest.approx(0.0, abs=1e-6) and result[2].text == pytest.approx(0.0, abs=1e-6)
    assert result[3].image == pytest.approx(1.0, abs=1e-6) and result[3].text == pytest.approx(1.0, abs=1e-6)
    assert result[4].all == pytest.approx(2.0, abs=1e-6)
    assert result[5].image == pytest.approx(1.0, abs=1e-6) and result[5].text == pytest.approx(0.0, abs=1e-6)
    n_img, n_txt = int(image.sum()), int(text.sum())
    assert result[5].all == pytest.approx(n_img / (n_img + n_txt), abs=1e-6)  # pooled over positions

    # padding never counts: one padded batch == the sequences one at a time (pooled)
    meter = BlockInfluenceMeter(vlm.decoder_layers())
    with meter, torch.no_grad():
        for row in range(batch.input_ids.shape[0]):
            n = int(batch.attention_mask[row].sum())
            ids, mask = batch.input_ids[row:row + 1, :n], batch.attention_mask[row:row + 1, :n]
            n_img_row = int((ids == vlm.image_token_id).sum())
            first = int((batch.input_ids[:row] == vlm.image_token_id).sum()) // vlm.tokens_per_image
            pixels = batch.pixel_values[first:first + n_img_row // vlm.tokens_per_image] if n_img_row else None
            img_row = ids == vlm.image_token_id
            meter.set_positions(img_row, mask.bool() & ~img_row)
            rotate_images.mask = img_row
            vlm(ids, mask, pixels)
    for a, b in zip(result, meter.result()):
        assert a.image == pytest.approx(b.image, abs=1e-5) and a.text == pytest.approx(b.text, abs=1e-5)


def test_report_json_table_and_chart(tmp_path):
    from vlm_trainer.visual_region.influence import InfluenceReport, LayerInfluence

    layers = [LayerInfluence(i, 0.1 * i, 0.05 * i, 0.07 * i, i in (1, 3)) for i in range(4)]
    layers[0].image = math.nan
    rep = InfluenceReport(layers, [1, 3], {"captions": "image-text"}, 8, {"sequences": 8, "image_positions": 10,
                                                                      "text_positions": 20})
    paths = rep.save(tmp_path, removed=[2])
    doc = json.loads(Path(paths["json"]).read_text())
    assert doc["visual_region"] == [1, 3] and doc["layers"][0]["image"] is None and doc["layers"][3]["visual_region"]
    back = InfluenceReport.from_json(doc)
    assert math.isnan(back.layers[0].image) and back.layers[2].text == pytest.approx(0.1)
    table = rep.table(removed=[2])
    assert "REMOVED" in table.splitlines()[3] and "visual" in table.splitlines()[2]
    png = Path(paths["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 100_000


# --------------------------------------------------------------------------- choosing and re-indexing


def test_pruning_never_removes_visual_region_layers():
    from vlm_api.validate import visual_region_layers
    from vlm_trainer.visual_region.influence import LayerInfluence
    from vlm_trainer.visual_region.selection import choose_layers, layers_to_remove_count, remap_indices

    rng = random.Random(0)
    for trial in range(300):
        depth = rng.randint(2, 40)
        region = visual_region_layers(max(rng.choice([0.1, 0.25, 0.5]), 1 / depth), depth)
        infl = [LayerInfluence(i, rng.random(), rng.random(), rng.random(), i in region) for i in range(depth)]
        if trial % 3 == 0:  # the region made the least influential: still never removed
            for i in region:
                infl[i].image = infl[i].text = infl[i].all = 0.0
        k = rng.randint(0, depth - len(region))
        removed = choose_layers(infl, k, region, criterion=rng.choice(["image", "text", "all"]))
        assert len(removed) == k and not set(removed) & set(region)
        assert remap_indices(region, removed) == [o - sum(r < o for r in removed) for o in region]
        with pytest.raises(ValueError):
            choose_layers(infl, depth - len(region) + 1, region)
    # the K lowest image influences outside the region, exactly
    infl = [LayerInfluence(i, v, 0.5, 0.5) for i, v in enumerate([0.9, 0.1, 0.05, 0.3, 0.2, 0.01, 0.4, 0.6])]
    assert choose_layers(infl, 3, [2, 6]) == [1, 4, 5]
    assert choose_layers(infl, 3, [2, 6], criterion="text") == [4, 5, 7]  # all tied: highest layers first
    for layer in infl:  # no image positions: ranked by the all-positions influence
        layer.image, layer.all = math.nan, 1.0 - layer.layer / 10
    assert choose_layers(infl, 2, [2, 6]) == [5, 7]
    assert layers_to_remove_count(32, keep_fraction=0.75) == 8 and layers_to_remove_count(8, remove=2) == 2
    with pytest.raises(ValueError):
        layers_to_remove_count(8, remove=8)


def test_prune_llm_layers_equals_skipping_them_and_round_trips(tmp_path):
    """Removing layers == replacing them by identity blocks; config + per-layer lists follow."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm_trainer.visual_region.surgery import prune_llm_layers

    cfg = AutoConfig.for_model(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                               max_position_embeddings=64, sliding_window=4, use_sliding_window=True,
                               layer_types=["full_attention", "sliding_attention"] * 3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    ref = copy.deepcopy(model)  # its own config object: pruning must not touch it
    for i in (1, 4):
        ref.model.layers[i] = _Identity()
    kept = prune_llm_layers(model, [1, 4])
    assert kept == [0, 2, 3, 5]
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert back.config.num_hidden_layers == 4 and back.config.layer_types == model.config.layer_types
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, ref(ids).logits, atol=1e-5)
        out = back(ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_remap_fqns_renames_and_drops_everywhere():
    from vlm_trainer.visual_region.surgery import remap_fqns

    tree = {"model": {"llm.model.layers.0.w": 0, "llm.model.layers.1.w": 1, "llm.model.layers.12.w": 12,
                      "vision.encoder.layers.1.w": "v", "llm.model.norm.weight": "n"},
            "optim": {"state.llm.model.layers.12.w.exp_avg": 3, "param_groups.llm.model.layers.1.w.lr": 4,
                      "groups": [{"params": ["llm.model.layers.0.w", "llm.model.layers.1.w", "llm.model.layers.12.w"]}]}}
    out = remap_fqns(tree, "llm.model.layers", kept=[0, 12])
    assert out["model"] == {"llm.model.layers.0.w": 0, "llm.model.layers.1.w": 12, "vision.encoder.layers.1.w": "v",
                            "llm.model.norm.weight": "n"}
    assert out["optim"]["state.llm.model.layers.1.w.exp_avg"] == 3 and "param_groups.llm.model.layers.1.w.lr" not in out["optim"]
    assert out["optim"]["groups"][0]["params"] == ["llm.model.layers.0.w", "llm.model.layers.1.w"]


def test_visual_region_remap_through_lineage():
    from vlm_trainer.visual_region.region import region_on_original

    # 16 layers, region 0.25 -> [2, 6, 10, 14]; layers 3, 4, 11 pruned
    kept = [i for i in range(16) if i not in (3, 4, 11)]
    assert region_on_original(0.25, None, original_depth=16, kept_original=kept) == [2, 4, 8, 11]
    assert region_on_original(None, [0, 3, 15], original_depth=16, kept_original=kept) == [0, 12]
    # a second pruning composes on original indices
    kept2 = [kept[i] for i in range(len(kept)) if i not in (0, 5)]  # drops original 0 and 7
    assert kept2 == [1, 2, 5, 6, 8, 9, 10, 12, 13, 14, 15]
    assert region_on_original(0.25, None, original_depth=16, kept_original=kept2) == [1, 3, 6, 9]


# --------------------------------------------------------------------------- a trained checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """Stage `pretrain` (visual region trained, declares prune) trained 4 steps with the real
    checkpoint manager; stage `sft` follows. Returns (root, config path, TrainerConfig, final ref)."""
    root = tmp_path_factory.mktemp("vr-run")
    stages = [stage("pretrain", steps=4, trainable={"visionEncoder": False, "projector": True, "llm": REGION},
                    evalBatches=1, prune={"removeLayers": 2, "calibration": {"source": "captions", "samples": 12}}),
              stage("sft", steps=2, mixture={"captions": 0.5, "text": 0.5},
                    trainable={"visionEncoder": False, "projector": True, "llm": REGION})]
    cfg = trainer_config(spec_dict(data, stages=stages, llm=LLM8, checkpoint_uri=str(root / "ckpt")))
    path = write_config(cfg, root / "config.yaml")
    train_with_checkpoints(cfg, root / "staging")
    from vlm_trainer.visual_region.prune import final_checkpoint_ref

    return root, path, cfg, final_checkpoint_ref(cfg)


def _cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """`vlmpretrain ARGS` in this process (the parser, the lazy import, the command)."""
    from vlm_api.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def test_analyze_layers_cli(trained, data, tmp_path, capsys):
    root, config, cfg, ref = trained
    out = tmp_path / "an"
    p = _cli(capsys, "analyze-layers", "--checkpoint", f"{root}/ckpt/pretrain/", "--config", str(config),
             "--data", data["captions"]["uri"], "--data", f"text:{data['text']['uri']}", "--samples", "6",
             "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "influence.json").read_text())
    assert doc["depth"] == DEPTH and doc["visual_region"] == [2, 6]
    assert doc["sources"] == {"data0": "image-text", "data1": "text"} and doc["image_positions"] > 0
    assert all(0.0 <= r["text"] <= 2.0 and r["visual_region"] == (r["layer"] in (2, 6)) for r in doc["layers"])
    assert (out / "influence.png").stat().st_size > 1000
    assert "BI image" in p.stdout and sum(line.endswith("visual") for line in p.stdout.splitlines()) == 2


def test_prune_cli_writes_a_loadable_pruned_checkpoint(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from vlm_trainer.checkpoint.model_io import load_checkpoint_model, read_dcp_tree
    from vlm_trainer.checkpoint import open_store

    root, config, cfg, ref = trained
    out_root = tmp_path / "pruned-store"
    p = _cli(capsys, "prune", "--checkpoint", ref.uri, "--config", str(config), "--remove", "2", "--out", str(out_root))
    assert p.returncode == 0, p.stderr[-3000:]
    store = open_store(str(out_root))
    pref = store.latest_committed("pretrain-pruned")
    assert pref is not None and pref.final and pref.step == ref.step and pref.uri in p.stdout
    d = out_root / "pretrain-pruned" / f"step-{ref.step:09d}"
    report = json.loads((d / "prune.json").read_text())
    removed, region = report["removed"], report["visual_region_before"]
    assert len(removed) == 2 and region == [2, 6] and not set(removed) & set(region)
    assert report["visual_region"] == [o - sum(r < o for r in removed) for o in region]
    assert report["kept"] == [i for i in range(DEPTH) if i not in removed]
    assert report["params_after"]["llm"] < report["params_before"]["llm"]
    for key in ("val_loss_before", "val_loss_after"):
        assert set(report[key]["by_modality"]) == {"image-text", "interleaved", "text"}
        assert all(math.isfinite(v) for v in report[key]["by_modality"].values())
    assert "validation loss" in p.stdout and "parameters: LLM" in p.stdout

    # transformers loads the pruned LLM: 6 layers, the kept layers' weights, finite loss
    llm = AutoModelForCausalLM.from_pretrained(d / "llm").eval()
    assert llm.config.num_hidden_layers == DEPTH - 2 and len(llm.model.layers) == DEPTH - 2
    orig = load_checkpoint_model(ref.uri, config=str(config))
    try:
        for new, old in enumerate(report["kept"]):
            assert torch.equal(llm.model.layers[new].mlp.up_proj.weight, orig.vlm.llm.model.layers[old].mlp.up_proj.weight)
    finally:
        orig.close()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(llm(ids, labels=ids).loss)

    # the DCP part: contiguous layer keys, optimizer moments re-indexed, trainer state kept
    tree = read_dcp_tree(d)
    idx = {int(k.split(".")[3]) for k in tree["model"] if k.startswith("llm.model.layers.")}
    assert idx == set(range(DEPTH - 2))
    opt_idx = {int(k.split("llm.model.layers.")[1].split(".")[0]) for k in tree.get("optim", {}) if "llm.model.layers." in k}
    assert opt_idx and opt_idx <= set(range(DEPTH - 2))
    assert "trainer" in tree

    # and the pruned checkpoint loads as a VLM of the pruned depth (architecture from the manifest)
    back = load_checkpoint_model(pref.uri)  # no --config: the pruned checkpoint carries it
    try:
        assert len(back.vlm.decoder_layers()) == DEPTH - 2
        assert torch.equal(back.vlm.llm.model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)
    finally:
        back.close()


def test_pruning_step_then_next_stage_continues_from_pruned_model(trained, monkeypatch, tmp_path):
    """The pruning step as its own process (what its job or the local runner starts) confirms
    `pretrain-pruned`; the next stage starts from that confirmation (the stage policy), builds
    the pruned architecture, initialises from the pruned checkpoint and trains the remapped region."""
    from vlm_api import stage_policy
    from vlm_trainer.metrics import reset_registry
    from vlm_trainer.train import Trainer
    from vlm_trainer.visual_region.lineage import pruned_stage_config
    from vlm_trainer.visual_region.prune import run_prune_stage_step

    root, config, cfg, ref = trained
    term = tmp_path / "termination.json"
    env = {**os.environ, stage_policy.TERMINATION_LOG_ENV: str(term), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([PYTHON, "-m", "vlm_trainer.visual_region.prune", "--config", str(config),
                        "--checkpoint", ref.uri], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    confirmed = stage_policy.parse_confirmation(term.read_text(), "pretrain-pruned")
    assert confirmed is not None and confirmed["step"] == ref.step
    assert confirmed["uri"].startswith(f"file://{root}/ckpt/pretrain-pruned/step-")
    pref = run_prune_stage_step(cfg, ref)  # idempotent: the committed one
    assert pref.uri == confirmed["uri"] and pref.final
    lineage = pref.extra["pruned"]

    finals = {"pretrain": {"uri": ref.uri}}
    assert stage_policy.init_from(cfg.spec, 1, finals) is None  # not before the pruning step confirmed
    finals["pretrain-pruned"] = confirmed
    sft = cfg.model_copy(update={"stage": "sft", "init_from": stage_policy.init_from(cfg.spec, 1, finals)})
    ready = pruned_stage_config(sft)
    assert ready.init_from == pref.uri
    assert ready.spec.model.llm.config["num_hidden_layers"] == DEPTH - 2
    assert ready.stage_spec.trainable.llm.layers == lineage["visual_region"]
    assert pruned_stage_config(cfg) is cfg  # nothing to do before the first pruning

    monkeypatch.setenv("VLM_METRICS_PORT", "0")
    monkeypatch.setenv("VLM_DATA_WORKER", "inline")
    monkeypatch.setenv("VLM_CKPT_LOCAL_DIR", str(root / "staging2"))
    monkeypatch.delenv("VLM_NO_CHECKPOINT", raising=False)
    reset_registry()
    t = Trainer(ready, serve_metrics=False)
    try:
        assert len(t.vlm.decoder_layers()) == DEPTH - 2
        assert t.policy.llm_layers == lineage["visual_region"]
        result = t.train()
        restored = t.checkpoint.restored
    finally:
        t.close()
    assert result.exit_code == 0
    assert restored.mode == "init" and restored.ref.uri == pref.uri and restored.missing_model_keys == []


@pytest.mark.slow
def test_local_run_with_a_pruning_stage(tmp_path, data):
    """`vlmpretrain local`: stage 1 declares prune; stage 2 trains the pruned model."""
    import yaml

    stages = [stage("pretrain", steps=3, trainable={"visionEncoder": False, "projector": True, "llm": REGION},
                    prune={"removeLayers": 3, "calibration": {"source": "captions", "samples": 8}}),
              stage("sft", steps=2, mixture={"captions": 0.5, "text": 0.5},
                    trainable={"visionEncoder": False, "projector": True, "llm": REGION})]
    spec = spec_dict(data, stages=stages, llm=LLM8, checkpoint_uri=str(tmp_path / "ckpt"))
    manifest = {"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainRun",
                "metadata": {"name": "prune-demo"}, "spec": {"image": "local", **spec}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(manifest))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLM_METRICS_PORT": "0"}
    env.pop("VLM_NO_CHECKPOINT", None)
    p = subprocess.run([PYTHON, "-m", "vlm_api.cli", "local", str(tmp_path / "run.yaml"), "--nproc", "1",
                        "--run-dir", str(tmp_path / "runs"), "--progress", "plain"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    from vlm_trainer.checkpoint import open_store

    store = open_store(str(tmp_path / "ckpt"))
    pruned = store.latest_committed("pretrain-pruned")
    assert pruned is not None and pruned.extra["pruned"]["depth_after"] == DEPTH - 3
    # the pruning step ran as its own step, between the stages, confirmed like them
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())["stages"]
    assert [(x["stage"], x["status"]) for x in summary] == [
        ("pretrain", "completed"), ("pretrain-pruned", "completed"), ("sft", "completed")]
    assert summary[1]["final_checkpoint"] == pruned.uri and summary[2]["init_from"] == pruned.uri
    assert f"[pretrain-pruned] pruned layers" in p.stdout
    events = [json.loads(line) for line in (tmp_path / "runs" / "pretrain-pruned" / "progress.jsonl").read_text().splitlines()]
    prune = [e for e in events if e["event"] == "prune"]
    assert prune and prune[-1]["uri"] == pruned.uri and prune[-1]["depth_after"] == DEPTH - 3
    assert set(prune[-1]["val_loss_before"]) == set(prune[-1]["val_loss_after"]) == {"image-text", "interleaved", "text"}
    events = [json.loads(line) for line in (tmp_path / "runs" / "sft" / "progress.jsonl").read_text().splitlines()]
    assert any(e["event"] == "end" and e["status"] == "completed" for e in events)
    assert any(e["event"] == "restore" and e.get("mode") == "init" and e.get("uri") == pruned.uri for e in events)


def test_prune_and_analyze_an_s3_checkpoint(trained, moto_endpoint, tmp_path, capsys, data):
    """The same commands on a checkpoint in S3 (moto over HTTP): downloaded, verified, pruned
    back into the bucket; the pruned one is analysed without --config."""
    import boto3

    from vlm_trainer.checkpoint.model_io import local_path_of
    from vlm_trainer.checkpoint import open_store

    root, config, cfg, ref = trained
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="vr-ckpt")
    s3 = open_store("s3://vr-ckpt/runs/r1/", endpoint_url=moto_endpoint)
    src = local_path_of(ref)
    s3.upload(src, "pretrain", ref.step, world_size=1, final=True, extra=ref.extra)
    p = _cli(capsys, "prune", "--checkpoint", "s3://vr-ckpt/runs/r1/pretrain/", "--config", str(config),
             "--endpoint", moto_endpoint, "--keep-fraction", "0.75", "--eval-samples", "0")
    assert p.returncode == 0, p.stderr[-3000:]
    pref = s3.latest_committed("pretrain-pruned")
    assert pref is not None and pref.extra["pruned"]["depth_after"] == 6 and not s3.verify(pref)
    assert pref.uri in p.stdout and "validation loss: skipped" in p.stdout
    out = tmp_path / "an"
    p = _cli(capsys, "analyze-layers", "--checkpoint", pref.uri, "--endpoint", moto_endpoint,
             "--data", data["captions"]["uri"], "--samples", "4", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "influence.json").read_text())
    assert doc["depth"] == 6 and doc["visual_region"] == pref.extra["pruned"]["visual_region"]
