"""What a shared GPU cluster asks of a run: queueing and gang scheduling, the service
account, pull secrets, and pod customisation (`podTemplate`).

`podTemplate` is merged into every trainer pod by vlm_api.cluster.merge_pod_template. Only
what the operator does not own can be set: the pod-spec keys below are an allow-list
(anything else, e.g. nodeSelector, serviceAccountName, is a field of its own in the spec),
and names the operator uses (the `pytorch` container, the `config`/`dshm`/`scratch`
volumes, PET_* and the trainer's env, the GPU resource) are refused with their path, at
admission by CEL where a rule can see them and by `vlmpretrain validate` always.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from .common import (
    DNS_SUBDOMAIN_PATTERN,
    ENV_NAME_PATTERN,
    LABEL_VALUE_PATTERN,
    NAME_PATTERN,
    OPTIONAL_DNS_SUBDOMAIN_PATTERN,
    QUALIFIED_NAME_PATTERN,
    FieldError,
    Model,
    cel,
    list_map,
)

# The trainer container's env the operator owns: PET_* (torchrun's rendezvous, set by the
# Kubeflow controller or the operator), VLM_* (the trainer's own switches), the credential
# variables (they come from credentialsSecret fields, never a literal), and what render.py
# sets for the read-only root filesystem and torchrun.
OWNED_ENV_PREFIXES = ("PET_", "VLM_")
OWNED_ENV = (
    "POD_IP", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE", "HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR", "MPLCONFIGDIR",
)
OWNED_VOLUMES = ("config", "dshm", "scratch")
OWNED_VOLUME_PREFIX = "vlm-"  # the operator's PVC volumes: vlm-pvc-<i>
PVC_ROOT = "/mnt/vlm-pvc"  # pvc://CLAIM/path is read as PVC_ROOT/CLAIM/path
OWNED_MOUNTS = ("/etc/vlm", "/dev/shm", "/tmp")
OWNED_CONTAINER = "pytorch"
# Label keys on the pods that select them (NetworkPolicy, PodMonitor, the controller).
OWNED_LABEL_PREFIXES = ("pretrain.vlm.dev/", "training.kubeflow.org/")
OWNED_LABELS = ("app.kubernetes.io/managed-by",)


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


# An entry of a pod-spec list passed through as written (the API server checks it when the job is created).
PodSpecItem = Annotated[dict[str, Any], Field(description="As in a Pod spec.")]
LabelKey = Annotated[str, StringConstraints(max_length=317, pattern=QUALIFIED_NAME_PATTERN)]


class Scheduling(Model):
    """How the run's jobs are queued and scheduled on a shared cluster."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("self.gang || !has(self.scheduleTimeoutSeconds)", "scheduleTimeoutSeconds needs gang: true",
            ".scheduleTimeoutSeconds"),
        cel("self.gang || self.gangQueue == ''", "gangQueue needs gang: true", ".gangQueue"),
    ]})
    queue_name: str | None = Field(
        None, min_length=1, max_length=63, pattern=DNS_SUBDOMAIN_PATTERN,
        description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name on each PyTorchJob). The job is created "
        "suspended and Kueue admits it (sets runPolicy.suspend false) when the queue has quota; the operator never "
        "un-suspends it. Leave unset on clusters without Kueue: the job would wait forever.",
    )
    gang: bool = Field(
        False,
        description="All-or-nothing pod scheduling: runPolicy.schedulingPolicy.minAvailable = resources.nodes.min "
        "(the training operator creates the PodGroup for Volcano or scheduler-plugins coscheduling).",
    )
    gang_queue: str = Field(
        "", max_length=253, pattern=OPTIONAL_DNS_SUBDOMAIN_PATTERN,
        description="Gang scheduler's queue (Volcano Queue): runPolicy.schedulingPolicy.queue. Not queueName, "
        "which is Kueue's.",
    )
    schedule_timeout_seconds: int | None = Field(
        None, ge=1, le=7 * 86400,
        description="Seconds the gang may wait for all its pods: runPolicy.schedulingPolicy.scheduleTimeoutSeconds.",
    )
    scheduler_name: str = Field(
        "", max_length=253, pattern=OPTIONAL_DNS_SUBDOMAIN_PATTERN,
        description="schedulerName of every pod (trainer and rendezvous store), e.g. volcano; empty: the default.",
    )
    priority_class_name: str = Field(
        "", max_length=253, pattern=OPTIONAL_DNS_SUBDOMAIN_PATTERN,
        description="PriorityClass of every pod (and schedulingPolicy.priorityClass with gang; Kueue reads it "
        "as the workload's priority). Replaces resources.priorityClassName.",
    )

    @model_validator(mode="after")
    def _gang_only(self) -> "Scheduling":
        if not self.gang and self.schedule_timeout_seconds is not None:
            raise FieldError("scheduling.scheduleTimeoutSeconds", "needs gang: true")
        if not self.gang and self.gang_queue:
            raise FieldError("scheduling.gangQueue", "needs gang: true")
        return self


