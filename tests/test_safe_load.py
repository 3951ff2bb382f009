"""Checkpoints are read without running code from them (vlm_trainer.safe_load).

Each hostile checkpoint below carries a pickle whose only effect, if unpickled by plain
pickle or `torch.load(weights_only=False)`, is to create a marker file; the safe readers
refuse it and the marker never appears. The control cases show the hole is real: the
stock DCP planner / reader do create it.
"""

from __future__ import annotations

import io
import pickle
import random

import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402  (a BaseException)

from vlm_trainer import safe_load  # noqa: E402


class Payload:
    """Unpickling this opens (creates) `path`: a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pack(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_trainer_blobs_round_trip_with_weights_only():
    np = pytest.importorskip("numpy")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    out = safe_load.load_blob(_pack(rng))
    np.random.set_state(out["numpy"])
    random.setstate(out["python"])
    assert torch.equal(out["torch"], rng["torch"])
    extra = {"format": "vlm-trainer/1", "step": 7, "data": {"positions": {"text": 12}}, "schedule": {"lr": 1e-4},
             "rng": {"seed": 3}, "total_steps": (100, None)}
    assert safe_load.load_blob(_pack(extra)) == extra
    assert safe_load.load_blob(io.BytesIO(_pack(extra))) == extra


def test_a_blob_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError):
        safe_load.load_blob(_pack({"step": 1, "x": Payload(marker)}))
    assert not marker.exists()


def _dcp_checkpoint(path, **extra) -> dict:
    model = torch.nn.Linear(4, 3)
    sd = {"model": dict(model.state_dict()), "trainer": _pack({"step": 5}), **extra}
    dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    return sd


def test_dcp_checkpoint_loads_through_the_safe_reader_and_planner(tmp_path):
    saved = _dcp_checkpoint(tmp_path / "ok")
    meta = safe_load.SafeFileSystemReader(str(tmp_path / "ok")).read_metadata()
    assert {"model.weight", "model.bias", "trainer"} <= set(meta.state_dict_metadata)
    target = {"model": {k: torch.zeros_like(v) for k, v in saved["model"].items()}, "trainer": b""}
    dcp.load(target, storage_reader=safe_load.SafeFileSystemReader(str(tmp_path / "ok")),
             planner=safe_load.SafeLoadPlanner(), no_dist=True)
    assert torch.equal(target["model"]["weight"], saved["model"]["weight"])
    assert safe_load.load_blob(target["trainer"]) == {"step": 5}


def test_a_dcp_bytes_entry_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    _dcp_checkpoint(tmp_path / "evil", trainer=Payload(marker))  # DCP pickles non-tensor values as they are
    with pytest.raises(CheckpointException, match="Weights only load failed"):
        dcp.load({"trainer": b""}, storage_reader=safe_load.SafeFileSystemReader(str(tmp_path / "evil")),
                 planner=safe_load.SafeLoadPlanner(), no_dist=True)
    assert not marker.exists()
    # the control: DCP's own planner unpickles it with weights_only=False
    dcp.load({"trainer": b""}, checkpoint_id=str(tmp_path / "evil"), no_dist=True)
    assert marker.exists()


def test_a_metadata_file_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    _dcp_checkpoint(tmp_path / "evil")
    meta_file = tmp_path / "evil" / ".metadata"
    meta_file.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        safe_load.SafeFileSystemReader(str(tmp_path / "evil")).read_metadata()
    assert not marker.exists()
    from torch.distributed.checkpoint import FileSystemReader

    try:  # the control: plain pickle runs it
        FileSystemReader(str(tmp_path / "evil")).read_metadata()
    except Exception:
        pass
    assert marker.exists()


def test_the_model_tools_read_through_the_safe_path(tmp_path):
    from vlm_trainer.checkpoint import model_io

    marker = tmp_path / "ran"
    _dcp_checkpoint(tmp_path / "evil", trainer=Payload(marker))
    with pytest.raises(CheckpointException, match="Weights only load failed"):
        model_io.read_dcp_tree(tmp_path / "evil")
    assert not marker.exists()
    _dcp_checkpoint(tmp_path / "ok")
    tree = model_io.read_dcp_tree(tmp_path / "ok")
    assert set(tree) == {"model", "trainer"} and safe_load.load_blob(tree["trainer"]) == {"step": 5}
