"""A run's stage attempts as Kubernetes objects; the rules themselves are
`vlm_api/stage_policy.py` (shared with the local runner and the trainer).

- Stages run in order, each as its own PyTorchJob `<run>-<stage>`; a failed job is
  replaced by `<run>-<stage>-r<N>` (N = attempt) with its own rendezvous store and id.
- A retry needs no special config: the trainer resumes from the newest *committed*
  checkpoint under `<checkpoint.uri>/<stage>/` (the ConfigMap is per stage, shared by all
  attempts).
- The next stage starts from the previous stage's final checkpoint as its trainer
  confirmed it (`status.finalCheckpoints`); after a stage that declares `prune`, the
  pruning step `<stage>-pruned` runs first as its own job (`vlm_api/prune_job.py`) and
  the next stage starts from the pruned checkpoint it confirmed.
"""

from __future__ import annotations

from typing import Any

from vlm_api import prune_job, render, schema as s, stage_policy


def run_ref(run: dict) -> dict[str, str]:
    meta = run.get("metadata") or {}
    return {"name": meta.get("name", ""), "namespace": meta.get("namespace") or "default", "uid": meta.get("uid") or ""}


def children(run: dict, spec: s.VLMPretrainRunSpec, step: stage_policy.Step, attempt: int, finals: dict | None,
             *, podmonitor: bool, metrics_namespaces: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """All objects of one step attempt, in creation order (generic: the renderer decides
    what a stage needs, e.g. a rendezvous store Deployment + Service)."""
    if step.prune:
        return prune_job.build_prune_children(run_ref(run), spec, step, stage_policy.step_input(spec, step, finals),
                                              attempt=attempt, metrics_namespaces=metrics_namespaces)
    return render.build_children(
        run_ref(run), spec, step.name, attempt=attempt, init_from=stage_policy.init_from(spec, step.stage, finals),
        podmonitor=bool(spec.metrics.pod_monitor and podmonitor), metrics_namespaces=metrics_namespaces,
    )


def describe_step(spec: s.VLMPretrainRunSpec, step: stage_policy.Step) -> str:
    """'stage sft (2/3)', 'step pretrain-pruned (pruning stage pretrain)' for events."""
    if step.prune:
        return f"step {step.name} (pruning stage {spec.stages[step.stage].name})"
    return f"stage {step.name} ({step.stage + 1}/{len(spec.stages)})"


def final_record(confirmed: dict, when: str) -> dict:
    """status.finalCheckpoints[stage] from the trainer's confirmation."""
    out = {"uri": confirmed["uri"], "step": confirmed["step"], "time": when, "stage": confirmed["stage"],
           "tokens": confirmed["tokens"]}
    if confirmed.get("validationLoss"):
        out["validationLoss"] = dict(confirmed["validationLoss"])
    return out
