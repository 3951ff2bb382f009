"""Checkpoint area (issue 5): ``run(quick) -> {"figures": [...], ...}``.

Three figures with targets, each measured as the harness's method says (paired A/B,
alternating, warm-up discarded, median with min/max):

* ``async_blocking_ratio`` (<= 0.1): how long the training loop is blocked by an
  asynchronous save (``CheckpointManager.save``: state dict, staging copy, hand-off) / by a
  synchronous save of the same state (DCP write + upload + commit), pairs A B A B.
  The state is a ~25M-parameter transformer's model + AdamW state (~300 MB; quick: ~75 MB),
  the store a moto S3 server in its own process (HTTP on localhost).
* ``upload_throughput_ratio`` (>= 0.8): bytes/s of ``CheckpointStore.upload_files`` (what a
  checkpoint upload does: sha256 + multipart upload of a DCP directory) / bytes/s of plain
  boto3 ``upload_file`` of the same files to the same server, pairs A B A B.
* ``recovery_seconds`` (<= 30): real ``torchrun --nproc_per_node 2`` training the demo-sized
  tiny VLM with checkpoints to moto S3 every 2 steps; SIGKILL one worker after step 6;
  seconds from the kill to the first step the restarted group completes (the first step
  event after the first ``start`` event after the kill: ``harness.recovery_seconds``).
  Repeated runs, median/min/max and the bootstrap interval (not a ratio: there is no
  baseline to pair it with).

Everything runs on this machine; the CPU share other processes used meanwhile is reported
by the harness (figures taken while the machine is busy are flagged there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from . import harness

REPO = harness.REPO
MiB = 1024 * 1024


# --------------------------------------------------------------------------- moto in its own process


@contextlib.contextmanager
def moto_server():
    """A moto S3 server in a separate process (so it does not share this process's GIL);
    yields its endpoint URL with fake credentials set in os.environ."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(env_keys)
    code = ("import time; from moto.server import ThreadedMotoServer; "
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); s.start(); "
            "print('ready', flush=True); time.sleep(1e9)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError("moto server did not start")
        url = f"http://127.0.0.1:{port}"
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except Exception:  # noqa: BLE001 - until it answers
                time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def new_bucket(endpoint: str) -> str:
    import boto3

    name = "bench-" + uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------- async vs sync save


def _model(quick: bool):
    """A small Llama (from a config, random weights) and AdamW with its state created."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm_trainer.schedule import init_optimizer_state

    cfg = AutoConfig.for_model("llama", hidden_size=256 if quick else 512, intermediate_size=1024 if quick else 2048,
                               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                               vocab_size=16000, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    init_optimizer_state(opt)
    return model, opt


def measure_blocking(endpoint: str, tmp: Path, quick: bool) -> tuple[harness.Figure, dict]:
    import torch
    from prometheus_client import CollectorRegistry

    from vlm_trainer.checkpoint.manager import CheckpointManager, CheckpointSettings
    from vlm_trainer.checkpoint.state import ModelState, OptimizerState

    model, opt = _model(quick)
    params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    uri = f"s3://{new_bucket(endpoint)}/blocking"
    mgr = CheckpointManager(CheckpointSettings(uri=uri, endpoint=endpoint, interval=10**9, keep=1,
                                               local_dir=str(tmp / "local")),
                            {"model": ModelState(model), "optim": OptimizerState(model, opt)}, stage="bench",
                            registry=CollectorRegistry())
    step = [0]
    bg: list[float] = []

    def run_async():
        step[0] += 1
        t0 = time.perf_counter()
        mgr.save(step[0])
        blocked = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = mgr.wait()  # outside the figure: the save goes on in the background
        bg.append(time.perf_counter() - t1)
        if not out.ok:
            raise RuntimeError(out.error)
        return blocked

    def run_sync():
        step[0] += 1
        t0 = time.perf_counter()
        out = mgr.save(step[0], blocking=True)
        if not out.ok:
            raise RuntimeError(out.error)
        return time.perf_counter() - t0

    p = harness.paired(run_async, run_sync, repeats=3 if quick else 7, warmup=1)
    mgr.close()
    fig = harness.Figure.from_paired(
        "async_blocking_ratio", p, target_id="checkpoint.async_blocking",
        baseline="synchronous save of the same state (DCP write + upload + commit), same process, A B A B",
        description="training blocked by an async save / by a sync save",
        extra={"async_blocking_s": p.a_summary.median, "sync_save_s": p.b_summary.median, "params": params,
               "state_mib": round(state_bytes / MiB, 1), "background_completion_s": harness.median(bg)})
    return fig, p.as_dict()


# --------------------------------------------------------------------------- upload throughput


def measure_upload(endpoint: str, tmp: Path, quick: bool) -> tuple[harness.Figure, dict]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    from vlm_trainer.checkpoint import open_store

    src = tmp / "upload-src"
    src.mkdir()
    shard = (32 if quick else 128) * MiB
    rnd = os.urandom(MiB)
    for name, size in ((".metadata", 64 * 1024), ("__0_0.distcp", shard), ("__1_0.distcp", shard)):
        with open(src / name, "wb") as f:
            left = size
            while left > 0:
                f.write(rnd[: min(left, MiB)])
                left -= MiB
    total = sum(p.stat().st_size for p in src.iterdir())
    files = sorted(src.iterdir())
    bucket = new_bucket(endpoint)
    store = open_store(f"s3://{bucket}/ours", endpoint_url=endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    default_cfg = TransferConfig()
    n = [0]

    def drop(prefix: str) -> None:  # keep the server's memory flat (outside the timing)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})

    def ours():
        n[0] += 1
        t0 = time.perf_counter()
        store.upload_files(src, "bench", n[0])
        rate = total / (time.perf_counter() - t0)
        drop("ours/")
        return rate

    def raw():
        n[0] += 1
        t0 = time.perf_counter()
        for f in files:
            client.upload_file(str(f), bucket, f"raw/{n[0]}/{f.name}", Config=default_cfg)
        rate = total / (time.perf_counter() - t0)
        drop("raw/")
        return rate

    p = harness.paired(ours, raw, repeats=3 if quick else 7, warmup=1)
    fig = harness.Figure.from_paired(
        "upload_throughput_ratio", p, target_id="checkpoint.upload_throughput",
        baseline="boto3 upload_file (default TransferConfig) of the same files, one after another, same server",
        description="checkpoint upload bytes/s (sha256 + multipart) / boto3 upload_file bytes/s",
        extra={"ours_mib_s": p.a_summary.median / MiB, "boto3_mib_s": p.b_summary.median / MiB,
               "bytes": total, "files": len(files)})
    return fig, p.as_dict()


# --------------------------------------------------------------------------- recovery


def _tiny_trainer_config(root: Path, uri: str, endpoint: str, steps: int) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.fixtures_trainer import make_data, spec_dict, stage, trainer_config, write_config

    data = make_data(root / "data")
    spec = spec_dict(data, stages=[stage(steps=steps, microBatchSize=2)], checkpoint_uri=uri)
    spec["checkpoint"].update(interval=2, keep=2, endpoint=endpoint)
    spec["elastic"] = {"processGroupTimeout": 20}
    return write_config(trainer_config(spec), root / "config.yaml")


def measure_recovery(endpoint: str, tmp: Path, quick: bool) -> tuple[harness.Figure, dict]:
    sys.path.insert(0, str(REPO))
    from tests.fixtures_trainer import torchrun_env
    from tests.support import torchrun_util as TU

    runs = 1 if quick else 3
    kill_at = 6
    samples, details = [], []
    for i in range(runs):
        root = tmp / f"recovery-{i}"
        root.mkdir()
        uri = f"s3://{new_bucket(endpoint)}/recovery"
        config = _tiny_trainer_config(root, uri, endpoint, steps=16)
        progress = root / "progress.jsonl"
        env = torchrun_env(VLM_PROGRESS_FILE=progress, VLM_METRICS_PORT=0, VLM_NO_CHECKPOINT=0,
                           VLM_CKPT_LOCAL_DIR=root / "local", AWS_ACCESS_KEY_ID=os.environ["AWS_ACCESS_KEY_ID"],
                           AWS_SECRET_ACCESS_KEY=os.environ["AWS_SECRET_ACCESS_KEY"], AWS_DEFAULT_REGION="us-east-1")
        agent = TU.torchrun(config, nproc=2, env=env, log=root / "agent.log", cwd=REPO)
        try:
            TU.wait_for(lambda: any(e["step"] >= kill_at for e in TU.steps(progress)), 240, f"step {kill_at}", [agent])
            pids = TU.workers(agent.pid)
            t_kill = time.time()
            TU.kill([pids[1]])
            rc = agent.wait(timeout=300)
        finally:
            if agent.poll() is None:
                TU.kill_tree(agent)
        events = TU.read_progress(progress)
        restore = [e for e in events if e["event"] == "restore"]
        try:
            if rc != 0:
                raise ValueError(f"rc {rc}")
            seconds = harness.recovery_seconds(events, t_kill)  # the restarted group's first step
        except ValueError as exc:
            raise RuntimeError(f"recovery run {i} failed ({exc}): {(root / 'agent.log').read_text()[-2000:]}") from exc
        samples.append(seconds)
        details.append({"seconds": round(seconds, 2), "resumed_from": restore[-1]["step"] if restore else None,
                        "load_s": restore[-1].get("load_s") if restore else None,
                        "final_step": [e for e in events if e["event"] == "end"][-1]["step"]})
    fig = harness.Figure.from_samples(
        "recovery_seconds", samples, unit="s", target_id="checkpoint.recovery_worker_kill",
        baseline="absolute: SIGKILL of one of 2 torchrun workers -> first step of the restarted group",
        description="worker SIGKILL -> first resumed step (torchrun, 2 CPU workers, checkpoints to moto S3)",
        extra={"runs": details})
    return fig, {"runs": details}


# --------------------------------------------------------------------------- entry point


def run(quick: bool) -> dict:
    logging.getLogger("vlm_trainer").setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    figures, raw = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as d, moto_server() as endpoint:
        tmp = Path(d)
        for name, fn in (("blocking", measure_blocking), ("upload", measure_upload), ("recovery", measure_recovery)):
            try:
                fig, data = fn(endpoint, tmp, quick)
                figures.append(fig.as_dict())
                raw[name] = data
            except Exception as e:  # noqa: BLE001 - one failing figure does not hide the others
                raw[name] = {"error": f"{type(e).__name__}: {e}"}
    return {"figures": figures, "raw": raw, "quick": quick, "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":  # python -m benchmarks.checkpoint [--quick]
    print(json.dumps(run("--quick" in sys.argv), indent=1, default=str))
