"""Where and how a run executes: nodes and GPUs, parallelism, elastic timing, checkpoints, metrics."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator, model_validator

from ..quantities import k8s_quantity, parse_interval
from .common import (
    ENDPOINT_PATTERN,
    EXTENDED_RESOURCE_PATTERN,
    INTERVAL_CEL,
    K8S_QUANTITY_PATTERN,
    KUBERNETES_DOMAIN,
    LABEL_VALUE_PATTERN,
    MAX_STEPS,
    MIN_MEMORY,
    NAME_PATTERN,
    OPTIONAL_DNS_SUBDOMAIN_PATTERN,
    OPTIONAL_QUALIFIED_NAME_PATTERN,
    QUALIFIED_NAME_PATTERN,
    RDZV_PORT,
    RESERVED_PORTS,
    STORE_HEALTH_PORT,
    secret_ref,
    URI_PATTERN,
    Model,
    Quantity,
    cel,
)


class NodeRange(Model):
    """Elastic bounds on worker nodes (PyTorchJob Worker replicas)."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [cel("self.min <= self.max", "min must be <= max", ".min")]}
    )
    min: int = Field(1, ge=1, le=4096, description="Fewest nodes the job runs with.")
    max: int = Field(1, ge=1, le=4096, description="Most nodes the job scales to.")

    @model_validator(mode="after")
    def _order(self) -> "NodeRange":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class Toleration(Model):
    """A Kubernetes toleration."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.value) || self.value == '' || !has(self.operator) || self.operator == 'Equal'",
                    "operator Exists takes no value", ".value"),
                cel("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                    "an empty key requires operator Exists (it tolerates every taint)", ".operator"),
                cel("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                    "tolerationSeconds requires effect NoExecute", ".tolerationSeconds"),
            ]
        }
    )
    key: str | None = Field(None, max_length=317, pattern=OPTIONAL_QUALIFIED_NAME_PATTERN, description="Taint key (a label key).")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal.")
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE_PATTERN, description="Taint value (a label value).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect.")
    tolerationSeconds: int | None = Field(None, ge=0, le=10**10, description="How long a NoExecute taint is tolerated.")

    @model_validator(mode="after")
    def _rules(self) -> "Toleration":
        if self.value and self.operator == "Exists":
            raise ValueError("operator Exists takes no value")
        if not self.key and self.operator != "Exists":
            raise ValueError("an empty key requires operator Exists (it tolerates every taint)")
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds requires effect NoExecute")
        return self


class Resources(Model):
    """Where and how big the job runs. `nodes` may change while running (in-place rescale)."""

    nodes: NodeRange = Field(default_factory=NodeRange, description="Elastic node range.")
    gpus_per_node: int = Field(8, ge=0, le=64, description="Worker processes (one per GPU) per node; 0 runs one CPU process.")
    gpu_resource_name: str = Field(
        "nvidia.com/gpu",
        max_length=317,
        pattern=EXTENDED_RESOURCE_PATTERN,
        description="Extended resource that counts GPUs: a name with a domain (nvidia.com/gpu, amd.com/gpu), "
        "never cpu, memory, ephemeral-storage, hugepages-* or a kubernetes.io resource.",
        json_schema_extra={"x-kubernetes-validations": [
            cel(f"!self.matches('{KUBERNETES_DOMAIN}')", "must not be a kubernetes.io resource: name an extended resource")
        ]},
    )
    cpu: str | None = Field(
        None, max_length=32, pattern=K8S_QUANTITY_PATTERN, description="CPU request per worker pod (e.g. '32', '500m')."
    )
    memory: str | None = Field(
        None, max_length=32, pattern=K8S_QUANTITY_PATTERN,
        description="Memory request and limit per worker pod (e.g. '512Gi'); at least 64Mi.",
    )
    node_selector: dict[
        Annotated[str, StringConstraints(max_length=317, pattern=QUALIFIED_NAME_PATTERN)],
        Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE_PATTERN)],
    ] = Field(
        default_factory=dict,
        max_length=64,
        description="Node labels worker pods require (label keys and values).",
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Tolerations of worker pods.")
    priority_class_name: str = Field(
        "", max_length=253, pattern=OPTIONAL_DNS_SUBDOMAIN_PATTERN, description="Deprecated: use scheduling.priorityClassName (the same, for every pod)."
    )

    @field_validator("gpu_resource_name")
    @classmethod
    def _extended(cls, value: str) -> str:
        if re.match(KUBERNETES_DOMAIN, value):
            raise ValueError("must not be a kubernetes.io resource: name an extended resource")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and k8s_quantity(value) < MIN_MEMORY:
            raise ValueError(f"{value} is less than 64Mi: a trainer cannot start in it (a unit missing? e.g. '512Gi')")
        return value

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)


class Parallelism(Model):
    """Data-parallel strategy and numerics."""

    strategy: Literal["ddp", "fsdp"] = Field("fsdp", description="ddp (replicated) or fsdp (FSDP2 fully_shard per layer).")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 autocast where supported, else fp32.")
    activation_checkpointing: bool = Field(False, description="Recompute decoder-layer activations in backward.")


class Elastic(Model):
    """Rendezvous and failure-detection timing of the elastic job."""

    max_restarts: int = Field(10, ge=0, le=1000, description="torchrun restarts of the worker group before the job fails.")
    last_call_timeout: int = Field(3, ge=1, le=3600, description="Seconds the rendezvous waits for more nodes after min joined.")
    # torch's own defaults (5 s x 3). At 1 s x 2 a node whose agent stalls for 2 s (a loaded
    # host) is dropped from the rendezvous without being told, and its replacement then
    # trains beside it as a second worker group (README: faults on a real cluster).
    keep_alive_interval: int = Field(5, ge=1, le=600, description="Seconds between rendezvous heartbeats.")
    keep_alive_max_attempt: int = Field(
        3, ge=1, le=100,
        description="Missed heartbeats before a node counts as dead (interval x attempts: how long a dead node holds up the next round).",
    )
    process_group_timeout: int = Field(
        60, ge=5, le=7200, description="Seconds a collective (and init_process_group) waits for a hung (not dead) peer before the group fails and torchrun restarts it (torch default: 30 min). VLM_PG_TIMEOUT_SECONDS overrides it in the trainer."
    )
    external_store: bool = Field(
        True, description="Run the rendezvous store as its own Deployment + Service so losing worker-0 does not end the job."
    )
    shutdown_timeout: int = Field(
        90, ge=10, le=3600,
        description="Seconds torchrun gives its workers on SIGTERM (pod deletion, eviction, suspend) to finish the step and commit a stop checkpoint before SIGKILL (TORCH_ELASTIC_SHUTDOWN_TIMEOUT); the pod's termination grace period is this plus 30 s.",
    )


class Checkpoint(Model):
    """Sharded checkpoints (torch.distributed.checkpoint) uploaded to object storage."""

    uri: str = Field(max_length=2048, pattern=URI_PATTERN, description="s3://bucket/prefix/ (or file:// / a path for local runs).")
    interval: Quantity = Field(
        "30m",
        description="Steps (integer) or wall time ('30m', '2h') between checkpoints; stage ends always checkpoint.",
        json_schema_extra={"x-kubernetes-validations": INTERVAL_CEL},
    )
    keep: int = Field(3, ge=1, le=1000, description="Committed checkpoints kept per stage (stage-final ones are always kept).")
    credentials_secret: str | None = secret_ref(
        "for the checkpoints, injected as env via secretKeyRef."
    )
    endpoint: str = Field(
        "", max_length=2048, pattern=ENDPOINT_PATTERN,
        description="Endpoint URL of an S3-compatible store (path-style addressing): http(s)://host[:port], "
        "no credentials (they come from credentialsSecret).",
    )
    region: str = Field("", max_length=64, pattern=r"^[a-z0-9-]*$", description="S3 region (default from the environment).")

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: Quantity) -> Quantity:
        unit, n = parse_interval(value)
        if unit == "steps" and n > MAX_STEPS:
            raise ValueError(f"at most {MAX_STEPS} steps")
        return value


class Metrics(Model):
    """Prometheus metrics served by global rank 0."""

    port: int = Field(
        9400, ge=1024, le=65535,
        description=f"Port of the /metrics endpoint on every worker; not {RDZV_PORT} (rendezvous) or {STORE_HEALTH_PORT} "
        "(store health).",
        json_schema_extra={"x-kubernetes-validations": [
            cel(f"!(self in {list(RESERVED_PORTS)})",
                f"must differ from the rendezvous port {RDZV_PORT} and the store's health port {STORE_HEALTH_PORT}")
        ]},
    )

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        if value in RESERVED_PORTS:
            raise ValueError(f"must differ from the rendezvous port {RDZV_PORT} and the store's health port {STORE_HEALTH_PORT}")
        return value
    pod_monitor: bool = Field(True, description="Create a PodMonitor (when the prometheus-operator CRD exists).")
