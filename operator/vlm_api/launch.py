"""The launch description of one stage: what both runners start, as plain data.

`vlmpretrain local` turns it into a torchx AppDef (trainer/vlm_local/appdef.py) and
`render.build_pytorchjob` into a PyTorchJob container, so the two cannot drift. Rendezvous
settings travel as torchrun's own `PET_*` environment variables: locally they are passed
as they are; in a PyTorchJob they become `elasticPolicy` fields, because the Kubeflow
controller sets the same variables itself from there (and updates them when the job is
rescaled, which a flag baked into the command could not follow).
"""

from __future__ import annotations

import dataclasses

from .schema import VLMPretrainRunSpec

TRAINER_MODULE = "vlm_trainer"
CONFIG_MOUNT = "/etc/vlm"
CONFIG_PATH = f"{CONFIG_MOUNT}/config.yaml"
DEFAULT_RDZV_PORT = 29400

# PET_* variables the Kubeflow controller owns in a PyTorchJob (from elasticPolicy/nprocPerNode).
CONTROLLER_PET = (
    "PET_NNODES", "PET_NPROC_PER_NODE", "PET_RDZV_BACKEND", "PET_RDZV_ENDPOINT",
    "PET_RDZV_ID", "PET_RDZV_CONF", "PET_MAX_RESTARTS",
)


@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """Where and how the torchrun agents of a stage meet."""

    run_id: str                      # one per operator attempt (stage_policy.rdzv_id)
    endpoint: str                    # host:port of the c10d store
    conf: dict[str, str]             # rdzv_conf key/values (timeouts, is_host)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One torchrun agent per node, `min_nodes..max_nodes` of them: `command args` with `env`."""

    name: str
    image: str
    command: str
    args: tuple[str, ...]
    env: dict[str, str]
    min_nodes: int
    max_nodes: int
    max_retries: int                 # the run's retries of a failed stage
    gpus_per_node: int
    ports: dict[str, int]            # named container ports: metrics, c10d


def rdzv_conf(spec: VLMPretrainRunSpec, *, external_store: bool) -> dict[str, str]:
    e = spec.elastic
    conf = {
        "last_call_timeout": str(e.last_call_timeout),
        "keep_alive_interval": str(e.keep_alive_interval),
        "keep_alive_max_attempt": str(e.keep_alive_max_attempt),
    }
    if external_store:
        conf["is_host"] = "false"   # no agent hosts the store: losing worker-0 is survivable
    return conf


def describe(
    spec: VLMPretrainRunSpec,
    *,
    name: str,
    rdzv: Rendezvous,
    config_path: str = CONFIG_PATH,
    env: dict[str, str] | None = None,
) -> Launch:
    """`torchrun -m vlm_trainer --config FILE`, with the rendezvous in PET_* env."""
    launch_env = {
        "PET_NNODES": f"{spec.resources.nodes.min}:{spec.resources.nodes.max}",
        "PET_NPROC_PER_NODE": str(spec.resources.procs_per_node),
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": rdzv.endpoint,
        "PET_RDZV_ID": rdzv.run_id,
        "PET_RDZV_CONF": ",".join(f"{k}={v}" for k, v in rdzv.conf.items()),
        "PET_MAX_RESTARTS": str(spec.elastic.max_restarts),
        # A restarted rank must not read the previous rank 0's address from torchrun's store
        # (after a worker SIGKILL: connectFullMesh refused, then a hang; tests/test_rdzv_store.py).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "VLM_PG_TIMEOUT_SECONDS": str(spec.elastic.process_group_timeout),
        # On SIGTERM torchrun gives its workers this long to commit a stop checkpoint; the
        # pod's grace period (render.py) is longer, so the kubelet does not cut it off.
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(spec.elastic.shutdown_timeout),
        # Every node answers on the metrics port (one pod = one scrape target of the
        # PodMonitor); global rank 0 alone serves the training series.
        "VLM_METRICS_EVERY_NODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    launch_env.update(env or {})
    return Launch(
        name=name,
        image=spec.image,
        command="torchrun",
        args=("-m", TRAINER_MODULE, "--config", config_path),
        env=launch_env,
        min_nodes=spec.resources.nodes.min,
        max_nodes=spec.resources.nodes.max,
        max_retries=spec.max_retries,
        gpus_per_node=spec.resources.gpus_per_node,
        ports={"metrics": spec.metrics.port, "c10d": DEFAULT_RDZV_PORT},
    )
