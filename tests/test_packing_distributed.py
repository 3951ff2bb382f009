"""Packing across processes (issue 18), real torchrun with gloo on CPU:

* per-sample losses and gradients of a packed batch equal those of the same samples
  unpacked, for text, image-text and interleaved samples, under DDP and FSDP2 at world
  size 2 (fp32; rtol 1e-4, atol 1e-6 x the gradient's scale; measured ~1e-7);
* a packed stage stopped at step 4 by 2 processes, with samples waiting in the packing
  buffer, resumes from its checkpoint in 1 process and trains exactly the steps the
  uninterrupted 2-process run trained (same tokens per step, same losses)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.fixtures_trainer import PYTHON, REPO, make_data, shared_data, spec_dict, stage, torchrun_env, trainer_config, write_config
from tests.support import torchrun_util as TU

pytestmark = pytest.mark.slow


def _torchrun(nproc: int, args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0"] + args
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_packed_equals_unpacked_per_sample_under_ddp_and_fsdp2(tmp_path):
    data = make_data(tmp_path / "data", samples_per_shard=8, shards={"text": 1, "captions": 1, "interleaved": 1})
    (tmp_path / "data.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    out.mkdir()
    proc = _torchrun(2, ["-m", "tests.support.packing_worker", str(tmp_path / "data.json"), str(out)], torchrun_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["world_size"] == 2
        for strategy in ("ddp", "fsdp"):
            entry = report[strategy]
            assert entry["ok"], (rank, strategy, entry.get("error"))
            assert {s[0] for s in entry["samples"]} == {"text", "captions", "interleaved"}
            assert sum(s[3] > 0 for s in entry["samples"]) == 2  # two of the three carry images
            for variant, worst in entry["worst"].items():
                assert worst["loss_rel"] < 1e-5 and worst["grad_rel"] < 1e-5, (rank, strategy, variant, worst)
    # the two strategies compute the same per-sample losses
    r0 = json.loads((out / "rank0.json").read_text())
    for variant, losses in r0["ddp"]["losses"].items():
        assert losses == pytest.approx(r0["fsdp"]["losses"][variant], rel=1e-5)


def test_resume_with_a_half_full_packing_buffer_from_2_processes_on_1(tmp_path_factory, tmp_path):
    data = shared_data(tmp_path_factory)
    ckpt = (tmp_path / "ckpt").as_uri()

    def config(name: str, **kw):
        spec = spec_dict(data, stages=[stage(steps=10, visualIntroduceAt=0.3, microBatchSize=2)], checkpoint_uri=ckpt)
        spec["checkpoint"].update(interval=1000, keep=2)
        return write_config(trainer_config(spec, **kw), tmp_path / f"{name}.yaml")

    def env(progress, **extra):
        return torchrun_env(VLM_PROGRESS_FILE=progress, VLM_METRICS_PORT=0, **extra)

    # uninterrupted, 2 processes, no checkpoints
    full_cfg = config("full")
    proc = _torchrun(2, ["-m", "vlm_trainer", "--config", str(full_cfg)], env(tmp_path / "full.jsonl"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 4 steps in 2 processes, then their checkpoint; the rest in one process
    first = _torchrun(2, ["-m", "vlm_trainer", "--config", str(config("first", max_steps=4))],
                      env(tmp_path / "first.jsonl", VLM_NO_CHECKPOINT=0))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rest = subprocess.run([PYTHON, "-m", "vlm_trainer", "--config", str(config("rest"))], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env(tmp_path / "rest.jsonl", VLM_NO_CHECKPOINT=0))
    assert rest.returncode == 0, rest.stdout[-3000:] + rest.stderr[-3000:]

    full, one, two = (TU.steps(tmp_path / f"{n}.jsonl") for n in ("full", "first", "rest"))
    assert [e["step"] for e in one] == [1, 2, 3, 4] and [e["step"] for e in two] == list(range(5, 11))
    assert one[-1]["pack_buffer"] > 0  # the checkpoint holds samples drawn but not trained yet
    starts = [e for e in TU.read_progress(tmp_path / "rest.jsonl") if e["event"] == "start"]
    assert starts[0]["step"] == 4 and starts[0]["world_size"] == 1
    key = lambda e: (e["text_tokens"], e["image_tokens"], e["samples"], e["sequences"], e["positions"])  # noqa: E731
    assert [key(e) for e in one + two] == [key(e) for e in full]
    assert [e["loss"] for e in one + two] == pytest.approx([e["loss"] for e in full], rel=1e-4)
