"""Self-describing checkpoints and `vlmpretrain export --format hf`, on a real tiny VLM
trained two steps by the real trainer and its checkpoint manager (local store): the committed
checkpoint carries its TrainerConfig, so `analyze-layers` needs only the URI; the export
loads with transformers' own classes and computes what the trainer's model computes."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from tests.fixtures_trainer import shared_data, spec_dict, stage, train_with_checkpoints, trainer_config
from vlm_api.schema import TrainerConfig
from vlm_trainer.checkpoint import CONFIG_NAME, open_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trainer after 2 steps, config, store root, final ref, the shared data)."""
    data = shared_data(tmp_path_factory)
    root = tmp_path_factory.mktemp("export-run")
    cfg = trainer_config(spec_dict(data, stages=[stage("pretrain", steps=2, evalBatches=1)],
                                   checkpoint_uri=str(root / "ckpt")))
    t = train_with_checkpoints(cfg, root / "staging")
    ref = open_store(str(root / "ckpt")).latest_committed("pretrain")
    assert ref is not None and ref.final and ref.step == 2
    return t, cfg, root, ref, data


def _cli(capsys, *args: str) -> subprocess.CompletedProcess:
    from vlm_api.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def test_a_committed_checkpoint_carries_its_trainer_config(trained):
    _, cfg, root, ref, _ = trained
    entry = next(f for f in ref.files if f["path"] == CONFIG_NAME)  # listed (size + sha256) in the manifest
    assert ref.has_config and entry["size"] > 0
    import yaml

    stored = TrainerConfig.model_validate(yaml.safe_load((root / "ckpt" / "pretrain" / "step-000000002" / CONFIG_NAME)
                                                         .read_text()))
    assert stored == cfg


def test_analyze_layers_from_the_uri_alone(trained, tmp_path, capsys):
    _, _, root, ref, data = trained
    out = tmp_path / "an"
    p = _cli(capsys, "analyze-layers", "--checkpoint", ref.uri, "--data", data["captions"]["uri"],
             "--samples", "4", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "influence.json").read_text())
    assert doc["depth"] == 4 and len(doc["layers"]) == 4 and doc["image_positions"] > 0


def test_cli_errors_about_checkpoints_are_one_line(trained, tmp_path, capsys):
    """A checkpoint written without its config (as before) and a URI naming nothing: one
    line each, naming what to do, never a traceback."""
    _, _, root, ref, data = trained
    old = tmp_path / "old"
    shutil.copytree(root / "ckpt" / "pretrain" / "step-000000002", old)
    (old / CONFIG_NAME).unlink()
    (old / "COMMITTED").unlink()
    store = open_store(str(tmp_path / "store"))
    old_ref = store.upload(old, "pretrain", 2, world_size=1, final=True).ref
    assert not old_ref.has_config
    for args, words in (
        (("analyze-layers", "--checkpoint", old_ref.uri, "--data", data["captions"]["uri"]), "--config"),
        (("export", old_ref.uri, str(tmp_path / "x")), "--config"),
        (("export", str(tmp_path / "store" / "nothing" / "step-000000001"), str(tmp_path / "y")), "not a committed"),
        (("analyze-layers", "--checkpoint", str(tmp_path / "store" / "nothing"), "--data", data["captions"]["uri"]),
         "no committed checkpoint"),
    ):
        p = _cli(capsys, *args)
        assert p.returncode == 1 and words in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    # with --config the old checkpoint exports
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text((root / "ckpt" / "pretrain" / "step-000000002" / CONFIG_NAME).read_text())
    p = _cli(capsys, "export", old_ref.uri, str(tmp_path / "z"), "--config", str(cfg_file))
    assert p.returncode == 0, p.stderr


def test_export_hf_loads_with_transformers_and_matches_the_trainer(trained, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

    t, _, _, ref, _ = trained
    out = tmp_path / "hf"
    p = _cli(capsys, "export", ref.uri, str(out), "--format", "hf")
    assert p.returncode == 0, p.stderr[-3000:]
    vlm = t.vlm.eval()

    llm = AutoModelForCausalLM.from_pretrained(out / "llm").eval()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = vlm.llm(input_ids=ids).logits, llm(input_ids=ids).logits
    assert torch.equal(want, got)
    trained_llm = dict(vlm.llm.named_parameters())
    assert all(torch.equal(trained_llm[k], v) for k, v in llm.named_parameters())
    tok = AutoTokenizer.from_pretrained(out / "llm")
    assert tok("a <image> b", add_special_tokens=False)["input_ids"] == t.tok.tokenizer(
        "a <image> b", add_special_tokens=False)["input_ids"]

    vision = SiglipVisionModel.from_pretrained(out / "vision").eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(vlm.vision(pixel_values=pixels).last_hidden_state,
                           vision(pixel_values=pixels).last_hidden_state)
    pre = json.loads((out / "vision" / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 32, "width": 32} and pre["image_mean"] == list(vlm.image_spec.mean)

    proj = load_file(str(out / "projector" / "model.safetensors"))
    assert proj.keys() == vlm.projector.state_dict().keys()
    assert all(torch.equal(proj[k], v) for k, v in vlm.projector.state_dict().items())
    pcfg = json.loads((out / "projector" / "config.json").read_text())
    assert pcfg["image_token_id"] == vlm.image_token_id and pcfg["tokens_per_image"] == vlm.tokens_per_image
    summary = json.loads((out / "export.json").read_text())
    assert summary["checkpoint"] == ref.uri and summary["step"] == 2 and set(summary["parts"]) == {
        "llm", "vision", "projector"}


def test_export_from_s3_needs_only_the_uri(trained, moto_endpoint, tmp_path, capsys):
    """The same checkpoint in S3 (moto over HTTP): its files, config included, are
    downloaded and sha256-verified; the exported LLM is the trainer's."""
    from transformers import AutoModelForCausalLM

    from tests.support.s3 import new_bucket

    t, _, root, ref, _ = trained
    src = tmp_path / "src"
    shutil.copytree(root / "ckpt" / "pretrain" / "step-000000002", src)
    (src / "COMMITTED").unlink()
    s3 = open_store(f"s3://{new_bucket(moto_endpoint)}/runs/x", endpoint_url=moto_endpoint)
    s3_ref = s3.upload(src, "pretrain", 2, world_size=1, final=True).ref
    assert s3_ref.has_config
    p = _cli(capsys, "export", s3.uri + "pretrain/", str(tmp_path / "hf"), "--endpoint", moto_endpoint)
    assert p.returncode == 0, p.stderr[-3000:]
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "llm")
    trained_llm = dict(t.vlm.llm.named_parameters())
    assert all(torch.equal(trained_llm[k], v) for k, v in llm.named_parameters())
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["checkpoint"] == s3_ref.uri