class PodMetadata(Model):
    """Labels and annotations added to every trainer and rendezvous-store pod."""

    labels: dict[LabelKey, Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE_PATTERN)]] = Field(
        default_factory=dict, max_length=64,
        description="Pod labels; not pretrain.vlm.dev/*, training.kubeflow.org/* or app.kubernetes.io/managed-by "
        "(they select the run's pods).",
    )
    annotations: dict[LabelKey, Annotated[str, StringConstraints(max_length=16384)]] = Field(
        default_factory=dict, max_length=64, description="Pod annotations.",
    )


class EnvVar(Model):
    """An environment variable of the trainer container (as in a Pod's container)."""

    name: str = Field(max_length=253, pattern=ENV_NAME_PATTERN, description="Variable name.")
    value: str | None = Field(None, max_length=32768, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        None, description="Source of the value (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef)."
    )


class VolumeMount(Model):
    """A mount of one of podTemplate.spec.volumes into the trainer container."""

    name: str = Field(max_length=63, pattern=NAME_PATTERN, description="Volume name.")
    mount_path: str = Field(max_length=1024, pattern=r"^/", description="Absolute path in the container.")
    read_only: bool | None = Field(None, description="Mount read-only.")
    sub_path: str | None = Field(None, max_length=1024, description="Path within the volume.")
    sub_path_expr: str | None = Field(None, max_length=1024, description="subPath with $(VAR) expansion.")
    mount_propagation: Literal["None", "HostToContainer", "Bidirectional"] | None = Field(
        None, description="Mount propagation mode."
    )


Quantity = Annotated[Union[int, Annotated[str, StringConstraints(max_length=64)]],
                     Field(description="An amount: an integer or a Kubernetes quantity ('4', '500m', '1Gi').")]


class ContainerResources(Model):
    """Extra resources of the trainer container, e.g. vpc.amazonaws.com/efa or rdma/ib."""

    limits: dict[Annotated[str, StringConstraints(max_length=317)], Quantity] = Field(
        default_factory=dict, max_length=32, description="Limits by resource name; not the GPU resource.")
    requests: dict[Annotated[str, StringConstraints(max_length=317)], Quantity] = Field(
        default_factory=dict, max_length=32, description="Requests by resource name; not the GPU resource.")


_NO_OWNED_ENV = (
    f"self.all(e, !({' || '.join(f'e.name.startsWith({p!r})' for p in OWNED_ENV_PREFIXES)}) "
    f"&& !(e.name in {_cel_list(OWNED_ENV)}))"
)


class TrainerOverrides(Model):
    """Merged into the trainer container (`pytorch`): entries are added; an entry the operator
    sets itself is refused, never overwritten."""

    env: list[EnvVar] = Field(
        default_factory=list, max_length=128,
        description="Added env (NCCL_*, FI_EFA_*, ...); not PET_*, VLM_*, the credential variables or the "
        "trainer's own (HOME, TMPDIR, POD_IP, ...).",
        json_schema_extra={**list_map(), "x-kubernetes-validations": [
            cel(_NO_OWNED_ENV, "the operator sets PET_*, VLM_*, AWS credential variables and the trainer's own "
                "env (HOME, TMPDIR, POD_IP, ...): use another name or the spec's own field")]},
    )
    env_from: list[PodSpecItem] = Field(
        default_factory=list, max_length=32, description="Added envFrom (configMapRef / secretRef).")
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, max_length=64,
        description=f"Added mounts of podTemplate.spec.volumes; not at {', '.join(OWNED_MOUNTS)} or under {PVC_ROOT}.",
        json_schema_extra={**list_map("mountPath"), "x-kubernetes-validations": [
            cel(f"self.all(m, !(m.mountPath in {_cel_list(OWNED_MOUNTS)}) && !m.mountPath.startsWith('{PVC_ROOT}'))",
                f"{', '.join(OWNED_MOUNTS)} and {PVC_ROOT} are the operator's mounts (config, shared memory, "
                "scratch, PVC data)")]},
    )
    resources: ContainerResources = Field(
        default_factory=ContainerResources,
        description="Added resources (e.g. limits: {vpc.amazonaws.com/efa: 4}); GPUs come from "
        "resources.gpusPerNode, cpu and memory from resources.cpu / resources.memory.",
    )


