"""Run the real operator against the HTTP emulator; play the user and the Kubeflow controller.

- `Cluster` wraps a `KubeServer` (tests/support/kube_emulator.py) with the calls a test
  makes over real HTTP: create a run, patch its spec, and, as the Kubeflow training
  operator would, write a PyTorchJob's `/status` conditions. Nothing else moves a job.
- `Cluster.operator()` starts the operator exactly as production does, `kopf run -m
  vlm_operator.handlers -A --standalone` (KopfRunner: its own thread and loop), logging in
  through a kubeconfig that points at the emulator (`$KUBECONFIG`, like kubectl).
- `wait()` polls a condition with a short interval and a deadline (the operator runs in
  another thread: there is no event to await from the test).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import yaml
from kopf.testing import KopfRunner

from tests.support.kube_emulator import KubeServer
from vlm_api import stage_policy
from tests.support.schemas import _strict, upstream_crds_dir

NS = "ns1"
RUNS = "pretrain.vlm.dev/v1alpha1/vlmpretrainruns"
JOBS = "kubeflow.org/v1/pytorchjobs"
PODMONITORS = "monitoring.coreos.com/v1/podmonitors"
OPERATOR_ARGS = ["run", "-m", "vlm_operator.handlers", "-A", "--standalone"]

# Production intervals are seconds to minutes; tests shrink them through the same variables.
FAST_ENV = {
    "VLM_OPERATOR_METRICS_PORT": "0",
    "VLM_OPERATOR_SCRAPE_INTERVAL": "0.1",
    "VLM_OPERATOR_SCRAPE_TIMEOUT": "1",
    "VLM_OPERATOR_RESYNC_INTERVAL": "2",
    "VLM_OPERATOR_RETRY_BACKOFF": "0.05",
    "VLM_OPERATOR_RETRY_BACKOFF_MAX": "0.2",
    "VLM_OPERATOR_CRD_RETRY": "0.2",
    "VLM_OPERATOR_API_RETRY": "0.2",
    "VLM_OPERATOR_DISCOVERY_TTL": "0.1",
    "VLM_PODMONITOR_LABELS": "release=kube-prometheus-stack",
}

TINY_LLM = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 272, "max_position_embeddings": 256}
TINY_VISION = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8}

SPEC: dict[str, Any] = {
    "image": "ghcr.io/acme/vlm-trainer:test",
    "model": {"llm": {"config": TINY_LLM}, "visionEncoder": {"config": TINY_VISION}, "tokenizer": {"builtin": "bytes"}},
    "data": {
        "seqLength": 128,
        "sources": [
            {"name": "text", "modality": "text", "uri": "s3://data/text/{000..003}.tar"},
            {"name": "caps", "modality": "image-text", "uri": "s3://data/caps/{000..003}.tar"},
        ],
    },
    "stages": [
        {"name": "pretrain", "steps": 100, "mixture": {"text": 0.8, "caps": 0.2}, "visualIntroduceAt": 0.5,
         "globalBatchTokens": 2048},
        {"name": "sft", "steps": 20, "mixture": {"caps": 1.0}, "globalBatchTokens": 2048,
         "trainable": {"llm": {"visualRegion": {"fraction": 0.5}}}},
    ],
    "resources": {"nodes": {"min": 1, "max": 2}, "gpusPerNode": 8},
    "checkpoint": {"uri": "s3://ckpt/runs/test/", "interval": 50, "keep": 3, "credentialsSecret": "s3-credentials"},
    "metrics": {"port": 9400, "podMonitor": True},
    "maxRetries": 2,
}


@functools.lru_cache(maxsize=None)
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    """tests.support.schemas.crd_validator, reading only the group's files with libyaml
    (the PyTorchJob CRD is 640 kB: seconds with the pure-Python loader)."""
    group, version = api_version.split("/")
    for path in sorted(upstream_crds_dir().glob(f"{group}_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if crd["spec"]["names"]["kind"] != kind:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version:
                schema = _strict(v["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}
                return jsonschema.Draft4Validator(schema)
    raise LookupError(f"no CRD for {api_version} {kind} in {upstream_crds_dir()}")


def crd_errors(obj: dict) -> list[str]:
    """Problems of a custom object against its upstream CRD (UPSTREAM_CRDS_DIR)."""
    validator = _crd_validator(obj["apiVersion"], obj["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def spec(**overrides: Any) -> dict:
    out = copy.deepcopy(SPEC)
    out.update(copy.deepcopy(overrides))
    return out


def now_iso(delta: float = 0.0) -> str:
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=delta)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def wait(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}: last {result!r}")
        time.sleep(interval)


def _path(resource: str, ns: str | None, name: str | None = None, sub: str | None = None) -> str:
    parts = resource.split("/")
    base = f"/api/{parts[0]}" if len(parts) == 2 else f"/apis/{parts[0]}/{parts[1]}"
    plural = parts[-1]
    out = base + (f"/namespaces/{ns}" if ns else "") + f"/{plural}"
    if name:
        out += f"/{name}" + (f"/{sub}" if sub else "")
    return out


class Cluster:
    """The test's view of the emulated cluster, over HTTP where a real client would be."""

    def __init__(self, kube: KubeServer, workdir: Path):
        self.kube = kube
        self.workdir = Path(workdir)
        self.kubeconfig = kube.write_kubeconfig(self.workdir / "kubeconfig")

    # ------------------------------------------------------------------ raw HTTP (the user's and Kubeflow's client)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> tuple[int, Any]:
        return self.kube.request(method, path, body, content_type)

    def create(self, resource: str, obj: dict, ns: str | None = NS) -> dict:
        code, out = self.request("POST", _path(resource, ns), obj)
        assert code in (200, 201), (code, out)
        return out

    def merge(self, resource: str, name: str, patch: dict, ns: str | None = NS, sub: str | None = None) -> dict:
        code, out = self.request("PATCH", _path(resource, ns, name, sub), patch, "application/merge-patch+json")
        assert code == 200, (code, out)
        return out

    # ------------------------------------------------------------------ the user

    def create_run(self, name: str, body_spec: dict | None = None, ns: str = NS, labels: dict | None = None) -> dict:
        obj = {"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainRun",
               "metadata": {"name": name, "namespace": ns, "labels": labels or {"team": "vision"}},
               "spec": body_spec if body_spec is not None else spec()}
        return self.create(RUNS, obj, ns)

    def patch_spec(self, name: str, patch: dict, ns: str = NS) -> dict:
        return self.merge(RUNS, name, {"spec": patch}, ns)

    # ------------------------------------------------------------------ the Kubeflow training operator

    def set_job(self, name: str, state: str, reason: str = "", message: str = "", ns: str = NS,
                since: str | None = None, confirm: bool = True) -> dict:
        """Write a PyTorchJob condition the way the Kubeflow controller does: Created stays
        True, Running/Restarting/Suspended exclude each other, a terminal state ends Running.
        A Succeeded job comes with what its trainer leaves on a cluster: a finished worker pod
        whose termination message confirms the stage's final checkpoint (`confirm=False`: none)."""
        job = self.get(JOBS, name, ns)
        assert job is not None, f"no PyTorchJob {name}"
        if state == "Succeeded" and confirm:
            self.confirm(name, ns=ns)
        when = since or now_iso()
        conds = [c for c in (job.get("status") or {}).get("conditions") or [] if c["type"] != state]
        if not any(c["type"] == "Created" for c in conds) and state != "Created":
            conds.insert(0, {"type": "Created", "status": "True", "reason": "PyTorchJobCreated",
                             "message": f"PyTorchJob {name} is created.", "lastUpdateTime": when, "lastTransitionTime": when})
        for c in conds:
            if c["type"] in ("Running", "Restarting", "Suspended") and c["status"] == "True":
                c.update(status="False", lastUpdateTime=when, lastTransitionTime=when)
        conds.append({"type": state, "status": "True", "reason": reason or f"PyTorchJob{state}",
                      "message": message or f"PyTorchJob {name} is {state.lower()}.",
                      "lastUpdateTime": when, "lastTransitionTime": when})
        status = {"conditions": conds, "replicaStatuses": {"Worker": {}}}
        if state in ("Succeeded", "Failed"):
            status["completionTime"] = when
        return self.merge(JOBS, name, {"status": status}, ns, sub="status")

    def add_pod(self, job: str, run: str, stage: str, attempt: int, index: int = 0, ip: str = "127.0.0.1",
                ns: str = NS, owned: bool = True, name: str | None = None) -> dict:
        """A worker pod as the controller creates it: the template's labels plus its own, and
        the job as its controller owner (`owned=False`: a stranger's pod with the same labels)."""
        labels = {"pretrain.vlm.dev/run": run, "pretrain.vlm.dev/stage": stage, "pretrain.vlm.dev/attempt": str(attempt),
                  "training.kubeflow.org/job-name": job, "training.kubeflow.org/replica-type": "worker",
                  "training.kubeflow.org/replica-index": str(index)}
        meta: dict = {"name": name or f"{job}-worker-{index}", "namespace": ns, "labels": labels}
        if owned:
            uid = self.get(JOBS, job, ns)["metadata"]["uid"]
            meta["ownerReferences"] = [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": job, "uid": uid,
                                        "controller": True, "blockOwnerDeletion": True}]
        pod = self.create("v1/pods", {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                                      "spec": {"containers": [{"name": "pytorch", "image": "x"}]}}, ns)
        return self.merge("v1/pods", pod["metadata"]["name"], {"status": {"phase": "Running", "podIP": ip}}, ns, sub="status")

    def confirm(self, job: str, step: int = 100, tokens: int = 409_600, ns: str = NS,
                validation_loss: dict | None = None) -> str:
        """The job's rank-0 pod exits 0 with the stage's final checkpoint as its termination
        message (what the trainer writes). Returns the confirmed URI."""
        body = self.get(JOBS, job, ns)
        labels = body["metadata"]["labels"]
        stage = labels["pretrain.vlm.dev/stage"]
        spec_body = self.get(RUNS, labels["pretrain.vlm.dev/run"], ns)["spec"]
        uri = f"{spec_body['checkpoint']['uri'].rstrip('/')}/{stage}/step-{step:09d}/"
        name = f"{job}-worker-0"
        pod_labels = {**labels, "training.kubeflow.org/job-name": job, "training.kubeflow.org/replica-type": "worker",
                      "training.kubeflow.org/replica-index": "0"}
        owner = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": job, "uid": body["metadata"]["uid"],
                 "controller": True, "blockOwnerDeletion": True}
        if self.get("v1/pods", name, ns) is None:
            self.create("v1/pods", {"apiVersion": "v1", "kind": "Pod",
                                    "metadata": {"name": name, "namespace": ns, "labels": pod_labels},
                                    "spec": {"containers": [{"name": "pytorch", "image": "x"}]}}, ns)
        self.merge("v1/pods", name, {"metadata": {"ownerReferences": [owner]}}, ns)  # the controller owns its pods
        message = stage_policy.confirmation(stage, step, uri, tokens, validation_loss)
        terminated = {"exitCode": 0, "reason": "Completed", "message": message}
        self.merge("v1/pods", name, {"status": {"phase": "Succeeded", "podIP": "127.0.0.1", "containerStatuses": [
            {"name": "pytorch", "ready": False, "restartCount": 0, "image": "x", "imageID": "", "started": False,
             "state": {"terminated": terminated}}]}}, ns, sub="status")
        return uri

    # ------------------------------------------------------------------ reading state (bypasses HTTP)

    def get(self, resource: str, name: str, ns: str | None = NS) -> dict | None:
        return self.kube.get(resource, ns, name)

    def run(self, name: str, ns: str = NS) -> dict:
        return self.get(RUNS, name, ns) or {}

    def status(self, name: str, ns: str = NS) -> dict:
        return self.run(name, ns).get("status") or {}

    def condition(self, name: str, ctype: str, ns: str = NS) -> dict:
        return next((c for c in self.status(name, ns).get("conditions") or [] if c["type"] == ctype), {})

    def job(self, name: str, ns: str = NS) -> dict | None:
        return self.get(JOBS, name, ns)

    def objects(self, resource: str) -> list[dict]:
        """Every live object of a resource, all namespaces."""
        code, out = self.request("GET", _path(resource, None))
        assert code == 200, (code, out)
        return out["items"]

    def names(self, resource: str) -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.objects(resource))

    def events(self, run: str | None = None, reason: str | None = None) -> list[dict]:
        return [e for e in self.objects("v1/events")
                if (run is None or e.get("involvedObject", {}).get("name") == run)
                and (reason is None or e.get("reason") == reason)]

    def wait_events(self, run: str, *reasons: str, timeout: float = 10.0) -> list[dict]:
        """The run's events once those reasons are all there (events follow the status write)."""
        def ready():
            evs = self.events(run)
            have = [e["reason"] for e in evs]
            return all(have.count(r) >= list(reasons).count(r) for r in set(reasons)) and evs
        return wait(ready, timeout, what=f"events {reasons} of {run}")

    def wait_phase(self, name: str, phase: str, timeout: float = 10.0) -> dict:
        return wait(lambda: self.status(name).get("phase") == phase and self.status(name), timeout,
                    what=f"{name} phase {phase} (now {self.status(name).get('phase')})")

    # ------------------------------------------------------------------ the operator

    @contextlib.contextmanager
    def operator(self, *, namespaces: list[str] | None = None, **env: str) -> Iterator[KopfRunner]:
        """The real operator in a thread: `kopf run -m vlm_operator.handlers -A --standalone`
        (`namespaces`: `--namespace NS ...` instead of `-A`, as the namespaced install runs it)."""
        values = {**FAST_ENV, **env, "KUBECONFIG": str(self.kubeconfig)}
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        args = OPERATOR_ARGS
        if namespaces:
            args = [a for a in OPERATOR_ARGS if a != "-A"] + [f"--namespace={ns}" for ns in namespaces]
        try:
            with KopfRunner(args, timeout=30) as runner:
                yield runner
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert runner.exit_code == 0, runner.output[-5000:]
        assert runner.exception is None, runner.output[-5000:]


