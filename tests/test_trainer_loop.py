"""The training loop in one process: frozen parameters, the trainer's checkpointed
components through the checkpoint manager (resume = uninterrupted run; a stage's init),
metrics over HTTP, the progress file."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from vlm_trainer.metrics import reset_registry
from vlm_trainer.train import EXIT_OK


def _checkpoints(t, tmp_path, *, stage: str = "pretrain", **kw):
    """A checkpoint manager over trainer ``t``'s components (``Trainer.states``), local store."""
    from prometheus_client import CollectorRegistry

    from vlm_trainer.checkpoint import CheckpointSettings
    from vlm_trainer.checkpoint.manager import CheckpointManager

    settings = CheckpointSettings(uri=str(tmp_path / "store"), interval=1000, local_dir=str(tmp_path / "local"))
    return CheckpointManager(settings, t.states, stage=stage, registry=CollectorRegistry(), **kw)


def test_frozen_parameters_stay_bit_identical_and_have_no_optimizer_state(make_trainer):
    t = make_trainer(steps=6, mixture={"text": 0.4, "captions": 0.6},
                     trainable={"visionEncoder": False, "projector": True, "llm": {"visualRegion": {"fraction": 0.5}}})
    before = {n: p.detach().clone() for n, p in t.vlm.named_parameters()}
    frozen = {n for n, p in t.vlm.named_parameters() if not p.requires_grad}
    assert any(n.startswith("vision.") for n in frozen) and "llm.model.embed_tokens.weight" in frozen
    assert any(n.startswith("llm.model.layers.0.") for n in frozen)
    assert not any(n.startswith(("llm.model.layers.1.", "llm.model.layers.3.")) for n in frozen)
    assert t.train().exit_code == EXIT_OK
    after = dict(t.vlm.named_parameters())
    for n in frozen:
        assert torch.equal(before[n], after[n].detach()), n
    changed = [n for n in before if n not in frozen and not torch.equal(before[n], after[n].detach())]
    assert any(n.startswith("projector.") for n in changed) and any(n.startswith("llm.model.layers.3.") for n in changed)
    optimized = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    state_ids = {id(p) for p in t.optimizer.state}
    frozen_ids = {id(p) for n, p in t.vlm.named_parameters() if n in frozen}
    assert not (frozen_ids & optimized) and not (frozen_ids & state_ids)
    assert state_ids and state_ids <= optimized