class NamedItem(Model):
    """A named pod-spec list entry (volume, container): the rest is passed through as written."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(max_length=63, pattern=NAME_PATTERN, description="Name (the merge key).")


class PodSpecOverrides(Model):
    """Pod-spec fields added to every trainer pod. An allow-list: nodeSelector, tolerations,
    priorityClassName, schedulerName, serviceAccountName and imagePullSecrets are fields of
    the spec (resources, scheduling), the rest of a pod spec is the operator's."""

    volumes: list[NamedItem] = Field(
        default_factory=list, max_length=64,
        description="Added volumes (PVCs, model caches, ...); not config, dshm, scratch or vlm-*.",
        json_schema_extra={**list_map(), "x-kubernetes-validations": [
            cel(f"self.all(v, !(v.name in {_cel_list(OWNED_VOLUMES)}) && !v.name.startsWith('{OWNED_VOLUME_PREFIX}'))",
                f"volume names {', '.join(OWNED_VOLUMES)} and {OWNED_VOLUME_PREFIX}* are the operator's")]},
    )
    init_containers: list[NamedItem] = Field(
        default_factory=list, max_length=16, description="Init containers, run before the trainer.",
        json_schema_extra=list_map())
    containers: list[NamedItem] = Field(
        default_factory=list, max_length=16, description=f"Sidecar containers; not {OWNED_CONTAINER!r} (the trainer).",
        json_schema_extra={**list_map(), "x-kubernetes-validations": [
            cel(f"self.all(c, c.name != '{OWNED_CONTAINER}')",
                f"'{OWNED_CONTAINER}' is the trainer container: customise it with podTemplate.trainer")]},
    )
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity / anti-affinity / node affinity.")
    topology_spread_constraints: list[PodSpecItem] = Field(
        default_factory=list, max_length=16, description="Topology spread constraints.")
    host_ipc: bool | None = Field(None, alias="hostIPC", description="Share the host's IPC namespace.")
    host_network: bool | None = Field(None, description="Use the host's network namespace.")
    dns_policy: Literal["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"] | None = Field(
        None, description="DNS policy.")
    dns_config: dict[str, Any] | None = Field(None, description="DNS configuration.")
    runtime_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
                                           description="RuntimeClass.")
    host_aliases: list[PodSpecItem] = Field(default_factory=list, max_length=64, description="/etc/hosts entries.")
    share_process_namespace: bool | None = Field(None, description="Share one process namespace between containers.")


class PodTemplate(Model):
    """Merged into every trainer pod (strategic-merge by name; README, "Running on a shared
    GPU cluster"). Operator-owned fields are refused, not overwritten."""

    metadata: PodMetadata = Field(default_factory=PodMetadata, description="Pod labels and annotations.")
    spec: PodSpecOverrides = Field(default_factory=PodSpecOverrides, description="Pod-spec fields.")
    trainer: TrainerOverrides = Field(default_factory=TrainerOverrides, description="Trainer-container fields.")

    @model_validator(mode="after")
    def _owned(self) -> "PodTemplate":
        for key in self.metadata.labels:
            if key.startswith(OWNED_LABEL_PREFIXES) or key in OWNED_LABELS:
                raise FieldError(f"podTemplate.metadata.labels[{key!r}]", "the operator's (it selects the run's pods)")
        for i, e in enumerate(self.trainer.env):
            if e.name.startswith(OWNED_ENV_PREFIXES) or e.name in OWNED_ENV:
                raise FieldError(f"podTemplate.trainer.env[{i}].name", f"{e.name} is the operator's (PET_*, VLM_*, credentials, "
                                 "the trainer's own env)")
        for i, m in enumerate(self.trainer.volume_mounts):
            if m.mount_path in OWNED_MOUNTS or m.mount_path.startswith(PVC_ROOT):
                raise FieldError(f"podTemplate.trainer.volumeMounts[{i}].mountPath", f"{m.mount_path} is the operator's")
        for i, v in enumerate(self.spec.volumes):
            if v.name in OWNED_VOLUMES or v.name.startswith(OWNED_VOLUME_PREFIX):
                raise FieldError(f"podTemplate.spec.volumes[{i}].name", f"{v.name} is the operator's")
        for i, c in enumerate(self.spec.containers):
            if c.name == OWNED_CONTAINER:
                raise FieldError(f"podTemplate.spec.containers[{i}].name", f"{OWNED_CONTAINER} is the trainer: use podTemplate.trainer")
        return self
