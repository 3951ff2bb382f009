"""Pure renderers: a run (metadata + spec) and a stage -> the Kubernetes objects for it.

`vlmpretrain render` prints exactly these; the operator creates exactly these. No I/O,
no clock, no randomness: same input, same bytes (golden-file tested).
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from . import cluster, launch, schema as s, stage_policy

LABEL_RUN = f"{s.GROUP}/run"
LABEL_STAGE = f"{s.GROUP}/stage"
LABEL_ATTEMPT = f"{s.GROUP}/attempt"
MANAGED_BY = {"app.kubernetes.io/managed-by": "vlm-pretrain-operator"}
# libyaml's dumper: same bytes as the pure-Python one, ~5x faster (the operator renders often).
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
# Job names leave room for the controller's `-worker-<i>` Services (DNS labels, 63 chars).
MAX_JOB_NAME = 50
# Who may read the workers' metrics port besides the run's own pods (NetworkPolicy): the
# namespace Prometheus runs in, and the operator's own (it reads rank 0 for status). The
# operator passes what it was installed with (VLM_OPERATOR_METRICS_NAMESPACES, POD_NAMESPACE);
# `vlmpretrain render` shows these defaults.
DEFAULT_METRICS_NAMESPACES = ("monitoring", "vlm-system")
# The trainer's root filesystem is read-only; everything it writes goes to the scratch
# emptyDir at /tmp (caches of Hugging Face, torch.compile/Triton, matplotlib, model
# downloads, checkpoint staging) or /dev/shm.
SCRATCH = "/tmp"
SCRATCH_ENV = {
    "HOME": SCRATCH,
    "TMPDIR": SCRATCH,
    "XDG_CACHE_HOME": f"{SCRATCH}/.cache",
    "HF_HOME": f"{SCRATCH}/.cache/huggingface",
    "VLM_CACHE_DIR": f"{SCRATCH}/.cache/vlm-trainer",
    "TORCHINDUCTOR_CACHE_DIR": f"{SCRATCH}/.cache/torchinductor",
    "TRITON_CACHE_DIR": f"{SCRATCH}/.cache/triton",
    "MPLCONFIGDIR": f"{SCRATCH}/.config/matplotlib",
    "PYTHONDONTWRITEBYTECODE": "1",
}


def _fit(name: str, limit: int) -> str:
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{name[: limit - 7].rstrip('-')}-{digest}"


def job_name(run: str, stage: str, attempt: int = 0) -> str:
    """Deterministic child name: `<run>-<stage>`, `-r<N>` for the N-th retry."""
    return _fit(f"{run}-{stage}" + (f"-r{attempt}" if attempt else ""), MAX_JOB_NAME)


def config_name(run: str, stage: str) -> str:
    return _fit(f"{run}-{stage}", MAX_JOB_NAME) + "-config"


def network_policy_name(run: str) -> str:
    """The run's NetworkPolicy (one per run: it selects the pods of every stage and attempt)."""
    return _fit(f"{run}-network", 253)


def store_name(run: str, stage: str, attempt: int = 0) -> str:
    """The rendezvous store of one attempt (a retry never reuses a store its predecessor closed)."""
    return job_name(run, stage, attempt) + "-rdzv"


def labels(run: dict, stage: str, attempt: int | None = None) -> dict[str, str]:
    out = {LABEL_RUN: run["name"], LABEL_STAGE: stage, **MANAGED_BY}
    if attempt is not None:
        out[LABEL_ATTEMPT] = str(attempt)
    return out


def _meta(name: str, run: dict, stage: str, attempt: int | None = None) -> dict:
    return {"name": name, "namespace": run.get("namespace", "default"), "labels": labels(run, stage, attempt)}


def build_trainer_config(run: dict, spec: s.VLMPretrainRunSpec, stage: str, init_from: str | None = None) -> dict:
    cfg = s.TrainerConfig(
        run=s.RunRef(name=run["name"], namespace=run.get("namespace", "default"), uid=run.get("uid", "")),
        stage=stage,
        spec=spec,
        init_from=init_from,
    )
    return cfg.dump()