def test_resume_from_a_checkpoint_continues_exactly(make_trainer, tmp_path, monkeypatch):
    """The trainer's components checkpointed after k steps and restored into a fresh trainer
    give the same next losses and weights as the uninterrupted run (one process)."""
    progress = tmp_path / "p.jsonl"
    kw = dict(steps=8, visualIntroduceAt=0.5, optimizer={"lr": 3e-3, "schedule": "cosine", "warmupSteps": 2})
    monkeypatch.setenv("VLM_PROGRESS_FILE", str(progress))
    full = make_trainer(**kw)
    assert full.train().exit_code == EXIT_OK
    full_losses = [json.loads(line)["loss"] for line in progress.read_text().splitlines() if '"step"' in line and '"event": "step"' in line]
    assert len(full_losses) == 8
    monkeypatch.delenv("VLM_PROGRESS_FILE")

    first = make_trainer(**kw)
    first.stop_at = 4
    assert first.train().completed
    small = first.states["trainer"].state_dict()
    assert small["step"] == 4 and small["data"]["counters"]
    mgr = _checkpoints(first, tmp_path)
    assert mgr.finalize(4, final=False).ok
    mgr.close()

    progress2 = tmp_path / "p2.jsonl"
    monkeypatch.setenv("VLM_PROGRESS_FILE", str(progress2))
    second = make_trainer(**kw)
    mgr = _checkpoints(second, tmp_path)
    assert mgr.restore().mode == "resume"
    mgr.close()
    assert second.progress.step == 4
    assert second.train().exit_code == EXIT_OK
    resumed = [json.loads(line)["loss"] for line in progress2.read_text().splitlines() if '"event": "step"' in line]
    assert resumed == pytest.approx(full_losses[4:], rel=1e-6)
    for (n, a), b in zip(full.vlm.named_parameters(), second.vlm.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def _scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_metrics_endpoint_and_progress_file(make_trainer, tmp_path, monkeypatch):
    progress = tmp_path / "progress.jsonl"
    monkeypatch.setenv("VLM_PROGRESS_FILE", str(progress))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    t = make_trainer(serve_metrics=True, steps=6, visualIntroduceAt=0.5, evalInterval=3)
    assert t.metrics_port and t.metrics_port > 0
    assert t.train().exit_code == EXIT_OK
    m = _scrape(t.metrics_port)
    assert m["vlmtrain_steps_total"][0][1] == 6
    tokens = {labels["modality"]: v for labels, v in m["vlmtrain_tokens_total"]}
    assert tokens["text"] > 0 and tokens["image"] > 0
    assert 0 < m["vlmtrain_loss"][0][1] < 10
    assert 0 < m["vlmtrain_image_token_ratio"][0][1] < 1
    assert m["vlmtrain_image_token_target_ratio"][0][1] > 0
    assert ({"run": "t", "stage": "pretrain", "stage_index": "0"}, 1.0) in m["vlmtrain_stage_info"]
    assert {labels["source"] for labels, _ in m["vlmtrain_samples_total"]} == {"text", "captions", "interleaved"}
    # packed (the default): as many whole samples per step as fill its token budget
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert sum(v for _, v in m["vlmtrain_samples_total"]) == sum(e["samples"] for e in steps) >= 6 * 8
    assert 0 <= m["vlmtrain_padding_fraction"][0][1] < 0.2 and m["vlmtrain_samples_per_sequence"][0][1] >= 1
    assert {labels["modality"] for labels, _ in m["vlmtrain_validation_loss"]} == {"text", "image-text", "interleaved"}
    for name in ("vlmtrain_learning_rate", "vlmtrain_grad_norm", "vlmtrain_data_wait_seconds_total",
                 "vlmtrain_mfu_ratio", "vlmtrain_tokens_per_second", "vlmtrain_stage_steps"):
        assert name in m, name
    assert m["vlmtrain_step_duration_seconds_count"][0][1] == 6
    assert m["vlmtrain_world_size"][0][1] == 1 and m["vlmtrain_elastic_restart_count"][0][1] == 2
    assert m["vlmtrain_build_info"][0][0]["strategy"] == "single"

    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 6 and kinds.count("eval") == 2
    assert events[-1]["status"] == "completed" and events[0]["metrics_port"] == t.metrics_port
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 7))
    assert steps[-1]["tokens"] == sum(e["text_tokens"] + e["image_tokens"] for e in steps)
    assert steps[0]["image_tokens"] == 0 and steps[-1]["image_tokens"] > 0  # images enter at step 3


def test_projector_only_stage_with_text_steps(make_trainer):
    """LLaVA-style alignment (only the projector trains) with a text phase: text-only steps
    must still step cleanly (the vision path is kept in the graph at zero weight)."""
    t = make_trainer(steps=4, visualIntroduceAt=0.5, mixture={"text": 0.5, "captions": 0.5},
                     trainable={"visionEncoder": False, "projector": True, "llm": "none"})
    proj = {n: p.detach().clone() for n, p in t.vlm.projector.named_parameters()}
    llm = {n: p.detach().clone() for n, p in t.vlm.llm.named_parameters()}
    assert t.train().exit_code == EXIT_OK
    assert any(not torch.equal(proj[n], p) for n, p in t.vlm.projector.named_parameters())
    assert all(torch.equal(llm[n], p) for n, p in t.vlm.llm.named_parameters())