class TrainerMetrics:
    """A real Prometheus endpoint (prometheus-client) serving what the trainer's rank 0
    exports, on 127.0.0.1 and a free port: the test's stand-in for the worker-0 pod."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        r = self.registry
        self.steps = Counter("vlmtrain_steps", "Optimizer steps.", registry=r)
        self.tokens = Counter("vlmtrain_tokens", "Tokens trained.", ["modality"], registry=r)
        self.loss = Gauge("vlmtrain_loss", "Training loss.", registry=r)
        self.image_ratio = Gauge("vlmtrain_image_token_ratio", "Measured image-token fraction.", registry=r)
        self.world = Gauge("vlmtrain_world_size", "Worker processes.", registry=r)
        self.restarts = Gauge("vlmtrain_elastic_restart_count", "TORCHELASTIC_RESTART_COUNT.", registry=r)
        self.ckpt_step = Gauge("vlmtrain_checkpoint_last_step", "Step of the last committed checkpoint.", registry=r)
        self.ckpt_time = Gauge("vlmtrain_checkpoint_last_success_timestamp_seconds", "Commit time.", registry=r)
        self.ckpt_info = Gauge("vlmtrain_checkpoint_last_info", "The last committed checkpoint.", ["uri"], registry=r)
        self.server, self.thread = start_http_server(0, addr="127.0.0.1", registry=r)
        self.port = self.server.server_port

    def train(self, steps: int, text: int, image: int, loss: float, world: int = 16, restarts: int = 0) -> None:
        self.steps.inc(steps)
        self.tokens.labels(modality="text").inc(text)
        self.tokens.labels(modality="image").inc(image)
        self.loss.set(loss)
        self.image_ratio.set(image / max(1, text + image))
        self.world.set(world)
        self.restarts.set(restarts)

    def commit(self, step: int, uri: str, when: float) -> None:
        self.ckpt_step.set(step)
        self.ckpt_time.set(when)
        self.ckpt_info.clear()
        self.ckpt_info.labels(uri=uri).set(1)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