def build_configmap(run: dict, spec: s.VLMPretrainRunSpec, stage: str, init_from: str | None = None) -> dict:
    config = build_trainer_config(run, spec, stage, init_from)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(config_name(run["name"], stage), run, stage),
        "data": {"config.yaml": yaml.dump(config, Dumper=_DUMPER, sort_keys=False)},
    }


def rendezvous(run: dict, spec: s.VLMPretrainRunSpec, stage: str, attempt: int = 0) -> launch.Rendezvous:
    external = spec.elastic.external_store
    host = store_name(run["name"], stage, attempt) if external else f"{job_name(run['name'], stage, attempt)}-worker-0"
    return launch.Rendezvous(
        run_id=stage_policy.rdzv_id(run.get("uid") or run["name"], stage, attempt),
        endpoint=f"{host}:{launch.DEFAULT_RDZV_PORT}",
        conf=launch.rdzv_conf(spec, external_store=external),
    )


def worker_template(run: dict, spec: s.VLMPretrainRunSpec, stage: str, attempt: int, trainer: launch.Launch) -> dict:
    res = spec.resources
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if res.gpus_per_node:
        limits[res.gpu_resource_name] = res.gpus_per_node
        requests[res.gpu_resource_name] = res.gpus_per_node
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = res.memory
        limits["memory"] = res.memory
    env = [{"name": k, "value": v} for k, v in sorted(trainer.env.items()) if k not in launch.CONTROLLER_PET]
    # torchrun names a node in the rendezvous by (address, pid, n): a replaced pod has the dead
    # one's host name and its agent is PID 1 again, so it would carry the dead node's identity.
    # The pod IP is new per pod, and routable without a DNS name per pod.
    env += [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PET_LOCAL_ADDR", "value": "$(POD_IP)"}]
    if spec.checkpoint.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.checkpoint.endpoint})
    env += cluster.credential_env(spec)
    pvc_volumes, pvc_mounts, pvc_env = cluster.pvc_mounts(spec)
    env += pvc_env
    container = {
        "name": "pytorch",  # the controller finds the training container by this name
        "image": trainer.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": [trainer.command],
        "args": list(trainer.args),
        "env": env,
        "ports": [
            {"name": "metrics", "containerPort": spec.metrics.port, "protocol": "TCP"},
            {"name": "c10d", "containerPort": launch.DEFAULT_RDZV_PORT, "protocol": "TCP"},
        ],
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "volumeMounts": [
            {"name": "config", "mountPath": launch.CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "scratch", "mountPath": "/tmp"},
            *pvc_mounts,
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,  # writes go to /tmp (SCRATCH_ENV) and /dev/shm
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        # Global rank 0 confirms the stage's final checkpoint here (stage_policy.confirmation);
        # a crash leaves its log tail instead, which never parses as a confirmation.
        "terminationMessagePath": stage_policy.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_name(run["name"], stage)}},
            # NCCL and DataLoader workers need more shared memory than the 64Mi default.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "scratch", "emptyDir": {}},
            *pvc_volumes,
        ],
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        # The trainer never calls the Kubernetes API: no token in a pod that runs user code,
        # whatever serviceAccountName says (cluster.pod_fields: workload identity needs none).
        "automountServiceAccountToken": False,
        # torchrun's own SIGTERM budget for its workers (stop checkpoint), then its teardown.
        "terminationGracePeriodSeconds": spec.elastic.shutdown_timeout + SHUTDOWN_MARGIN,
    }
    pod_spec.update(cluster.pod_fields(spec))
    return {"metadata": cluster.pod_metadata(spec, labels(run, stage, attempt)),
            "spec": cluster.merge_pod_template(pod_spec, spec)}


