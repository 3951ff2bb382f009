"""The VLMPretrainRun spec as a whole, its status, and the trainer config rendered from it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from .cluster import PodTemplate, Scheduling
from .common import API_VERSION, DNS_SUBDOMAIN_PATTERN, IMAGE_PATTERN, IMMUTABLE, MULTIMODAL, PACKING_UNSUPPORTED_LLMS, FieldError, Model, cel, list_map
from .data import DataSpec
from .infra import Checkpoint, Elastic, Metrics, Parallelism, Resources
from .model import ModelSpec
from .stages import Stage


class VLMPretrainRunSpec(Model):
    """A VLM pretraining recipe and where it runs."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                # Linear in stages x sources: map membership (`in s.mixture`) instead of a
                # search of the sources per mixture key. Source names are unique (list-map),
                # so as many sources named in a mixture as it has keys means all keys are sources.
                cel(
                    "self.stages.all(s, size(self.data.sources.filter(d, d.name in s.mixture)) == size(s.mixture))",
                    "every mixture key must name a source declared in data.sources",
                    ".stages",
                ),
                cel(  # a conditional, not ||: only the taken branch is evaluated
                    "has(self.model.visionEncoder) ? true : self.data.sources.all(d, d.modality == 'text' || "
                    "self.stages.all(s, !(d.name in s.mixture)))",
                    "a stage mixes image data, so model.visionEncoder is required",
                    ".model",
                ),
                cel(  # the GPU count is resources.gpusPerNode's
                    "!has(self.podTemplate) || !has(self.podTemplate.trainer) || !has(self.podTemplate.trainer.resources)"
                    " || !((has(self.podTemplate.trainer.resources.limits) && self.resources.gpuResourceName in "
                    "self.podTemplate.trainer.resources.limits) || (has(self.podTemplate.trainer.resources.requests) && "
                    "self.resources.gpuResourceName in self.podTemplate.trainer.resources.requests))",
                    "the GPU resource is set from resources.gpusPerNode: remove it from podTemplate.trainer.resources",
                    ".podTemplate.trainer.resources",
                ),
                cel(
                    "!has(self.scheduling) || self.scheduling.priorityClassName == '' || "
                    "self.resources.priorityClassName == '' || "
                    "self.scheduling.priorityClassName == self.resources.priorityClassName",
                    "set scheduling.priorityClassName only (resources.priorityClassName is deprecated)",
                    ".scheduling.priorityClassName",
                ),
            ]
        }
    )
    image: str = Field(
        "ghcr.io/vlm-pretrain-operator/trainer:0.1.0", min_length=1, max_length=512, pattern=IMAGE_PATTERN,
        description="Trainer container image: [registry/]path[:tag][@digest], no whitespace.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Pull policy of the trainer image.")
    model: ModelSpec = Field(description="The VLM's parts.", json_schema_extra={"x-kubernetes-validations": IMMUTABLE})
    data: DataSpec = Field(description="Data sources.", json_schema_extra={"x-kubernetes-validations": IMMUTABLE})
    stages: list[Stage] = Field(
        min_length=1, max_length=16, description="Stages, run in order (names unique).",
        json_schema_extra={"x-kubernetes-validations": IMMUTABLE, **list_map()},
    )
    resources: Resources = Field(default_factory=Resources, description="Nodes, GPUs and scheduling.")
    parallelism: Parallelism = Field(default_factory=Parallelism, description="Distributed strategy and numerics.")
    elastic: Elastic = Field(default_factory=Elastic, description="Elastic rendezvous and failure detection.")
    checkpoint: Checkpoint = Field(description="Checkpoint location and cadence.")
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus metrics.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for initialisation and data order.")
    suspend: bool = Field(False, description="Suspend the running stage (resumes from its last checkpoint).")
    max_retries: int = Field(3, ge=0, le=100, description="Times a failed stage job is recreated before the run fails.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Queueing (Kueue), gang scheduling, "
                                   "scheduler and priority on a shared cluster.")
    service_account_name: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
        description="ServiceAccount of trainer and rendezvous-store pods: S3 access may then come from workload "
        "identity (EKS IRSA / Pod Identity, GKE or Azure Workload Identity) instead of a credentialsSecret. Its "
        "Kubernetes API token stays unmounted (workload-identity webhooks project their own).",
    )
    image_pull_secrets: list[Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]] = Field(
        default_factory=list, max_length=16,
        description="Secrets (names) for pulling the image, on trainer and rendezvous-store pods.",
    )
    pod_template: PodTemplate | None = Field(
        None, description="Merged into every trainer pod: labels, annotations, volumes, affinity, sidecars, "
        "env, mounts, extra resources. Operator-owned fields are refused.",
    )

    @model_validator(mode="after")
    def _cross(self) -> "VLMPretrainRunSpec":
        declared = {s.name: s for s in self.data.sources}
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("stages: stage names must be unique")
        for i, stage in enumerate(self.stages):
            unknown = sorted(set(stage.mixture) - set(declared))
            if unknown:
                raise FieldError(f"stages[{i}].mixture", f"unknown source(s) {unknown}; declared: {sorted(declared)}")
            if self.model.vision_encoder is None and any(
                declared[k].modality in MULTIMODAL for k in stage.mixture
            ):
                raise FieldError("model.visionEncoder", f"required: stage {stage.name!r} mixes image data")
            if stage.prune is not None and stage.prune.calibration.source not in declared:
                raise FieldError(
                    f"stages[{i}].prune.calibration.source", f"unknown source {stage.prune.calibration.source!r}"
                )
        self._cluster_conflicts()
        llm_type = (self.model.llm.config or {}).get("model_type")
        if self.data.packing and llm_type in PACKING_UNSUPPORTED_LLMS:
            raise FieldError("data.packing", f"model.llm {llm_type!r} cannot keep packed samples apart "
                             f"({PACKING_UNSUPPORTED_LLMS[llm_type]}): set data.packing: false")
        return self

    def _cluster_conflicts(self) -> None:
        sched, res = self.scheduling, self.resources
        if sched.priority_class_name and res.priority_class_name and sched.priority_class_name != res.priority_class_name:
            raise FieldError("scheduling.priorityClassName", "set it here only (resources.priorityClassName is deprecated)")
        if self.pod_template is None:
            return
        extra = self.pod_template.trainer.resources
        owned = {res.gpu_resource_name: "resources.gpusPerNode"}
        owned.update({"cpu": "resources.cpu"} if res.cpu else {})
        owned.update({"memory": "resources.memory"} if res.memory else {})
        for part, amounts in (("limits", extra.limits), ("requests", extra.requests)):
            for name in amounts:
                if name in owned:
                    raise FieldError(f"podTemplate.trainer.resources.{part}[{name!r}]", f"set by {owned[name]}")

    @property
    def priority_class_name(self) -> str:
        """The pods' PriorityClass: scheduling's, else the deprecated resources field."""
        return self.scheduling.priority_class_name or self.resources.priority_class_name

    def stage_index(self, name: str) -> int:
        for i, s in enumerate(self.stages):
            if s.name == name:
                return i
        raise KeyError(name)


