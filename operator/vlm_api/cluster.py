"""Fitting a run's pods to a shared cluster: pure pieces render.py puts together and the
trainer reads back.

- Scheduling: the Kueue queue label and suspension, the gang `schedulingPolicy`, and the
  pod fields every pod of the run carries (scheduler, priority, service account, pull secrets).
- `podTemplate`: merged into the trainer pod by name (`merge_pod_template`); the schema
  (vlm_api/schema/cluster.py) has already refused anything the operator sets itself.
- Credentials: which Secret reads what (`data_secret`, `model_secret`), and the env each
  Secret becomes (`credential_env`): checkpoint.credentialsSecret as the standard AWS_*
  variables (boto3's default chain, as before), every other Secret under its own prefix
  (`secret_env_prefix`). No Secret at all: boto3's default chain, i.e. the pod's ambient
  identity (workload identity, instance role).
- PVC data: `pvc://CLAIM/path` sources mount CLAIM read-only at PVC_ROOT/CLAIM on every
  trainer pod; the trainer maps the URI to a local path through VLM_PVC_DIRS
  (`resolve_pvc`), which `vlmpretrain local --pvc CLAIM=DIR` sets the same way.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from . import schema as s
from .schema.cluster import PVC_ROOT

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PVC_ENV = "VLM_PVC_DIRS"
AWS_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))


# ---------------------------------------------------------------------------- scheduling


def kueue_managed(spec: s.VLMPretrainRunSpec) -> bool:
    return spec.scheduling.queue_name is not None


def job_labels(spec: s.VLMPretrainRunSpec) -> dict[str, str]:
    """Labels of the PyTorchJob beyond the run's: Kueue's queue label."""
    return {KUEUE_QUEUE_LABEL: spec.scheduling.queue_name} if kueue_managed(spec) else {}


def created_suspended(spec: s.VLMPretrainRunSpec) -> bool:
    """runPolicy.suspend at creation: a Kueue-managed job waits suspended until Kueue
    admits it (Kueue's jobframework then sets it false, RunWithPodSetsInfo)."""
    return spec.suspend or kueue_managed(spec)


def scheduling_policy(spec: s.VLMPretrainRunSpec) -> dict[str, Any] | None:
    """runPolicy.schedulingPolicy (kubeflow.org/v1 PyTorchJob) for gang scheduling."""
    sched = spec.scheduling
    if not sched.gang:
        return None
    out: dict[str, Any] = {"minAvailable": spec.resources.nodes.min}
    if sched.gang_queue:
        out["queue"] = sched.gang_queue
    if spec.priority_class_name:
        out["priorityClass"] = spec.priority_class_name
    if sched.schedule_timeout_seconds is not None:
        out["scheduleTimeoutSeconds"] = sched.schedule_timeout_seconds
    return out


def pod_fields(spec: s.VLMPretrainRunSpec) -> dict[str, Any]:
    """Pod-spec fields of every pod of the run (trainer and rendezvous store). The service
    account's API token stays unmounted (render.py): workload-identity webhooks (EKS IRSA
    and Pod Identity, Azure) add their own projected, audience-bound token, and GKE's
    metadata server needs none."""
    out: dict[str, Any] = {}
    res = spec.resources
    if res.node_selector:
        out["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        out["tolerations"] = [t.model_dump(exclude_none=True) for t in res.tolerations]
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    if spec.scheduling.scheduler_name:
        out["schedulerName"] = spec.scheduling.scheduler_name
    if spec.service_account_name:
        out["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    return out


def pod_metadata(spec: s.VLMPretrainRunSpec, labels: dict[str, str]) -> dict[str, Any]:
    """A pod template's metadata: podTemplate's labels and annotations, the run's labels over them."""
    meta: dict[str, Any] = {"labels": dict(labels)}
    if spec.pod_template is not None:
        meta["labels"] = {**spec.pod_template.metadata.labels, **labels}
        if spec.pod_template.metadata.annotations:
            meta["annotations"] = dict(spec.pod_template.metadata.annotations)
    return meta


# ---------------------------------------------------------------------------- podTemplate


def _by_name(ours: list[dict], theirs: list[dict], key: str = "name") -> list[dict]:
    """Strategic merge of a list keyed by `key`: ours first, theirs appended (the schema
    refused any of theirs that names one of ours)."""
    names = {item.get(key) for item in ours}
    return [*ours, *(item for item in theirs if item.get(key) not in names)]


def merge_pod_template(pod_spec: dict, spec: s.VLMPretrainRunSpec, container: str = "pytorch") -> dict:
    """The trainer pod spec with podTemplate.spec and podTemplate.trainer merged in: lists
    by name (volumes, containers, initContainers, env) or mountPath (volumeMounts), resource
    maps by resource name, other pod-spec fields set (the operator sets none of them)."""
    if spec.pod_template is None:
        return pod_spec
    out = copy.deepcopy(pod_spec)
    extra = spec.pod_template.spec.dump()
    for key, value in extra.items():
        if key in ("volumes", "containers", "initContainers"):
            out[key] = _by_name(out.get(key, []), value)
        elif value not in ([], {}, None):
            out[key] = value
    trainer = spec.pod_template.trainer.dump()
    main = next(c for c in out["containers"] if c["name"] == container)
    main["env"] = _by_name(main.get("env", []), trainer["env"])
    if trainer["envFrom"]:
        main["envFrom"] = [*main.get("envFrom", []), *trainer["envFrom"]]
    main["volumeMounts"] = _by_name(main.get("volumeMounts", []), trainer["volumeMounts"], "mountPath")
    for part in ("limits", "requests"):
        if trainer["resources"][part]:
            resources = main.setdefault("resources", {})
            resources[part] = {**resources.get(part, {}), **trainer["resources"][part]}
    return out


# ---------------------------------------------------------------------------- credentials


def secret_env_prefix(secret: str) -> str:
    """Env prefix of a Secret's keys in the trainer: data-reader -> VLM_S3_DATA_READER_
    (Secret names here are DNS labels: '-' is their only non-alphanumeric)."""
    return "VLM_S3_" + secret.upper().replace("-", "_") + "_"


def data_secret(data: s.DataSpec, source: s.DataSource) -> str | None:
    """The Secret that reads a source: its own, else data.credentialsSecret; None: the
    default chain (checkpoint.credentialsSecret's AWS_* env, else ambient identity)."""
    return source.credentials_secret or data.credentials_secret


def model_secret(part: s.ModelPart | None) -> str | None:
    return part.credentials_secret if part is not None else None


def named_secrets(spec: s.VLMPretrainRunSpec) -> list[str]:
    """Secrets other than checkpoint.credentialsSecret the trainer reads with, sorted."""
    names = {data_secret(spec.data, src) for src in spec.data.sources}
    names |= {model_secret(spec.model.llm), model_secret(spec.model.vision_encoder)}
    return sorted(n for n in names if n)


def credential_env(spec: s.VLMPretrainRunSpec) -> list[dict]:
    """secretKeyRef env of the trainer container: values never appear in any object."""
    def refs(secret: str, prefix: str) -> list[dict]:
        return [{"name": prefix + key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}
                for key, optional in AWS_KEYS]

    out = refs(spec.checkpoint.credentials_secret, "") if spec.checkpoint.credentials_secret else []
    for secret in named_secrets(spec):
        out += refs(secret, secret_env_prefix(secret))
    return out


def secret_credentials(secret: str | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """boto3 client keyword arguments for a Secret's keys (from its prefixed env); {} for
    None: the default chain decides."""
    if not secret:
        return {}
    env = os.environ if environ is None else environ
    prefix = secret_env_prefix(secret)
    out = {key.lower(): env[prefix + key] for key, _ in AWS_KEYS if env.get(prefix + key)}
    if "aws_access_key_id" not in out or "aws_secret_access_key" not in out:
        raise ValueError(f"credentialsSecret {secret!r}: {prefix}AWS_ACCESS_KEY_ID and {prefix}AWS_SECRET_ACCESS_KEY "
                         "are not set (the Secret needs keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    return out


# ---------------------------------------------------------------------------- PVC data


def pvc_claim(uri: str | None) -> str | None:
    if not uri or not uri.startswith("pvc://"):
        return None
    return uri[len("pvc://"):].split("/", 1)[0]


def pvc_claims(spec: s.VLMPretrainRunSpec) -> list[str]:
    claims = {pvc_claim(u) for src in spec.data.sources for u in (src.uri, src.validation_uri)}
    return sorted(c for c in claims if c)


def pvc_mounts(spec: s.VLMPretrainRunSpec) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, volumeMounts, env) that put every claim the data reads at PVC_ROOT/CLAIM, read-only."""
    claims = pvc_claims(spec)
    if not claims:
        return [], [], []
    volumes = [{"name": f"vlm-pvc-{i}", "persistentVolumeClaim": {"claimName": c, "readOnly": True}}
               for i, c in enumerate(claims)]
    mounts = [{"name": f"vlm-pvc-{i}", "mountPath": f"{PVC_ROOT}/{c}", "readOnly": True} for i, c in enumerate(claims)]
    env = [{"name": PVC_ENV, "value": ",".join(f"{c}={PVC_ROOT}/{c}" for c in claims)}]
    return volumes, mounts, env


def parse_pvc_dirs(text: str | None) -> dict[str, str]:
    """VLM_PVC_DIRS ('claim=dir,claim2=dir2') as a mapping."""
    out = {}
    for item in (text or "").split(","):
        claim, sep, directory = item.partition("=")
        if sep and claim and directory:
            out[claim.strip()] = directory.strip()
    return out


def local_pvc_env(pairs: list[str] | None) -> dict[str, str]:
    """`vlmpretrain local --pvc CLAIM=DIR ...` as the worker env that maps pvc://CLAIM/ to DIR."""
    dirs = {}
    for pair in pairs or []:
        claim, sep, directory = pair.partition("=")
        if not sep or not claim or not directory or "," in pair:
            raise ValueError(f"--pvc {pair!r}: expected CLAIM=DIR")
        dirs[claim] = os.path.abspath(directory)
    return {PVC_ENV: ",".join(f"{c}={d}" for c, d in dirs.items())} if dirs else {}


def resolve_pvc(uri: str, dirs: dict[str, str] | None = None) -> str:
    """pvc://CLAIM/path as the local path it is mounted at (other URIs unchanged)."""
    claim = pvc_claim(uri)
    if claim is None:
        return uri
    dirs = parse_pvc_dirs(os.environ.get(PVC_ENV)) if dirs is None else dirs
    if claim not in dirs:
        raise ValueError(f"{uri}: claim {claim!r} is not mounted ({PVC_ENV} names {sorted(dirs) or 'none'}; "
                         f"locally: vlmpretrain local --pvc {claim}=DIR)")
    rest = uri[len("pvc://") + len(claim):].lstrip("/")
    return os.path.join(dirs[claim], rest)