def test_next_stage_initialises_from_previous_state(make_trainer, tmp_path):
    """mode="init": weights and data positions carry over; with continueSchedule the LR
    starts at the previous stage's last LR without warmup and the global step goes on."""
    first = make_trainer(steps=4, optimizer={"lr": 2e-3, "schedule": "constant", "warmupSteps": 2})
    assert first.train().exit_code == EXIT_OK
    mgr = _checkpoints(first, tmp_path)
    final = mgr.finalize(4)
    mgr.close()
    nxt = make_trainer(steps=4, optimizer={"lr": 1e-3, "schedule": "cosine", "warmupSteps": 3, "continueSchedule": True},
                       trainable={"visionEncoder": False, "projector": True, "llm": {"layers": [0, 2]}})
    mgr = _checkpoints(nxt, tmp_path, stage="next", init_from=final.uri)
    assert mgr.restore().mode == "init"
    mgr.close()
    for (n, a), b in zip(first.vlm.named_parameters(), nxt.vlm.parameters()):
        assert torch.equal(a, b), n
    assert nxt.progress.step == 0 and nxt.progress.global_step == 4
    assert nxt.schedule.warmup == 0 and nxt.schedule.lr(0) == pytest.approx(2e-3)
    assert nxt.planner.counters == first.planner.counters and nxt.planner.step == 0
    # the optimizer moments of parameters trained in both stages came along
    layer0 = nxt.vlm.decoder_layers()[0].self_attn.q_proj.weight
    assert nxt.optimizer.state[layer0]["exp_avg"].abs().sum() > 0
    assert nxt.train().exit_code == EXIT_OK

    fresh = make_trainer(steps=4, optimizer={"lr": 1e-3, "schedule": "cosine", "warmupSteps": 3})
    mgr = _checkpoints(fresh, tmp_path, stage="next", init_from=final.uri)
    assert mgr.restore().mode == "init"
    mgr.close()
    assert fresh.schedule.warmup == 3 and fresh.progress.global_step == 0
    assert all(float(s["exp_avg"].abs().sum()) == 0 for s in fresh.optimizer.state.values())


def test_every_node_answers_the_scrape_but_only_rank0_has_training_series(monkeypatch):
    """The PodMonitor selects every Worker pod: on a cluster (VLM_METRICS_EVERY_NODE=1) the
    first process of each other node answers with one info series, so no target is down and
    no training series is counted twice. Other local ranks serve nothing; locally (=0) only
    rank 0 serves."""
    import socket

    from vlm_trainer import metrics

    def scrape(port: int) -> dict[str, list]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            families = text_string_to_metric_families(resp.read().decode())
        return {f.name: f.samples for f in families}

    main = metrics.TrainerMetrics(reset_registry())
    main.steps.inc(3)
    monkeypatch.setenv("VLM_METRICS_EVERY_NODE", "1")
    monkeypatch.setenv("GROUP_RANK", "1")
    servers = []
    try:
        server, port = metrics.serve_for(rank=0, local_rank=0, port=0, reg=main.registry)
        servers.append(server)
        assert scrape(port)["vlmtrain_steps"][0].value == 3
        # Another node's first process: a healthy target with nothing to double count.
        server, node_port = metrics.serve_for(rank=8, local_rank=0, port=0, reg=main.registry)
        servers.append(server)
        node = scrape(node_port)
        assert list(node) == ["vlmtrain_node_info"] and node["vlmtrain_node_info"][0].labels == {"rank": "8", "group_rank": "1"}
        assert metrics.serve_for(rank=9, local_rank=1, port=0, reg=main.registry) == (None, None)
        # The port is taken: rank 0 moves to a free port (metrics never stop training), a node
        # without rank 0 gives up (a target on another port is not scraped).
        server, moved = metrics.serve_for(rank=0, local_rank=0, port=port, reg=main.registry)
        servers.append(server)
        assert moved != port and "vlmtrain_steps" in scrape(moved)
        assert metrics.serve_for(rank=8, local_rank=0, port=port, reg=main.registry) == (None, None)
        monkeypatch.setenv("VLM_METRICS_EVERY_NODE", "0")
        assert metrics.serve_for(rank=8, local_rank=0, port=0, reg=main.registry) == (None, None)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    with socket.socket() as probe:  # the servers are gone with their ports (TIME_WAIT aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()
