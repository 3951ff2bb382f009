"""Prometheus metrics of the trainer (served by global rank 0) and FLOPs accounting.

One `CollectorRegistry` per process, from :func:`registry` (other modules, e.g. the
checkpoint manager, register their ``vlmtrain_checkpoint_*`` series on it). Rank 0 serves
it over HTTP with :func:`serve` at ``spec.metrics.port`` (env ``VLM_METRICS_PORT``
overrides; port 0 picks a free port, logged and written to the progress file). Other ranks
keep updating an unserved registry so code paths are the same everywhere.

On a cluster (``VLM_METRICS_EVERY_NODE=1``, set in every PyTorchJob) the first process of
each *other* node serves :func:`node_registry` on the same port: the PodMonitor selects every
Worker pod, and a pod that refuses the scrape is a down target (kube-prometheus-stack's
`TargetDown` would fire for every multi-node run). That registry holds one info series and
no training series, so nothing is counted twice; see :func:`serve_for`.

Series (fixed names are the contract with dashboards, alerts and the operator):

=========================================  ========  ===================================================
vlmtrain_steps_total                        counter   optimizer steps of this stage (starts at the resumed step)
vlmtrain_tokens_total{modality}             counter   trained tokens, modality text|image (image = image-embedding positions)
vlmtrain_samples_total{source}              counter   samples trained per source in this stage
vlmtrain_loss                               gauge     training loss of the last step (mean per label token)
vlmtrain_image_token_ratio                  gauge     measured image / all tokens over the last VLM_RATIO_WINDOW (20) steps
vlmtrain_image_token_target_ratio           gauge     image-token fraction the mixture asks for now (0 before visualIntroduceAt)
vlmtrain_stage_info{run,stage,stage_index}  gauge     1 for the stage this process trains
vlmtrain_stage_steps                        gauge     steps of the whole stage
vlmtrain_validation_loss{modality}          gauge     held-out loss per modality (text, image-text, interleaved)
vlmtrain_validation_source_loss{source}     gauge     held-out loss per source
vlmtrain_learning_rate                      gauge     learning rate of the last step
vlmtrain_grad_norm                          gauge     global gradient norm before clipping
vlmtrain_step_duration_seconds              histogram wall time per optimizer step
vlmtrain_data_wait_seconds_total            counter   time the loop waited for the data loader
vlmtrain_tokens_per_second                  gauge     real (text + image) tokens/s of the last logging window
vlmtrain_padding_fraction                   gauge     padding / positions computed, last logging window
vlmtrain_samples_per_sequence               gauge     samples per sequence (row), last logging window (1 unpacked)
vlmtrain_mfu_ratio                          gauge     model FLOPs utilisation of the last logging window
vlmtrain_world_size                         gauge     processes in the current group
vlmtrain_elastic_restart_count              gauge     TORCHELASTIC_RESTART_COUNT of this worker
vlmtrain_build_info{version,torch,...}      gauge     1
vlmtrain_node_info{rank,group_rank}         gauge     1, served by the other nodes only (no training series there)
=========================================  ========  ===================================================

MFU = achieved FLOPs / (peak FLOPs x world size). Achieved FLOPs per step:
``6 x LLM params x tokens`` (real text + image positions: padding never counts, packed or
not) plus the vision encoder on images:
``6 x vision params x patches`` when it trains, ``2 x ...`` (forward only) when frozen.
Peak FLOPs per device: ``VLM_PEAK_FLOPS`` when set, else a table of dense bf16 (or
TF32 for fp32) tensor-core peaks matched on the CUDA device name, else 1e12 for a CPU
(a nominal figure: CPU MFU is only comparable with itself).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

_REGISTRY: CollectorRegistry | None = None
_LOCK = threading.Lock()
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# dense peak FLOP/s per device: (bf16, tf32)
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # SXM; PCIe is lower: set VLM_PEAK_FLOPS
    "GH200": (989e12, 494e12),
    "B200": (2250e12, 1100e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
}
CPU_PEAK_FLOPS = 1e12


def registry() -> CollectorRegistry:
    """The process-wide registry the trainer's metrics live in (create on first use)."""
    global _REGISTRY
    with _LOCK:
        if _REGISTRY is None:
            _REGISTRY = CollectorRegistry(auto_describe=True)
        return _REGISTRY


def reset_registry() -> CollectorRegistry:
    """A fresh registry (tests; a trainer built twice in one process)."""
    global _REGISTRY
    with _LOCK:
        _REGISTRY = CollectorRegistry(auto_describe=True)
        return _REGISTRY


def trainer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlm-pretrain-operator")
    except PackageNotFoundError:
        return "0+unknown"


def peak_flops(device_name: str, bf16: bool) -> float:
    env = os.environ.get("VLM_PEAK_FLOPS")
    if env:
        return float(env)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in device_name.upper():
            return PEAK_FLOPS[key][0 if bf16 else 1]
    return CPU_PEAK_FLOPS


def step_flops(*, llm_params: int, vision_params: int, tokens: int, patches: int, vision_trains: bool) -> float:
    return 6.0 * llm_params * tokens + (6.0 if vision_trains else 2.0) * vision_params * patches


