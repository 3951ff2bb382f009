"""The VLMPretrainSweep API: one recipe trained over a grid of knobs, compared on one metric.

`spec.template` is a whole VLMPretrainRun spec (the CRD embeds the run's schema there);
`spec.parameters` are `{path, values}` pairs whose cartesian product is the grid; every
grid point is trained once per seed. The grid itself (path addressing, expansion, child
names) is `vlm_api.sweep_grid`; checking a sweep manifest is `vlm_api.sweep_validate`.
Field names are the API contract: add fields freely, rename none.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from .schema.common import GROUP, MAX_RUN_NAME, RUN_NAME_PATTERN, Model, cel
from .schema.run import Condition

KIND = "VLMPretrainSweep"
PLURAL = "vlmpretrainsweeps"
SINGULAR = "vlmpretrainsweep"
SHORT_NAMES = ["vlmsweep", "vps"]

MAX_POINTS = 256  # grid points (seeds not counted): more is a typo, not an ablation
MAX_PARAMETERS = 8
MAX_SEEDS = 16
MAX_SEED = 999
HASH_CHARS = 8
# A child run is `<sweep>-<hash>-s<seed>` and a run name has at most MAX_RUN_NAME characters.
MAX_SWEEP_NAME = MAX_RUN_NAME - len(f"-{'0' * HASH_CHARS}-s{MAX_SEED}")
SWEEP_NAME_RULE = f"size(self.metadata.name) <= {MAX_SWEEP_NAME} && self.metadata.name.matches('{RUN_NAME_PATTERN}')"
SWEEP_NAME_MESSAGE = (
    f"metadata.name must be a DNS label (RFC 1035: lowercase letters, digits and '-', starting with a letter) "
    f"of at most {MAX_SWEEP_NAME} characters: child runs are named <name>-<hash>-s<seed>"
)
# `field.field[name].field`: camelCase fields, list items (stages, sources) by their name.
SEGMENT = r"[a-zA-Z][a-zA-Z0-9]*(\[[a-z0-9]([-a-z0-9]*[a-z0-9])?\])?"
PATH_PATTERN = rf"^{SEGMENT}([.]{SEGMENT})*$"

TERMINAL_RUN_PHASES = ("Succeeded", "Failed", "Invalid")
LABEL_SWEEP = f"{GROUP}/sweep"
LABEL_POINT = f"{GROUP}/point"
LABEL_SEED = f"{GROUP}/seed"
ANNOTATION_PARAMETERS = f"{GROUP}/parameters"


class Parameter(Model):
    """One swept knob."""

    path: str = Field(
        max_length=256, pattern=PATH_PATTERN,
        description="Field of the run spec, in its camelCase names, stages (and sources) by name in brackets: "
        "e.g. stages[pretrain].visualIntroduceAt.",
    )
    values: list[Any] = Field(
        min_length=1, max_length=MAX_POINTS,
        description="Values the field takes, each valid where the path points (scalars or objects).",
        json_schema_extra={"items": {"x-kubernetes-preserve-unknown-fields": True}},
    )


class Objective(Model):
    """What the sweep compares: one stage's final held-out loss on one modality."""

    stage: str = Field(max_length=40, description="Stage whose final checkpoint is compared.")
    metric: Literal["validationLoss"] = Field("validationLoss", description="The trainer's final validation loss.")
    modality: Literal["text", "image-text", "interleaved"] = Field(
        "image-text", description="Modality whose validation loss is compared.")
    goal: Literal["minimize", "maximize"] = Field("minimize", description="Whether lower or higher is better.")


class VLMPretrainSweepSpec(Model):
    """A recipe, a grid of knobs over it, seeds, and the metric that compares the runs."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("self.template.stages.exists(s, s.name == self.objective.stage)",
            "objective.stage must name a stage of the template", ".objective.stage"),
        cel("self.parameters.all(p, !p.path.startsWith('stages[') || "
            "self.template.stages.exists(s, p.path.startsWith('stages[' + s.name + ']')))",
            "a parameter path stages[<name>] must name a stage of the template", ".parameters"),
    ]})

    template: dict[str, Any] = Field(description="A whole VLMPretrainRun spec, validated as one; every child run "
                                     "starts from it.")
    parameters: list[Parameter] = Field(
        default_factory=list, max_length=MAX_PARAMETERS,
        description=f"The grid: the cartesian product of every parameter's values (at most {MAX_POINTS} points).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["path"]},
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS,
        description="Each grid point is trained once per seed (the run's spec.seed).",
        json_schema_extra={"items": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
                           "x-kubernetes-list-type": "set"},
    )
    max_concurrent: int = Field(1, ge=1, le=256, description="Child runs active (not finished) at once.")
    objective: Objective = Field(description="The metric the runs are compared on.")
    suspend: bool = Field(False, description="Suspend the active child runs and start no new ones.")


class SweepPoint(Model):
    """One child run: a grid point and a seed."""

    name: str = Field(description="The grid point: <sweep>-<hash of its parameters>.")
    parameters: dict[str, Any] = Field(description="Path -> value of this point.",
                                       json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    seed: int = Field(description="spec.seed of the run.")
    run: str = Field(description="The child VLMPretrainRun.")
    phase: str = Field(description="The run's phase (NotStarted before it exists).")
    validation_loss: dict[str, float] | None = Field(
        None, description="Final validation loss per modality of the objective's stage.")
    stages: dict[str, dict[str, float]] | None = Field(
        None, description="Final validation loss per modality of every confirmed stage.")
    tokens: int | None = Field(None, description="Tokens trained over the confirmed stages.")
    message: str | None = Field(None, description="Why the point failed, where the run cannot say.")


class SweepBest(Model):
    """The grid point with the best objective, averaged over its succeeded seeds."""

    name: str = Field(description="The grid point.")
    parameters: dict[str, Any] = Field(description="Its parameters.",
                                       json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    value: float = Field(description="Mean objective over its seeds.")
    seeds: int = Field(description="Seeds the mean is over.")


class VLMPretrainSweepStatus(Model):
    """What the operator observed; written by the operator only."""

    # The run's phases in the run's order: typing caches `Literal[...] | None` by set equality,
    # so a second order of the same set would make the CRD's enum depend on import order.
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Invalid"] | None = Field(
        None, description="Pending, Running, Suspended, Succeeded (all runs ended, one or more succeeded), "
        "Failed (all runs failed) or Invalid.")
    done: str | None = Field(None, description="Finished runs / all runs, e.g. 3/12.")
    points: list[SweepPoint] | None = Field(None, description="Every child run, in grid order.")
    best: SweepBest | None = Field(None, description="Set once every run has finished.")
    observed_generation: int | None = Field(None, description="metadata.generation the status describes.")
    conditions: list[Condition] | None = Field(None, description="Ready, Progressing, Degraded.")
