"""Fitting shared GPU clusters (issue 17): scheduling (Kueue, gang), the service account,
pull secrets, podTemplate merged into trainer pods, per-purpose credentials, PVC data.

Rendered objects are checked against the vendored upstream PyTorchJob CRD and the core
Kubernetes schemas; every refused conflict is checked with its field path, both by
`vlmpretrain validate` (CRD schema, CEL as the API server runs it at admission, pydantic)
and by the models alone (what the operator and trainer enforce without the CRD).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.support.schemas import core_errors, crd_errors
from vlm_api import cluster, render, schema, validate
from vlm_operator import day2

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
RUN = {"name": "llama1b-team-a", "namespace": "team-a", "uid": "u-1"}


def _kueue() -> dict:
    return yaml.safe_load((REPO / "examples" / "run-kueue.yaml").read_text())


def _children(obj: dict, **kw) -> dict[str, dict]:
    spec = schema.parse_spec(obj["spec"])
    return {o["kind"]: o for o in render.build_children(RUN, spec, spec.stages[0].name, podmonitor=True, **kw)}


def _pod(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]


def test_kueue_job_is_created_suspended_with_its_queue_label_and_gang_policy():
    objs = _children(_kueue())
    job = objs["PyTorchJob"]
    assert crd_errors(job) == []
    assert job["metadata"]["labels"][cluster.KUEUE_QUEUE_LABEL] == "team-a-gpu"
    run_policy = job["spec"]["runPolicy"]
    assert run_policy["suspend"] is True  # Kueue admits it (RunWithPodSetsInfo sets suspend false)
    assert run_policy["schedulingPolicy"] == {"minAvailable": 16, "queue": "team-a", "priorityClass": "research-high",
                                              "scheduleTimeoutSeconds": 1800}
    for obj in objs.values():
        core = obj["apiVersion"] in ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1")
        assert (core_errors(obj) if core else crd_errors(obj)) == [], obj["kind"]


def test_a_run_without_scheduling_renders_as_before():
    obj = yaml.safe_load((REPO / "examples" / "run.yaml").read_text())
    job = _children(obj)["PyTorchJob"]
    assert job["spec"]["runPolicy"] == {"suspend": False, "cleanPodPolicy": "Running"}
    assert cluster.KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]
    pod = _pod(job)["spec"]
    assert pod["priorityClassName"] == "research-high"  # the deprecated field still works
    assert not {"serviceAccountName", "imagePullSecrets", "schedulerName"} & set(pod)


def test_gang_without_kueue_is_not_suspended_and_takes_min_nodes():
    obj = yaml.safe_load((REPO / "examples" / "run.yaml").read_text())
    obj["spec"]["scheduling"] = {"gang": True, "schedulerName": "volcano"}
    job = _children(obj)["PyTorchJob"]
    assert job["spec"]["runPolicy"]["suspend"] is False
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 2, "priorityClass": "research-high"}
    assert _pod(job)["spec"]["schedulerName"] == "volcano"
    assert crd_errors(job) == []


def test_pod_template_merges_into_the_trainer_pod_by_name():
    objs = _children(_kueue())
    template = _pod(objs["PyTorchJob"])
    meta, pod = template["metadata"], template["spec"]
    assert meta["labels"]["team"] == "team-a" and meta["labels"][render.LABEL_RUN] == RUN["name"]
    assert meta["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    assert pod["serviceAccountName"] == "vlm-trainer" and pod["imagePullSecrets"] == [{"name": "acme-registry"}]
    assert pod["schedulerName"] == "volcano" and pod["priorityClassName"] == "research-high"
    assert pod["automountServiceAccountToken"] is False  # workload identity projects its own token
    assert pod["affinity"]["nodeAffinity"] and pod["topologySpreadConstraints"][0]["maxSkew"] == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert list(volumes)[:3] == ["config", "dshm", "scratch"]  # the operator's first, then the user's
    assert volumes["hf-cache"]["persistentVolumeClaim"] == {"claimName": "team-a-hf-cache"}
    assert volumes["vlm-pvc-0"]["persistentVolumeClaim"] == {"claimName": "team-a-shards", "readOnly": True}
    (main,) = pod["containers"]
    env = {e["name"]: e for e in main["env"]}
    assert env["FI_PROVIDER"]["value"] == "efa" and env["NCCL_DEBUG"]["value"] == "WARN"
    assert env[cluster.PVC_ENV]["value"] == "team-a-shards=/mnt/vlm-pvc/team-a-shards"
    assert [e["name"] for e in main["env"]].index("POD_IP") < [e["name"] for e in main["env"]].index("FI_PROVIDER")
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert mounts["/models-cache"] == {"name": "hf-cache", "mountPath": "/models-cache", "readOnly": True}
    assert mounts["/mnt/vlm-pvc/team-a-shards"]["readOnly"] is True
    assert main["resources"]["limits"] == {"nvidia.com/gpu": 8, "memory": "1800Gi", "vpc.amazonaws.com/efa": 32}
    assert main["resources"]["requests"]["vpc.amazonaws.com/efa"] == 32


def test_rendezvous_store_pod_gets_identity_placement_and_labels_not_volumes_or_gpus():
    objs = _children(_kueue())
    template = objs["Deployment"]["spec"]["template"]
    pod = template["spec"]
    assert pod["serviceAccountName"] == "vlm-trainer" and pod["imagePullSecrets"] == [{"name": "acme-registry"}]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["schedulerName"] == "volcano" and pod["priorityClassName"] == "research-high"
    assert template["metadata"]["labels"]["team"] == "team-a"
    assert template["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    (store,) = pod["containers"]
    assert "nvidia.com/gpu" not in str(store["resources"]) and "efa" not in str(store)
    # the store's selector still matches its pods whatever labels the template adds
    assert objs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_credentials_each_purpose_its_own_secret_else_the_shared_one_else_ambient(monkeypatch):
    obj = _kueue()
    spec_dict = obj["spec"]
    spec_dict["checkpoint"]["credentialsSecret"] = "ckpt-writer"
    spec_dict["data"]["credentialsSecret"] = "data-reader"
    spec_dict["model"]["llm"]["credentialsSecret"] = "models-reader"
    spec = schema.parse_spec(spec_dict)
    by_name = {s.name: s for s in spec.data.sources}
    assert cluster.data_secret(spec.data, by_name["obelics"]) == "shared-corpora-reader"
    assert cluster.data_secret(spec.data, by_name["datacomp-dr"]) == "data-reader"
    assert cluster.model_secret(spec.model.vision_encoder) is None  # default chain
    env = _pod(_children(obj)["PyTorchJob"])["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs["AWS_ACCESS_KEY_ID"] == "ckpt-writer"
    assert refs["VLM_S3_DATA_READER_AWS_SECRET_ACCESS_KEY"] == "data-reader"
    assert refs["VLM_S3_MODELS_READER_AWS_ACCESS_KEY_ID"] == "models-reader"
    assert refs["VLM_S3_SHARED_CORPORA_READER_AWS_SESSION_TOKEN"] == "shared-corpora-reader"
    assert all("value" not in e for e in env if e["name"] in refs)
    # the trainer's side: the prefixed env becomes explicit keys; no Secret -> boto3's default chain
    environ = {"VLM_S3_DATA_READER_AWS_ACCESS_KEY_ID": "id", "VLM_S3_DATA_READER_AWS_SECRET_ACCESS_KEY": "key"}
    assert cluster.secret_credentials("data-reader", environ) == {"aws_access_key_id": "id",
                                                                  "aws_secret_access_key": "key"}
    assert cluster.secret_credentials(None, environ) == {}
    with pytest.raises(ValueError, match="VLM_S3_MODELS_READER_AWS_ACCESS_KEY_ID"):
        cluster.secret_credentials("models-reader", environ)


def test_no_secret_value_reaches_rendered_objects_through_the_new_fields(monkeypatch):
    values = ["AKIAEXAMPLESECRET123", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]
    for prefix in ("", "VLM_S3_DATA_READER_", "VLM_S3_SHARED_CORPORA_READER_"):
        monkeypatch.setenv(prefix + "AWS_ACCESS_KEY_ID", values[0])
        monkeypatch.setenv(prefix + "AWS_SECRET_ACCESS_KEY", values[1])
    obj = _kueue()
    obj["spec"]["data"]["credentialsSecret"] = "data-reader"
    text = yaml.safe_dump_all(list(_children(obj).values()))
    assert not any(v in text for v in values)
    # a credential written into podTemplate instead of a Secret is refused, and never echoed
    obj["spec"]["podTemplate"]["trainer"]["env"].append({"name": "S3_KEY", "value": values[1] + " " + values[0]})
    problems = validate.validate_spec(obj["spec"])
    assert problems and problems[0].path.startswith("spec.podTemplate.trainer.env[4]")
    assert not any(v in str(p) for p in problems for v in values)


def test_pvc_uris_resolve_to_the_mount_or_the_local_directory():
    assert cluster.resolve_pvc("pvc://shards/dclm/a-{0..3}.tar", {"shards": "/mnt/vlm-pvc/shards"}) == \
        "/mnt/vlm-pvc/shards/dclm/a-{0..3}.tar"
    assert cluster.resolve_pvc("s3://bucket/x", {}) == "s3://bucket/x"
    assert cluster.parse_pvc_dirs("a=/x, b.c=/y,broken") == {"a": "/x", "b.c": "/y"}
    with pytest.raises(ValueError, match="--pvc other=DIR"):
        cluster.resolve_pvc("pvc://other/x", {"shards": "/d"})


def _with(mutate) -> dict:
    spec = copy.deepcopy(_kueue()["spec"])
    mutate(spec)
    return spec


TRAINER = lambda s: s["podTemplate"]["trainer"]  # noqa: E731
POD = lambda s: s["podTemplate"]["spec"]  # noqa: E731

# (what, mutation, path the problem names, words in it)
CONFLICTS = [
    ("PET_ env", lambda s: TRAINER(s)["env"].append({"name": "PET_RDZV_ENDPOINT", "value": "x:1"}),
     "spec.podTemplate.trainer.env", "PET_*"),
    ("trainer env", lambda s: TRAINER(s)["env"].append({"name": "HOME", "value": "/root"}),
     "spec.podTemplate.trainer.env", "HOME"),
    ("credential env", lambda s: TRAINER(s)["env"].append({"name": "AWS_ACCESS_KEY_ID", "valueFrom": {}}),
     "spec.podTemplate.trainer.env", "AWS"),
    ("trainer command", lambda s: TRAINER(s).update(command=["bash"]), "spec.podTemplate.trainer", "command"),
    ("metrics port", lambda s: TRAINER(s).update(ports=[{"containerPort": 9400}]), "spec.podTemplate.trainer", "ports"),
    ("GPU count", lambda s: TRAINER(s)["resources"]["limits"].update({"nvidia.com/gpu": 4}),
     "spec.podTemplate.trainer.resources", "gpusPerNode"),
    ("GPU request", lambda s: TRAINER(s)["resources"]["requests"].update({"nvidia.com/gpu": 4}),
     "spec.podTemplate.trainer.resources", "gpusPerNode"),
    ("memory", lambda s: TRAINER(s)["resources"]["limits"].update(memory="2Ti"),
     "spec.podTemplate.trainer.resources.limits['memory']", "resources.memory"),
    ("config volume", lambda s: POD(s)["volumes"].append({"name": "config", "emptyDir": {}}),
     "spec.podTemplate.spec.volumes", "config"),
    ("operator volume prefix", lambda s: POD(s)["volumes"].append({"name": "vlm-pvc-0", "emptyDir": {}}),
     "spec.podTemplate.spec.volumes", "vlm-"),
    ("config mount", lambda s: TRAINER(s)["volumeMounts"].append({"name": "hf-cache", "mountPath": "/etc/vlm"}),
     "spec.podTemplate.trainer.volumeMounts", "/etc/vlm"),
    ("pvc mount", lambda s: TRAINER(s)["volumeMounts"].append({"name": "hf-cache", "mountPath": "/mnt/vlm-pvc/x"}),
     "spec.podTemplate.trainer.volumeMounts", "/mnt/vlm-pvc"),
    ("trainer container", lambda s: POD(s).update(containers=[{"name": "pytorch", "image": "x"}]),
     "spec.podTemplate.spec.containers", "podTemplate.trainer"),
    ("nodeSelector", lambda s: POD(s).update(nodeSelector={"a": "b"}), "spec.podTemplate.spec", "nodeSelector"),
    ("service account", lambda s: POD(s).update(serviceAccountName="x"), "spec.podTemplate.spec", "serviceAccountName"),
    ("grace period", lambda s: POD(s).update(terminationGracePeriodSeconds=1), "spec.podTemplate.spec",
     "terminationGracePeriodSeconds"),
    ("run label", lambda s: s["podTemplate"]["metadata"]["labels"].update({"pretrain.vlm.dev/run": "other"}),
     "spec.podTemplate.metadata.labels['pretrain.vlm.dev/run']", "operator"),
    ("two priorities", lambda s: s["resources"].update(priorityClassName="other"), "spec.scheduling.priorityClassName",
     "deprecated"),
    ("timeout without gang", lambda s: s["scheduling"].update(gang=False), "spec.scheduling.scheduleTimeoutSeconds",
     "gang"),
    ("secret of a built model", lambda s: s["model"]["llm"].update(path=None, credentialsSecret="x") or
     s["model"]["llm"].pop("path") or s["model"]["llm"].update(config={"model_type": "llama"}),
     "spec.model.llm", "credentialsSecret"),
]


@pytest.mark.parametrize("what,mutate,path,words", CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_validate_refuses_operator_owned_fields_with_their_path(what, mutate, path, words):
    problems = validate.validate_spec(_with(mutate))
    assert any(p.path.startswith(path) and words in p.reason for p in problems), problems


ADMISSION = [c for c in CONFLICTS if c[0] in ("PET_ env", "trainer env", "GPU count", "GPU request", "config volume",
                                              "config mount", "trainer container", "two priorities",
                                              "timeout without gang", "secret of a built model")]


@pytest.mark.parametrize("what,mutate,path,words", ADMISSION, ids=[c[0] for c in ADMISSION])
def test_cel_refuses_them_at_admission(what, mutate, path, words):
    spec = validate.apply_defaults(_with(mutate))
    assert validate.schema_problems(spec) == []
    problems = validate.cel_problems(spec)
    assert any(p.path.startswith(path) for p in problems), problems


@pytest.mark.parametrize("what,mutate,path,words", CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_the_models_refuse_them_without_the_crd(what, mutate, path, words):
    with pytest.raises(ValueError):
        schema.parse_spec(_with(mutate))


def test_validate_warns_about_the_deprecated_priority_class():
    text = (REPO / "examples" / "run.yaml").read_text()
    (warning,) = validate.deprecations(text)
    assert warning.path == "spec.resources.priorityClassName" and "scheduling.priorityClassName" in warning.reason
    assert validate.deprecations((REPO / "examples" / "run-kueue.yaml").read_text()) == []


def test_day2_never_unsuspends_a_kueue_job():
    """Kueue's jobframework (pkg/controller/jobframework/reconciler.go, ReconcileGenericJob
    steps 7-8) unsuspends an admitted job (startJob -> RunWithPodSetsInfo) and suspends it
    again on eviction or preemption (stopJob): runPolicy.suspend is Kueue's to write."""
    spec = schema.parse_spec(_kueue()["spec"])
    desired = render.build_pytorchjob(RUN, spec, "pretrain")
    admitted = copy.deepcopy(desired)
    admitted["spec"]["runPolicy"]["suspend"] = False  # Kueue admitted it
    assert day2.job_patch(admitted, desired) is None
    assert day2.job_patch(desired, desired) is None  # queued: waits for Kueue, never resumed by us
    plain = schema.parse_spec(yaml.safe_load((REPO / "examples" / "run.yaml").read_text())["spec"])
    want = render.build_pytorchjob(RUN, plain, "pretrain")
    live = copy.deepcopy(want)
    live["spec"]["runPolicy"]["suspend"] = True
    assert day2.job_patch(live, want) == {"spec": {"runPolicy": {"suspend": False}}}  # without Kueue: as before