def serve(port: int, reg: CollectorRegistry | None = None) -> tuple[object, int]:
    """Start the /metrics HTTP server; returns (server, bound port)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr="0.0.0.0", registry=reg or registry())
    bound = server.server_port
    log.info("metrics on http://%s:%d/metrics", socket.gethostname(), bound)
    return server, bound


def node_registry(*, rank: int, group_rank: str) -> CollectorRegistry:
    """What a node without global rank 0 serves: a healthy scrape target, no training series."""
    reg = CollectorRegistry(auto_describe=True)
    Gauge("vlmtrain_node_info", "A node of the training group; its training series come from global rank 0 (value 1).",
          ["rank", "group_rank"], registry=reg).labels(rank=str(rank), group_rank=group_rank).set(1)
    return reg


def serve_for(*, rank: int, local_rank: int, port: int, reg: CollectorRegistry) -> tuple[object | None, int | None]:
    """The metrics endpoint of this process, if it has one: (server, bound port).

    Global rank 0 serves the trainer's registry, on a free port if `port` is taken (metrics
    must never stop training). With ``VLM_METRICS_EVERY_NODE=1`` the first process of every
    other node serves `node_registry` (on `port` only: a target elsewhere is not scraped)."""
    if rank == 0:
        try:
            return serve(port, reg)
        except OSError as exc:
            log.warning("metrics port %d unavailable (%s); serving on a free port instead", port, exc)
            return serve(0, reg)
    if local_rank == 0 and os.environ.get("VLM_METRICS_EVERY_NODE") == "1":
        try:
            return serve(port, node_registry(rank=rank, group_rank=os.environ.get("GROUP_RANK", "")))
        except OSError as exc:
            log.warning("node metrics port %d unavailable (%s); this pod is not a scrape target", port, exc)
    return None, None


class TrainerMetrics:
    """The trainer's series on one registry (see module doc)."""

    def __init__(self, reg: CollectorRegistry | None = None):
        reg = reg or registry()
        self.registry = reg
        self.steps = Counter("vlmtrain_steps", "Optimizer steps of this stage.", registry=reg)
        self.tokens = Counter("vlmtrain_tokens", "Trained tokens by modality (image = image-embedding positions).",
                              ["modality"], registry=reg)
        self.samples = Counter("vlmtrain_samples", "Samples trained per source in this stage.", ["source"], registry=reg)
        self.loss = Gauge("vlmtrain_loss", "Training loss of the last step (mean over label tokens).", registry=reg)
        self.image_ratio = Gauge("vlmtrain_image_token_ratio",
                                 "Measured fraction of image tokens over recent steps.", registry=reg)
        self.image_target = Gauge("vlmtrain_image_token_target_ratio",
                                  "Image-token fraction the stage mixture asks for at this step.", registry=reg)
        self.stage_info = Gauge("vlmtrain_stage_info", "The stage this process trains (value 1).",
                                ["run", "stage", "stage_index"], registry=reg)
        self.stage_steps = Gauge("vlmtrain_stage_steps", "Total optimizer steps of the stage.", registry=reg)
        self.val_loss = Gauge("vlmtrain_validation_loss", "Held-out loss by modality.", ["modality"], registry=reg)
        self.val_source_loss = Gauge("vlmtrain_validation_source_loss", "Held-out loss by source.", ["source"], registry=reg)
        self.lr = Gauge("vlmtrain_learning_rate", "Learning rate of the last step.", registry=reg)
        self.grad_norm = Gauge("vlmtrain_grad_norm", "Global gradient norm before clipping.", registry=reg)
        self.step_seconds = Histogram("vlmtrain_step_duration_seconds", "Wall time of one optimizer step.",
                                      buckets=STEP_BUCKETS, registry=reg)
        self.data_wait = Counter("vlmtrain_data_wait_seconds", "Seconds the training loop waited for data.", registry=reg)
        self.tokens_per_second = Gauge("vlmtrain_tokens_per_second", "Trained tokens per second (recent).", registry=reg)
        self.mfu = Gauge("vlmtrain_mfu_ratio", "Model FLOPs utilisation (recent).", registry=reg)
        self.padding_fraction = Gauge("vlmtrain_padding_fraction",
                                      "Padding / sequence positions computed over the last logging window.", registry=reg)
        self.samples_per_sequence = Gauge("vlmtrain_samples_per_sequence",
                                          "Samples per sequence (packed) over the last logging window.", registry=reg)
        self.world_size = Gauge("vlmtrain_world_size", "Processes in the training group.", registry=reg)
        self.restarts = Gauge("vlmtrain_elastic_restart_count", "TORCHELASTIC_RESTART_COUNT of this worker.", registry=reg)
        self.build_info = Gauge("vlmtrain_build_info", "Trainer build information (value 1).",
                                ["version", "torch", "transformers", "python", "device", "strategy"], registry=reg)

    def set_static(self, *, run: str, stage: str, stage_index: int, stage_steps: int, world_size: int,
                   device: str, strategy: str) -> None:
        import torch
        import transformers

        self.stage_info.labels(run=run, stage=stage, stage_index=str(stage_index)).set(1)
        self.stage_steps.set(stage_steps)
        self.world_size.set(world_size)
        self.restarts.set(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))
        self.build_info.labels(version=trainer_version(), torch=torch.__version__, transformers=transformers.__version__,
                               python=platform.python_version(), device=device, strategy=strategy).set(1)
        for modality in ("text", "image"):
            self.tokens.labels(modality=modality)  # both series exist from the start
