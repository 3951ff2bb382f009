"""CRD generation and the pure renderers: stable output, real schemas, no secrets."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.support.schemas import core_errors, crd_errors
from vlm_api import crd, launch, render, schema, stage_policy

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
EXAMPLES = ["demo.yaml", "run.yaml", "run-kueue.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "examples" / name).read_text())


def test_crd_file_is_generated_from_the_schema():
    assert (REPO / crd.CRD_FILE).read_text() == crd.crd_yaml(), "run `vlmpretrain crd -o crds/...`"
    assert crd.crd_yaml() == crd.crd_yaml()  # deterministic


def _nodes(node, path="spec"):
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _nodes(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def test_crd_schema_is_structural_and_explained():
    version = crd.build_crd()["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    text = json.dumps(root)
    assert "$ref" not in text and '"anyOf"' not in text and '"title"' not in text
    for path, node in _nodes(root["properties"]["spec"]):
        scalar_item = path.endswith(("[]", "{}")) and node.get("type") not in ("object", None)
        assert node.get("description") or scalar_item, f"{path} has no description (kubectl explain)"
        assert node.get("type") or node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"
        ), f"{path} has no type"
        assert not isinstance(node.get("exclusiveMaximum"), (int, float)) or isinstance(node["exclusiveMaximum"], bool)
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Stage", "Step", "Loss", "Checkpoint",
                                                                    "Nodes", "Age"]
    names = crd.build_crd()["spec"]["names"]
    assert names["shortNames"] == ["vlmrun", "vpr"] and names["kind"] == "VLMPretrainRun"


def test_crd_carries_the_cross_field_and_immutability_rules():
    spec = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = json.dumps(crd.build_crd())
    for fragment in ["t >= 0.999999", "self.min <= self.max", "has(self.model.visionEncoder)", "d.name in s.mixture",
                     "metadata.name", "-(r[0-9]+|pruned)$"]:
        assert fragment in rules
    for field in ("model", "data", "stages"):
        assert {"rule": "self == oldSelf", "message": schema.IMMUTABLE[0]["message"]} in spec["properties"][field]["x-kubernetes-validations"]
    for field in ("resources", "suspend", "checkpoint"):
        assert "oldSelf" not in json.dumps(spec["properties"][field])


@pytest.mark.parametrize("name", EXAMPLES)
def test_render_matches_golden_file(name):
    rendered = yaml.safe_dump_all(render.render_manifest(_load(name)), sort_keys=False)
    golden = GOLDEN / f"render-{name}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"render changed; review and rerun with UPDATE_GOLDEN=1"


@pytest.mark.parametrize("name", EXAMPLES)
def test_rendered_objects_validate_against_real_schemas(name):
    obj = _load(name)
    spec = schema.parse_spec(obj["spec"])
    run = {"name": obj["metadata"]["name"], "namespace": "ns", "uid": "0f6c-uid"}
    for stage in spec.stages:
        for attempt in (0, 2):
            objs = render.build_children(run, spec, stage.name, attempt=attempt, podmonitor=True)
            kinds = [o["kind"] for o in objs]
            assert kinds == ["NetworkPolicy", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "PyTorchJob",
                             "PodMonitor"]
            for obj in objs:
                core = obj["apiVersion"] in ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1")
                errors = core_errors(obj) if core else crd_errors(obj)
                assert errors == [], (obj["kind"], errors)


def test_schema_validation_catches_a_broken_pytorchjob():
    job = render.build_pytorchjob({"name": "r", "uid": "u"}, schema.parse_spec(_load("demo.yaml")["spec"]), "pretrain")
    job["spec"]["elasticPolicy"]["rdzvConf"] = "a=b"
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicaz"] = 1
    errors = crd_errors(job)
    assert any("rdzvConf" in e for e in errors) and any("replicaz" in e for e in errors)


def test_pytorchjob_follows_the_webhook_rules_and_the_rendezvous_contract():
    spec = schema.parse_spec(_load("run.yaml")["spec"])
    job = render.build_pytorchjob({"name": "llama", "namespace": "x", "uid": "uid-123"}, spec, "pretrain")
    ep, worker = job["spec"]["elasticPolicy"], job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    assert (ep["minReplicas"], ep["maxReplicas"], worker["replicas"]) == (2, 8, 8)
    assert ep["rdzvId"] == stage_policy.rdzv_id("uid-123", "pretrain", 0) and ep["rdzvBackend"] == "c10d"
    assert job["spec"]["nprocPerNode"] == "8" and "nProcPerNode" not in ep
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert container["command"] + container["args"] == ["torchrun", "-m", "vlm_trainer", "--config", launch.CONFIG_PATH]
    # The controller owns PET_* rendezvous variables; the container must not pin them.
    assert not [e for e in container["env"] if e["name"] in launch.CONTROLLER_PET]


@pytest.mark.parametrize(
    "broken,words",
    [
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Master=j["spec"]["pytorchReplicaSpecs"]["Worker"]), "Worker replicas only"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].update(name="main"), "pytorch"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=99), "within elasticPolicy"),
        (lambda j: j["spec"]["elasticPolicy"].update(rdzvBackend="zk"), "rdzvBackend"),
        (lambda j: j["spec"]["elasticPolicy"].update(nProcPerNode=8), "deprecated"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief={}), "Master/Worker"),
    ],
)
def test_webhook_rules_reject_what_the_crd_cannot(broken, words):
    job = render.build_pytorchjob({"name": "r", "uid": "u"}, schema.parse_spec(_load("run.yaml")["spec"]), "pretrain")
    broken(job)
    with pytest.raises(ValueError, match=words):
        render.check_pytorchjob(job)


def test_no_secret_value_can_reach_rendered_output(monkeypatch):
    secret_values = ["AKIAEXAMPLESECRET123", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", secret_values[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_values[1])
    obj = _load("run.yaml")
    objs = render.render_manifest(obj)
    text = yaml.safe_dump_all(objs)
    assert not any(v in text for v in secret_values)
    job = next(o for o in objs if o["kind"] == "PyTorchJob")
    env = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["env"]
    creds = [e for e in env if e["name"].startswith("AWS_") and e["name"] != "AWS_ENDPOINT_URL"]
    assert creds and all("value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials" for e in creds)
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert "AWS_" not in cm["data"]["config.yaml"].replace("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY", "")


def test_long_names_stay_valid_dns_labels_and_deterministic():
    long_run, long_stage = "r" * 63, "s" * 40
    names = {render.job_name(long_run, long_stage, a) for a in range(3)}
    assert len(names) == 3 and all(len(n) <= render.MAX_JOB_NAME for n in names)
    assert render.job_name(long_run, long_stage, 1) == render.job_name(long_run, long_stage, 1)
    assert len(render.config_name(long_run, long_stage)) <= 63


def test_trainer_config_round_trips_through_the_schema():
    obj = _load("demo.yaml")
    spec = schema.parse_spec(obj["spec"])
    cm = render.build_configmap({"name": "demo", "uid": "u"}, spec, "sft", init_from="file:///ckpt/pretrain/step-000000240")
    cfg = schema.TrainerConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert cfg.stage == "sft" and cfg.stage_spec.name == "sft"
    assert cfg.init_from.endswith("step-000000240")
    assert cfg.spec == spec


def test_launch_description_is_shared_by_both_runners():
    spec = schema.parse_spec(_load("run.yaml")["spec"])
    rdzv = render.rendezvous({"name": "x", "uid": "u"}, spec, "pretrain")
    trainer = launch.describe(spec, name="x-pretrain", rdzv=rdzv, env=render.SCRATCH_ENV)
    assert trainer.command == "torchrun" and trainer.env["PET_NNODES"] == "2:8"
    assert (trainer.min_nodes, trainer.max_nodes) == (2, 8)
    assert trainer.env["PET_RDZV_CONF"] == "last_call_timeout=3,keep_alive_interval=5,keep_alive_max_attempt=3,is_host=false"
    job = render.build_pytorchjob({"name": "x", "uid": "u"}, spec, "pretrain")
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"] + container["args"] == [trainer.command, *trainer.args]
    assert container["image"] == trainer.image
    # the controller sets the PET_* it owns from elasticPolicy; every other variable is passed as it is
    plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert {k: v for k, v in trainer.env.items() if k not in launch.CONTROLLER_PET}.items() <= plain.items()


def test_external_rendezvous_store_objects():
    obj = _load("run.yaml")
    obj["spec"]["elastic"] = {"externalStore": True, "lastCallTimeout": 5}
    spec = schema.parse_spec(obj["spec"])
    obj["spec"]["resources"].update(nodeSelector={"pool": "gpu"}, priorityClassName="research-high",
                                    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    spec = schema.parse_spec(obj["spec"])
    objs = render.build_children({"name": "llama", "namespace": "ns", "uid": "u"}, spec, "sft", attempt=1)
    assert [o["kind"] for o in objs] == ["NetworkPolicy", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                                         "PyTorchJob", "PodMonitor"]
    deploy, svc, pdb, job = objs[2], objs[3], objs[4], objs[5]
    for o in (deploy, svc, pdb):
        assert core_errors(o) == []
    assert crd_errors(job) == []
    # The Service selects exactly the store's pods, and the job's agents meet there without hosting.
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    ep = job["spec"]["elasticPolicy"]
    assert (ep["rdzvHost"], ep["rdzvPort"]) == (svc["metadata"]["name"], svc["spec"]["ports"][0]["port"])
    assert {"key": "is_host", "value": "false"} in ep["rdzvConf"]
    assert {"key": "last_call_timeout", "value": "5"} in ep["rdzvConf"]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["vlmpretrain", "rendezvous-store"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["runAsNonRoot"] and "limits" in container["resources"]
    assert deploy["spec"]["strategy"]["type"] == "Recreate" and deploy["spec"]["replicas"] == 1
    # Every attempt has its own store and rendezvous id: a retry never meets a closed rendezvous.
    assert deploy["metadata"]["name"] == svc["metadata"]["name"] == pdb["metadata"]["name"] == render.store_name("llama", "sft", 1)
    assert render.store_name("llama", "sft", 1) != render.store_name("llama", "sft", 0)
    assert ep["rdzvId"] == stage_policy.rdzv_id("u", "sft", 1)
    # A drain or preemption does not take the store before its workers: PDB, their priority and placement.
    assert pdb["spec"]["maxUnavailable"] == 0 and pdb["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    pod = deploy["spec"]["template"]["spec"]
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        assert pod[key] == worker[key], key
    assert "nvidia.com/gpu" not in str(container["resources"])


def test_worker_failures_are_elastic_events_and_stop_grace_covers_torchrun_s():
    """Kubeflow v1.9 rules (tests/support/kubeflow_controller.py): ExitCode replicas run pods with
    restartPolicy Never, recreate a pod whose exit code is >= 128 (signal, OOM kill, lost node) and
    fail the job on 1-127 (torchrun's own restarts spent); PastBackoffLimit counts only in-place
    container restarts, which such pods never have."""
    spec = schema.parse_spec(_load("run.yaml")["spec"])
    job = render.build_pytorchjob({"name": "llama", "uid": "u"}, spec, "pretrain")
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode"
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    assert "backoffLimit" not in job["spec"]["runPolicy"]  # 0 would fail the job at the first replaced pod
    pod = worker["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    shutdown = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert shutdown == spec.elastic.shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] >= shutdown + 10
    assert container["terminationMessagePath"] == stage_policy.TERMINATION_LOG
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_render_of_a_later_stage_needs_its_start():
    obj = _load("run.yaml")
    with pytest.raises(ValueError, match="--init-from"):
        render.render_manifest(obj, "sft")
    objs = render.render_manifest(obj, "sft", init_from="s3://ckpt/runs/llama1b-intro80/pretrain/step-000020000/", attempt=2)
    cfg = yaml.safe_load(next(o for o in objs if o["kind"] == "ConfigMap")["data"]["config.yaml"])
    assert cfg["initFrom"].endswith("step-000020000/")
    assert next(o for o in objs if o["kind"] == "PyTorchJob")["metadata"]["name"].endswith("-sft-r2")


# --------------------------------------------------------------------------- network and pod security


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions In/NotIn/Exists/DoesNotExist) on labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok:
            return False
    return True


def _pod_templates(objs: list[dict]) -> list[dict]:
    out = []
    for o in objs:
        if o["kind"] == "Deployment":
            out.append(o["spec"]["template"])
        elif o["kind"] == "PyTorchJob":
            out += [r["template"] for r in o["spec"]["pytorchReplicaSpecs"].values()]
    return out


def _worker_pod_labels(template: dict, job: str, index: int) -> dict:
    """What the Kubeflow controller adds to the template's labels on each worker pod."""
    return {**template["metadata"]["labels"], "training.kubeflow.org/job-name": job,
            "training.kubeflow.org/replica-type": "worker", "training.kubeflow.org/replica-index": str(index),
            "training.kubeflow.org/operator-name": "pytorchjob-controller"}


def test_networkpolicy_isolates_exactly_the_runs_pods():
    obj = _load("run.yaml")
    obj["spec"]["elastic"] = {"externalStore": True}
    spec = schema.parse_spec(obj["spec"])
    run = {"name": "llama", "namespace": "team-a", "uid": "u"}
    children = {(stage.name, a): render.build_children(run, spec, stage.name, attempt=a, metrics_namespaces=("prom", "ops"))
                for stage in spec.stages for a in (0, 1)}
    policies = [o for objs in children.values() for o in objs if o["kind"] == "NetworkPolicy"]
    assert all(p == policies[0] for p in policies), "one policy per run, the same from every stage and attempt"
    np_ = policies[0]
    assert core_errors(np_) == []
    assert np_["metadata"]["namespace"] == "team-a" and np_["spec"]["policyTypes"] == ["Ingress"]
    selector = np_["spec"]["podSelector"]
    peers, monitoring = np_["spec"]["ingress"]

    # Selects every pod the run has: workers of every stage/attempt (with the controller's
    # labels) and the rendezvous stores...
    ours = []
    for stage_objs in children.values():
        for o in stage_objs:
            if o["kind"] == "PyTorchJob":
                ours += [_worker_pod_labels(t, o["metadata"]["name"], i) for t in _pod_templates([o]) for i in (0, 7)]
            elif o["kind"] == "Deployment":
                ours.append(o["spec"]["template"]["metadata"]["labels"])
    assert len(ours) >= 8
    for labels in ours:
        assert _selects(selector, labels), labels
        assert _selects(peers["from"][0]["podSelector"], labels), labels
    # ...and no other: another run (a prefix of this one's name, or this one's as prefix), a
    # user pod with only the run label, the operator.
    other = render.build_children({"name": "llama-2", "namespace": "team-a", "uid": "v"}, spec, "pretrain")
    strangers = [t["metadata"]["labels"] for t in _pod_templates(other)]
    strangers += [{"pretrain.vlm.dev/run": "llama"}, {"pretrain.vlm.dev/run": "llam", **render.MANAGED_BY},
                  {"app.kubernetes.io/name": "vlm-pretrain-operator", "app.kubernetes.io/component": "operator"}]
    for labels in strangers:
        assert not _selects(selector, labels), labels
        assert not _selects(peers["from"][0]["podSelector"], labels), labels
    # Peers: the run's own pods only (no namespaceSelector: this namespace only), every TCP port
    # (the store, torchrun's MASTER_PORT and NCCL/gloo connections are dynamic).
    assert peers == {"from": [{"podSelector": {"matchLabels": selector["matchLabels"]}}], "ports": [{"protocol": "TCP"}]}
    # Monitoring: the configured namespaces, the port named `metrics` only (whatever its number).
    ((expr,),) = [[e for e in f["namespaceSelector"]["matchExpressions"]] for f in monitoring["from"]]
    assert expr == {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["ops", "prom"]}
    assert set(monitoring["from"][0]) == {"namespaceSelector"}
    assert monitoring["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    for template in _pod_templates(children[("pretrain", 0)]):
        for c in template["spec"]["containers"]:
            named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if "metrics" in named:
                assert named["metrics"] == spec.metrics.port
                assert named["c10d"] == launch.DEFAULT_RDZV_PORT


def test_networkpolicy_defaults_and_without_monitoring_namespaces():
    spec = schema.parse_spec(_load("demo.yaml")["spec"])
    default = render.build_networkpolicy({"name": "demo"})
    assert default["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == \
        sorted(render.DEFAULT_METRICS_NAMESPACES)
    closed = render.build_networkpolicy({"name": "demo"}, ())
    assert len(closed["spec"]["ingress"]) == 1 and core_errors(closed) == []
    deduped = render.build_networkpolicy({"name": "demo"}, ("", "prom", "prom"))["spec"]["ingress"][1]
    assert deduped["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["prom"]
    assert render.build_children({"name": "demo"}, spec, "pretrain")[0] == default


def test_pods_mount_no_token_and_the_trainer_writes_only_to_scratch():
    obj = _load("run.yaml")
    obj["spec"]["elastic"] = {"externalStore": True}
    spec = schema.parse_spec(obj["spec"])
    objs = render.build_children({"name": "llama", "namespace": "ns", "uid": "u"}, spec, "pretrain")
    for template in _pod_templates(objs):
        assert template["spec"]["automountServiceAccountToken"] is False
        for c in template["spec"]["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
    job = next(o for o in objs if o["kind"] == "PyTorchJob")
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    (c,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [path for path, m in mounts.items() if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]
    assert sorted(writable) == ["/dev/shm", render.SCRATCH]
    env = {e["name"]: e.get("value") for e in c["env"]}
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME", "VLM_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[key] == render.SCRATCH or env[key].startswith(render.SCRATCH + "/"), key
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    # the termination message (rank 0's confirmation) is a file the kubelet mounts, writable on a read-only root
    assert c["terminationMessagePath"] == stage_policy.TERMINATION_LOG
