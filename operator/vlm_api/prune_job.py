"""The Kubernetes objects of a pruning step (`stage_policy.steps`: `<stage>-pruned`, after a
stage that declares `prune`).

Its own ConfigMap (the pruned stage's TrainerConfig) and a one-worker PyTorchJob
`<run>-<stage>-pruned` that runs ``python -m vlm_trainer.visual_region.prune`` on the
stage's confirmed final checkpoint. One process, so no elasticPolicy and no rendezvous;
the pod confirms the pruned checkpoint in its termination message as a stage's rank 0
does, so the operator observes, retries and advances on it like a stage's job. A failed
pod fails the job (restartPolicy Never): a retry is a new attempt, `-r<N>`.
"""

from __future__ import annotations

from typing import Any

import yaml

from . import cluster, launch, render, schema as s, stage_policy

PRUNE_MODULE = "vlm_trainer.visual_region.prune"


def build_prune_configmap(run: dict, spec: s.VLMPretrainRunSpec, step: stage_policy.Step) -> dict:
    config = render.build_trainer_config(run, spec, spec.stages[step.stage].name)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": render.config_name(run["name"], step.name), "namespace": run.get("namespace", "default"),
                     "labels": render.labels(run, step.name)},
        "data": {"config.yaml": yaml.safe_dump(config, sort_keys=False)},
    }


def build_prune_job(run: dict, spec: s.VLMPretrainRunSpec, step: stage_policy.Step, source: str,
                    attempt: int = 0) -> dict:
    """The job that prunes `source` (the stage's confirmed final checkpoint)."""
    name = render.job_name(run["name"], step.name, attempt)
    process = launch.Launch(
        name=name, image=spec.image, command="python",
        args=("-m", PRUNE_MODULE, "--config", launch.CONFIG_PATH, "--checkpoint", source),
        env={**render.SCRATCH_ENV, "PYTHONUNBUFFERED": "1"}, min_nodes=1, max_nodes=1,
        max_retries=spec.max_retries, gpus_per_node=spec.resources.gpus_per_node, ports={})
    job: dict[str, Any] = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": run.get("namespace", "default"),
                     "labels": {**render.labels(run, step.name, attempt), **cluster.job_labels(spec)}},
        "spec": {
            "runPolicy": {"suspend": cluster.created_suspended(spec), "cleanPodPolicy": "Running"},
            "pytorchReplicaSpecs": {
                "Worker": {"replicas": 1, "restartPolicy": "Never",
                           "template": render.worker_template(run, spec, step.name, attempt, process)},
            },
        },
    }
    render.check_pytorchjob(job)
    return job


def build_prune_children(run: dict, spec: s.VLMPretrainRunSpec, step: stage_policy.Step, source: str, *,
                         attempt: int = 0, metrics_namespaces: tuple[str, ...] | None = None) -> list[dict]:
    """Everything the operator creates for one attempt of a pruning step, in creation order."""
    return [render.build_networkpolicy(run, metrics_namespaces), build_prune_configmap(run, spec, step),
            build_prune_job(run, spec, step, source, attempt)]
