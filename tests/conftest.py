"""Shared fixtures."""

from __future__ import annotations

import pytest


# --------------------------------------------------------------------------- S3 (moto over HTTP)


@pytest.fixture(scope="session")
def aws_env():
    """Fake AWS credentials for the session (boto3 clients here and in worker processes);
    no profile, endpoint or region leaks in from the machine."""
    from tests.support.s3 import AWS_ENV_UNSET, fake_aws_env

    with pytest.MonkeyPatch.context() as mp:
        for k, v in fake_aws_env().items():
            mp.setenv(k, v)
        for k in AWS_ENV_UNSET:
            mp.delenv(k, raising=False)
        yield fake_aws_env()


@pytest.fixture(scope="session")
def moto_endpoint(aws_env):
    """A real HTTP S3 endpoint: moto's ThreadedMotoServer on a free local port."""
    moto_server = pytest.importorskip("moto.server")
    from tests.support.s3 import free_port

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


# --------------------------------------------------------------------------- trainers on tiny data


@pytest.fixture
def make_trainer(tmp_path_factory, monkeypatch):
    """Build in-process Trainers on the shared tiny data (no checkpoints, inline data worker,
    one thread); `packing=None` keeps the spec's default; closed at teardown."""
    from tests.fixtures_trainer import one_thread, shared_data, spec_dict, stage, trainer_config
    from vlm_trainer.metrics import reset_registry
    from vlm_trainer.train import Trainer

    data = shared_data(tmp_path_factory)
    monkeypatch.setenv("VLM_METRICS_PORT", "0")
    monkeypatch.setenv("VLM_NO_CHECKPOINT", "1")
    monkeypatch.setenv("VLM_DATA_WORKER", "inline")
    built = []

    def make(*, packing: bool | None = None, serve_metrics: bool = False, **stage_kw):
        reset_registry()
        spec = spec_dict(data, stages=[stage(**stage_kw)])
        if packing is not None:
            spec["data"]["packing"] = packing
        t = Trainer(trainer_config(spec), serve_metrics=serve_metrics)
        built.append(t)
        return t

    with one_thread():
        yield make
    for t in built:
        t.close()