def build_pytorchjob(run: dict, spec: s.VLMPretrainRunSpec, stage: str, attempt: int = 0) -> dict:
    name = job_name(run["name"], stage, attempt)
    rdzv = rendezvous(run, spec, stage, attempt)
    trainer = launch.describe(spec, name=name, rdzv=rdzv, env=SCRATCH_ENV)
    host, port = rdzv.endpoint.rsplit(":", 1)
    nodes = spec.resources.nodes
    elastic: dict[str, Any] = {
        "minReplicas": nodes.min,
        "maxReplicas": nodes.max,
        "rdzvBackend": "c10d",
        "rdzvId": rdzv.run_id,
        "rdzvConf": [{"key": k, "value": v} for k, v in rdzv.conf.items()],
        "maxRestarts": spec.elastic.max_restarts,
    }
    if spec.elastic.external_store:
        elastic["rdzvHost"] = host
        elastic["rdzvPort"] = int(port)
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {**_meta(name, run, stage, attempt),
                     "labels": {**labels(run, stage, attempt), **cluster.job_labels(spec)}},
        "spec": {
            "elasticPolicy": elastic,
            "nprocPerNode": str(spec.resources.procs_per_node),
            "runPolicy": {
                "suspend": cluster.created_suspended(spec),
                # No backoffLimit: ExitCode pods run with restartPolicy Never, so Kubeflow's
                # PastBackoffLimit has no in-place restarts to count, and a limit of 0 would fail
                # the job at the first replaced pod. torchrun's maxRestarts and the operator's
                # maxRetries are the bounds.
                # Once the job is done, a replica still waiting in the rendezvous holds its
                # GPUs for nothing; finished pods stay for their termination messages.
                "cleanPodPolicy": "Running",
            },
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": nodes.max,
                    # Signals and OOM kills (exit >= 128) and lost nodes replace the pod: an
                    # elastic event. torchrun exits 1 once its own restarts are spent: the job
                    # fails and the operator retries it as a new attempt (README: faults).
                    "restartPolicy": "ExitCode",
                    "template": worker_template(run, spec, stage, attempt, trainer),
                }
            },
        },
    }
    policy = cluster.scheduling_policy(spec)
    if policy:
        job["spec"]["runPolicy"]["schedulingPolicy"] = policy
    check_pytorchjob(job)
    return job


def check_pytorchjob(job: dict) -> None:
    """The rules Kubeflow's webhook enforces (the CRD itself has no enums or replica rules)."""
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    if set(replicas) - {"Master", "Worker"}:
        raise ValueError(f"replica types must be Master/Worker, got {sorted(replicas)}")
    for rtype, rspec in replicas.items():
        containers = rspec["template"]["spec"]["containers"]
        if not any(c["name"] == "pytorch" for c in containers):
            raise ValueError(f"{rtype}: no container named 'pytorch'")
        if any(not c.get("image") for c in containers):
            raise ValueError(f"{rtype}: every container needs an image")
        if rspec.get("restartPolicy") not in (None, "Always", "OnFailure", "Never", "ExitCode"):
            raise ValueError(f"{rtype}: invalid restartPolicy {rspec.get('restartPolicy')!r}")
    ep = spec.get("elasticPolicy")
    if ep:
        if "Master" in replicas:
            raise ValueError("elastic jobs run Worker replicas only")
        if ep["minReplicas"] > ep["maxReplicas"]:
            raise ValueError("elasticPolicy.minReplicas must be <= maxReplicas")
        if not ep["minReplicas"] <= replicas["Worker"]["replicas"] <= ep["maxReplicas"]:
            raise ValueError("Worker replicas must lie within elasticPolicy min..max")
        if ep.get("rdzvBackend") not in ("c10d", "etcd", "etcd-v2"):
            raise ValueError(f"invalid rdzvBackend {ep.get('rdzvBackend')!r}")
        if "nProcPerNode" in ep:
            raise ValueError("use spec.nprocPerNode, not the deprecated elasticPolicy.nProcPerNode")


