"""Shared fixtures, and the test tiers."""

from __future__ import annotations

import pytest

# --------------------------------------------------------------------------- tiers
# unit: fast, pure or in-process (`scripts/test.sh --fast`); integration: the API emulator,
# kubectl, promtool, moto S3 or subprocesses; slow: end to end, real torchrun. A test's own
# tier marker (or its module's `pytestmark`) wins; modules without one are listed here.
TIERS = ("unit", "integration", "slow")
MODULE_TIERS = {
    "unit": [
        "test_api_render", "test_api_validation", "test_dockerfile", "test_hostile_manifests",
        "test_layering", "test_operator_core", "test_packing", "test_rdzv_store_bind",
        "test_safe_load", "test_stage_policy", "test_trainer_confirmation", "test_trainer_loop",
        "test_trainer_model",
    ],
    "integration": [
        "test_alerts", "test_bench_gpu", "test_benchmarks", "test_checkpoint_distributed",
        "test_checkpoint_manager", "test_checkpoint_trainer", "test_ckpt_store", "test_cli",
        "test_kube_emulator", "test_local", "test_manifests", "test_operator_day2",
        "test_operator_faults", "test_operator_lifecycle", "test_operator_metrics",
        "test_operator_ownership", "test_operator_rdzv", "test_remote", "test_shards",
        "test_sweep_operator", "test_trainer_mixture", "test_visual_region",
    ],
    "slow": ["test_dashboard_live", "test_faithful_cluster"],
}
_TIER_OF = {module: tier for tier, modules in MODULE_TIERS.items() for module in modules}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    untiered = []
    for item in items:
        if any(m.name in TIERS for m in item.iter_markers()):
            continue
        tier = _TIER_OF.get(item.path.stem)
        if tier is None:
            untiered.append(item.nodeid)
        else:
            item.add_marker(tier)
    if untiered:
        raise pytest.UsageError(f"{len(untiered)} test(s) without a tier, e.g. {untiered[0]}: add the "
                                f"module to MODULE_TIERS in tests/conftest.py or mark it {'/'.join(TIERS)}")


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


# --------------------------------------------------------------------------- the operator on the API emulator


@pytest.fixture
def cluster(tmp_path, request):
    """The operator (in-process kopf) against the Kubernetes API emulator over HTTP
    (tests/support/operator_harness.py); the operator's API calls are recorded per test."""
    from tests.support import operator_calls
    from tests.support.kube_emulator import KubeServer
    from tests.support.operator_harness import Cluster

    with KubeServer() as server:
        yield Cluster(server, tmp_path)
        operator_calls.record(server, request.node.name)


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