# --------------------------------------------------------------------------- status


class Condition(Model):
    """A Kubernetes-style condition."""

    type: str = Field(description="Ready, Progressing, Degraded or RendezvousReady.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, description="Generation the condition was computed for.")


class CheckpointRef(Model):
    """A committed checkpoint."""

    uri: str = Field(description="Checkpoint directory URI.")
    step: int = Field(description="Optimizer step.")
    time: str | None = Field(None, description="Commit time.")
    stage: str | None = Field(None, description="Stage it belongs to.")
    tokens: int | None = Field(None, description="Tokens the stage had trained at this checkpoint (final checkpoints).")
    validation_loss: dict[str, float] | None = Field(
        None, description="Held-out loss per modality at this checkpoint (final checkpoints of evaluating stages)."
    )


class VLMPretrainRunStatus(Model):
    """What the operator observed; written by the operator only."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Invalid"] | None = Field(
        None, description="Pending, Running, Succeeded, Failed, Suspended or Invalid."
    )
    stage: str | None = Field(None, description="Current step: a stage name, or <stage>-pruned while that stage's pruning step runs.")
    stage_index: int | None = Field(None, description="Index of the current stage.")
    step: int | None = Field(None, description="Latest optimizer step reported by rank 0.")
    tokens: int | None = Field(None, description="Tokens trained in this stage.")
    loss: float | None = Field(None, description="Latest training loss.")
    image_token_fraction: float | None = Field(None, description="Measured fraction of image tokens in recent steps.")
    world_size: int | None = Field(None, description="Worker processes in the current rendezvous.")
    nodes: int | None = Field(None, description="Nodes in the current rendezvous (from the trainer's metrics).")
    last_checkpoint: CheckpointRef | None = Field(None, description="Newest committed checkpoint.")
    final_checkpoints: dict[str, CheckpointRef] | None = Field(
        None, description="Final checkpoint of each finished stage, as its trainer confirmed it (termination message)."
    )
    restarts: int | None = Field(None, description="Elastic restarts reported by torchrun.")
    attempt: int | None = Field(None, description="Attempt number of the current stage job (0 = first).")
    job_name: str | None = Field(None, description="Current PyTorchJob.")
    start_time: str | None = Field(None, description="When the run started.")
    completion_time: str | None = Field(None, description="When the run finished.")
    observed_generation: int | None = Field(None, description="Generation the operator last acted on.")
    conditions: list[Condition] | None = Field(None, description="Ready, Progressing, Degraded.")


def parse_spec(spec: dict) -> VLMPretrainRunSpec:
    return VLMPretrainRunSpec.model_validate(spec)


# --------------------------------------------------------------------------- trainer config


class RunRef(Model):
    """The run a trainer process belongs to."""

    name: str = Field(description="VLMPretrainRun name.")
    namespace: str = Field("default", description="Namespace.")
    uid: str = Field("", description="Run uid (the rendezvous id).")


class TrainerConfig(Model):
    """What the operator renders into `<run>-<stage>-config` and the trainer reads:
    the whole spec plus which stage to run and where to start from. Never holds secrets."""

    api_version: Literal["pretrain.vlm.dev/v1alpha1"] = API_VERSION
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    run: RunRef
    stage: str = Field(description="Name of the stage this process trains.")
    spec: VLMPretrainRunSpec
    init_from: str | None = Field(
        None, description="Committed checkpoint (URI of its step directory) the stage starts from when it has none of its own."
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (local runs and tests).")

    @model_validator(mode="after")
    def _stage_exists(self) -> "TrainerConfig":
        if self.stage not in [s.name for s in self.spec.stages]:
            raise ValueError(f"stage {self.stage!r} is not in spec.stages")
        return self

    @property
    def stage_spec(self) -> Stage:
        return self.spec.stages[self.spec.stage_index(self.stage)]