def build_podmonitor(run: dict, spec: s.VLMPretrainRunSpec, extra_labels: dict[str, str] | None = None) -> dict:
    """Scrapes the run's worker pods; global rank 0 serves the training series.
    `extra_labels` carries what the cluster's Prometheus selects on (e.g. `release: ...`)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {
            "name": run["name"],
            "namespace": run.get("namespace", "default"),
            "labels": {**(extra_labels or {}), LABEL_RUN: run["name"], **MANAGED_BY},
        },
        "spec": {
            "selector": {"matchLabels": {LABEL_RUN: run["name"]}},
            "podMetricsEndpoints": [
                {
                    "port": "metrics",
                    "path": "/metrics",
                    "interval": "15s",
                    "relabelings": [
                        {"sourceLabels": ["__meta_kubernetes_pod_label_pretrain_vlm_dev_run"], "targetLabel": "vlmrun"},
                        {"sourceLabels": ["__meta_kubernetes_pod_label_pretrain_vlm_dev_stage"], "targetLabel": "stage"},
                    ],
                }
            ],
        },
    }


STORE_COMPONENT = {"app.kubernetes.io/component": "rendezvous-store"}
STORE_HEALTH_PORT = 8081
SHUTDOWN_MARGIN = 30  # seconds of pod grace beyond torchrun's shutdown timeout
STORE_KINDS = ("Deployment", "Service", "PodDisruptionBudget")  # an attempt's store objects, one name


def _store_labels(run: dict, stage: str, attempt: int) -> dict[str, str]:
    return {**labels(run, stage, attempt), **STORE_COMPONENT}


def _store_selector(run: dict, stage: str, attempt: int) -> dict[str, str]:
    return {LABEL_RUN: run["name"], LABEL_STAGE: stage, LABEL_ATTEMPT: str(attempt), **STORE_COMPONENT}


def build_store_deployment(run: dict, spec: s.VLMPretrainRunSpec, stage: str, attempt: int = 0) -> dict:
    """The attempt's c10d rendezvous store (`vlmpretrain rendezvous-store`), outside the
    workers. It runs where the workers may run (their nodeSelector and tolerations) and
    with their priority, so a preemption that spares the job spares its store too; it has
    their service account, pull secrets, scheduler and pod labels/annotations, not their
    volumes or GPUs."""
    name = store_name(run["name"], stage, attempt)
    selector = _store_selector(run, stage, attempt)
    probe = lambda path, period: {  # noqa: E731 - two probes differ only in path and period
        "httpGet": {"path": path, "port": "health"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
    }
    container = {
        "name": "store",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["vlmpretrain", "rendezvous-store"],
        "args": ["--port", str(launch.DEFAULT_RDZV_PORT), "--health-port", str(STORE_HEALTH_PORT)],
        "ports": [
            {"name": "c10d", "containerPort": launch.DEFAULT_RDZV_PORT, "protocol": "TCP"},
            {"name": "health", "containerPort": STORE_HEALTH_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": probe("/readyz", 2),
        "livenessProbe": {**probe("/healthz", 10), "failureThreshold": 3},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    pod_spec.update(cluster.pod_fields(spec))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**_meta(name, run, stage), "labels": _store_labels(run, stage, attempt)},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # never two stores for one rendezvous
            "selector": {"matchLabels": selector},
            "template": {"metadata": cluster.pod_metadata(spec, _store_labels(run, stage, attempt)), "spec": pod_spec},
        },
    }


def build_store_pdb(run: dict, spec: s.VLMPretrainRunSpec, stage: str, attempt: int = 0) -> dict:
    """A drain waits for the store (it would end the rendezvous of every node) until its
    attempt ends and the operator removes it."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {**_meta(store_name(run["name"], stage, attempt), run, stage),
                     "labels": _store_labels(run, stage, attempt)},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": _store_selector(run, stage, attempt)}},
    }


