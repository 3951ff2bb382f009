"""Shared helpers of the trainer tests: tiny real models, generated shards, configs."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import yaml

from vlm_api.schema import TrainerConfig

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

TINY_LLM = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 272, "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
TINY_VISION = {
    "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
}
SOURCES = {"text": "text", "captions": "image-text", "interleaved": "interleaved", "text-instruct": "text"}


def make_data(root: Path, *, samples_per_shard: int = 48, shards: dict | None = None) -> dict:
    """Synthetic shards (vlm_trainer.data.synthdata) at image size 32; returns {name: DataSource fields}."""
    from vlm_trainer.data import synthdata

    shards = shards or {"text": 2, "captions": 2, "interleaved": 2, "text-instruct": 1}
    return synthdata.generate(root, samples_per_shard=samples_per_shard, shards=shards, image_size=32)


def spec_dict(data: dict, *, stages: list[dict], seq_length: int = 96, strategy: str = "ddp",
              llm: dict | None = None, vision: dict | None = None, checkpoint_uri: str = "file:///tmp/vlm-test-ckpt",
              seed: int = 0, metrics_port: int = 9400) -> dict:
    sources = [{"name": name, "modality": d["modality"], "uri": d["uri"], "validationUri": d["validationUri"]}
               for name, d in data.items()]
    return {
        "model": {
            "llm": {"config": copy.deepcopy(llm or TINY_LLM)},
            "visionEncoder": {"config": copy.deepcopy(vision or TINY_VISION)},
            "projector": {"type": "mlp2x_gelu"},
            "tokenizer": {"builtin": "bytes"},
        },
        "data": {"seqLength": seq_length, "sources": sources},
        "stages": stages,
        "resources": {"nodes": {"min": 1, "max": 1}, "gpusPerNode": 0},
        "parallelism": {"strategy": strategy, "precision": "fp32"},
        "elastic": {"processGroupTimeout": 60},
        "checkpoint": {"uri": checkpoint_uri, "interval": 1000, "keep": 1},
        "metrics": {"port": metrics_port, "podMonitor": False},
        "seed": seed,
    }


def stage(name: str = "pretrain", **overrides) -> dict:
    base = {
        "name": name, "steps": 20, "mixture": {"text": 0.6, "captions": 0.3, "interleaved": 0.1},
        "visualIntroduceAt": 0.0, "trainable": {"visionEncoder": True, "projector": True, "llm": "all"},
        "optimizer": {"lr": 3.0e-3, "schedule": "cosine", "warmupSteps": 2, "weightDecay": 0.01},
        "globalBatchTokens": 8 * 96, "microBatchSize": 4, "evalInterval": 0, "evalBatches": 1,
    }
    base.update(overrides)
    return base


def trainer_config(spec: dict, stage_name: str | None = None, **kwargs) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "run": {"name": "t", "namespace": "default", "uid": "u"},
        "stage": stage_name or spec["stages"][0]["name"],
        "spec": spec,
        **kwargs,
    })


def write_config(cfg: TrainerConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(by_alias=True, exclude_none=True, mode="json")))
    return path


def train_with_checkpoints(cfg: TrainerConfig, staging: Path):
    """Train `cfg`'s stage in this process with the real checkpoint manager (staging under
    `staging`, inline data worker, no metrics server); the closed Trainer."""
    import pytest

    from vlm_trainer.metrics import reset_registry
    from vlm_trainer.train import Trainer

    mp = pytest.MonkeyPatch()
    for k, v in {"VLM_METRICS_PORT": "0", "VLM_DATA_WORKER": "inline", "VLM_CKPT_LOCAL_DIR": str(staging)}.items():
        mp.setenv(k, v)
    mp.delenv("VLM_NO_CHECKPOINT", raising=False)
    reset_registry()
    t = Trainer(cfg, serve_metrics=False)
    try:
        assert t.train().exit_code == 0
    finally:
        t.close()
        mp.undo()
    return t


def torchrun_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "VLM_LOG_EVERY": "1",
                "VLM_NO_CHECKPOINT": "1", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


_DATA_CACHE: dict = {}


def shared_data(tmp_path_factory) -> dict:
    """The generated shards, once per test session (whichever module asks first)."""
    if "data" not in _DATA_CACHE:
        _DATA_CACHE["data"] = make_data(tmp_path_factory.mktemp("synth"))
    return _DATA_CACHE["data"]


def tiny_bundle(image_size: int = 32):
    """(tokenizer bundle, VLM) from the inline tiny configs."""
    from vlm_api.schema import ModelSpec
    from vlm_trainer.model import build_vlm
    from vlm_trainer.tokenizer import load_tokenizer

    spec = ModelSpec.model_validate({
        "llm": {"config": TINY_LLM},
        "visionEncoder": {"config": {**TINY_VISION, "image_size": image_size}},
        "tokenizer": {"builtin": "bytes"},
    })
    tok = load_tokenizer(spec)
    return tok, build_vlm(spec, tok, seed=0)


class one_thread:
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin contention."""

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.saved)