def build_store_service(run: dict, spec: s.VLMPretrainRunSpec, stage: str, attempt: int = 0) -> dict:
    """The stable address `elasticPolicy.rdzvHost` points at."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {**_meta(store_name(run["name"], stage, attempt), run, stage),
                     "labels": _store_labels(run, stage, attempt)},
        "spec": {
            "type": "ClusterIP",
            "selector": _store_selector(run, stage, attempt),
            "ports": [{"name": "c10d", "port": launch.DEFAULT_RDZV_PORT, "targetPort": "c10d", "protocol": "TCP"}],
        },
    }


def pod_selector(run: dict) -> dict[str, str]:
    """The labels every pod of the run carries (workers of every stage and attempt, and
    rendezvous stores), and no pod the operator did not render."""
    return {LABEL_RUN: run["name"], **MANAGED_BY}


def build_networkpolicy(run: dict, metrics_namespaces: tuple[str, ...] | list[str] | None = None) -> dict:
    """Ingress to the run's pods (README: trust model). Ranks exchange pickled objects over
    the c10d store and the process group, so only the run's own pods may reach them:

    - from the run's pods, all TCP: the rendezvous store (29400), the c10d/TCPStore port
      torchrun picks (MASTER_PORT) and NCCL/gloo's data connections are dynamic ports;
    - from the monitoring namespaces (Prometheus and the operator), the port named
      `metrics` only (a named port: it follows spec.metrics.port);
    - nothing else. The kubelet's probes of the store come from the node, which most CNIs
      (Calico, Cilium, the kubelet's own) never subject to NetworkPolicy.

    Egress stays open (S3, DNS)."""
    namespaces = sorted({n for n in (DEFAULT_METRICS_NAMESPACES if metrics_namespaces is None else metrics_namespaces) if n})
    ingress: list[dict] = [{"from": [{"podSelector": {"matchLabels": pod_selector(run)}}], "ports": [{"protocol": "TCP"}]}]
    if namespaces:
        ingress.append({
            "from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}]}}],
            "ports": [{"protocol": "TCP", "port": "metrics"}],
        })
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(run["name"]),
            "namespace": run.get("namespace", "default"),
            "labels": {LABEL_RUN: run["name"], **MANAGED_BY},
        },
        "spec": {"podSelector": {"matchLabels": pod_selector(run)}, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def build_children(
    run: dict,
    spec: s.VLMPretrainRunSpec,
    stage: str,
    *,
    attempt: int = 0,
    init_from: str | None = None,
    podmonitor: bool | None = None,
    podmonitor_labels: dict[str, str] | None = None,
    metrics_namespaces: tuple[str, ...] | list[str] | None = None,
) -> list[dict]:
    """Everything the operator creates for one stage, in creation order: the NetworkPolicy
    before any pod exists, the store before the job whose agents connect to it."""
    objs = [build_networkpolicy(run, metrics_namespaces), build_configmap(run, spec, stage, init_from)]
    if spec.elastic.external_store:
        objs += [build_store_deployment(run, spec, stage, attempt), build_store_service(run, spec, stage, attempt),
                 build_store_pdb(run, spec, stage, attempt)]
    objs.append(build_pytorchjob(run, spec, stage, attempt))
    if spec.metrics.pod_monitor if podmonitor is None else podmonitor:
        objs.append(build_podmonitor(run, spec, podmonitor_labels))
    return objs


def render_manifest(obj: dict, stage: str | None = None, init_from: str | None = None, attempt: int = 0) -> list[dict]:
    """`vlmpretrain render`: the children of a manifest's first (or named) stage, as the
    operator creates them (a later stage starts from `init_from`, the previous stage's
    confirmed final checkpoint)."""
    meta = obj.get("metadata") or {}
    run = {"name": meta["name"], "namespace": meta.get("namespace", "default"), "uid": meta.get("uid", "")}
    spec = s.parse_spec(obj["spec"])
    name = stage or spec.stages[0].name
    index = spec.stage_index(name)
    if index > 0 and not init_from:
        prev = spec.stages[index - 1].name
        raise ValueError(f"stage {name!r} starts from stage {prev!r}'s confirmed final checkpoint: give it as "
                         f"--init-from URI (the operator takes status.finalCheckpoints.{prev}.uri)")
    return build_children(run, spec, name, attempt=attempt, init_from=init_from if index > 0 else None)
