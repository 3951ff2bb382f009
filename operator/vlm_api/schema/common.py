"""Names, patterns, limits and helpers every part of the VLMPretrainRun schema shares."""

from __future__ import annotations

import re
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from .. import limits
from ..quantities import DURATION_PATTERN, QUANTITY_PATTERN

GROUP = "pretrain.vlm.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "VLMPretrainRun"
PLURAL = "vlmpretrainruns"
SINGULAR = "vlmpretrainrun"
SHORT_NAMES = ["vlmrun", "vpr"]

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# The run's own name (metadata.name) starts every child's name: PyTorchJob `<run>-<stage>`
# (`-r<N>` for retries), cut to 50 characters with a hash (render._fit); the Kubeflow
# controller's Services and pods `<job>-worker-<i>` (<= 62), the store `<job>-rdzv` (<= 55),
# the ConfigMap `<job>-config` (<= 57), the PodMonitor `<run>`, and the run label's value
# (<= 63). Services need DNS-1035 labels (a letter first, no dots). At most 40 characters
# keeps the whole run name readable in every child (render._fit keeps the first 43).
RUN_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_RUN_NAME = 40
RUN_NAME_RULE = (
    f"size(self.metadata.name) <= {MAX_RUN_NAME} && self.metadata.name.matches('{RUN_NAME_PATTERN}')"
)
RUN_NAME_MESSAGE = (
    f"metadata.name must be a DNS label (RFC 1035: lowercase letters, digits and '-', starting with a letter) "
    f"of at most {MAX_RUN_NAME} characters: child objects are named <name>-<stage>[-r<N>]-..."
)
# A stage name must not look like a retry (`<stage>-r<N>`: the N-th retry of stage `sft` is
# the PyTorchJob `<run>-sft-r1`, which a stage `sft-r1` would also be named) or like the
# checkpoint directory of a pruned stage (`<stage>-pruned`, vlm_trainer.prune).
RESERVED_STAGE_SUFFIX = r"-(r[0-9]+|pruned)$"
# Label keys (nodeSelector, tolerations): an optional DNS-subdomain prefix and '/', then a
# name of at most 63 characters; label values: at most 63 characters.
DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
QUALIFIED_NAME_PATTERN = rf"^({DNS_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
OPTIONAL_QUALIFIED_NAME_PATTERN = f"^$|{QUALIFIED_NAME_PATTERN}"
OPTIONAL_DNS_SUBDOMAIN_PATTERN = f"^$|^{DNS_SUBDOMAIN}$"
# An extended resource: a domain-prefixed name (nvidia.com/gpu, amd.com/gpu), never a
# native resource (cpu, memory, ephemeral-storage, hugepages-*, *.kubernetes.io/*).
EXTENDED_RESOURCE_PATTERN = rf"^{DNS_SUBDOMAIN}/[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
KUBERNETES_DOMAIN = r"^([^/]*[.])?kubernetes[.]io/"
# A Kubernetes quantity as a string: a plain decimal and an optional SI or binary suffix.
K8S_QUANTITY_PATTERN = r"^([0-9]+([.][0-9]+)?|[.][0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
# A container image reference: [registry[:port]/]path[:tag][@digest], no whitespace.
IMAGE_PATTERN = (
    r"^([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?([.][a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*(:[0-9]{1,5})?/)?"
    r"[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
    r"(:[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?(@[a-z0-9]+([+._-][a-z0-9]+)*:[a-fA-F0-9]{32,128})?$"
)
# Data, model and checkpoint locations: s3://bucket/key, file:///abs, file://./rel, /abs,
# ./rel or a relative path. No userinfo (user:secret@), no query or fragment (a presigned
# URL's X-Amz-Signature=...), no whitespace or control characters.
URI_PATTERN = (
    r"^(s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/[^?#\s]*)?|file://[.]{0,2}/[^?#\s]*|[.]{0,2}/[^?#\s]*"
    r"|[^:{}?#\s/.][^:{}?#\s]*)$"
)
# Data shards may also live on a PersistentVolumeClaim: pvc://CLAIM/path (the claim is
# mounted read-only on every trainer pod; vlm_api.cluster.PVC_ROOT).
PVC_URI_PATTERN = r"pvc://[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/[^?#\s]*"
DATA_URI_PATTERN = URI_PATTERN[:-2] + "|" + PVC_URI_PATTERN + ")$"
DNS_SUBDOMAIN_PATTERN = f"^{DNS_SUBDOMAIN}$"
# A container environment variable's name (Kubernetes' C_IDENTIFIER-like rule for env).
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# An S3-compatible endpoint: http(s)://host[:port][/path], no userinfo, query or fragment.
ENDPOINT_PATTERN = (
    r"^(https?://([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?([.][a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]{2,45}\])(:[0-9]{1,5})?(/[-a-zA-Z0-9._~%/]*)?)?$"
)
# Ports of a worker pod other than metrics.port: the c10d rendezvous (launch.DEFAULT_RDZV_PORT),
# and the external store's health port (render.STORE_HEALTH_PORT), kept apart so one
# NetworkPolicy rule per port means one thing.
RDZV_PORT = 29400
STORE_HEALTH_PORT = 8081
RESERVED_PORTS = (RDZV_PORT, STORE_HEALTH_PORT)
MAX_TOKENS = 10**15  # 1000T: far beyond any run, far below int64
MAX_STEPS = 10**12
MIN_MEMORY = 64 * 2**20  # bytes: less is a missing unit ('8' is 8 bytes), not a trainer
# What a pattern means, for error messages (a pattern failure never echoes the value).
PATTERN_HELP = {
    NAME_PATTERN: "a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit",
    QUALIFIED_NAME_PATTERN: "a label key: [prefix/]name, name at most 63 characters of letters, digits, '-', '_', '.'",
    LABEL_VALUE_PATTERN: "a label value: at most 63 letters, digits, '-', '_', '.', starting and ending alphanumeric",
    EXTENDED_RESOURCE_PATTERN: "an extended resource name with a domain, e.g. nvidia.com/gpu",
    K8S_QUANTITY_PATTERN: "a Kubernetes quantity such as '32', '500m', '512Gi'",
    IMAGE_PATTERN: "an image reference such as ghcr.io/acme/trainer:0.1.0 (no whitespace)",
    URI_PATTERN: "s3://bucket/key, file:///path, /path or ./path, without user:password@, a query (?...) or whitespace",
    DATA_URI_PATTERN: "s3://bucket/key, pvc://claim/path, file:///path, /path or ./path, without user:password@, "
                      "a query (?...) or whitespace",
    DNS_SUBDOMAIN_PATTERN: "a DNS subdomain: lowercase letters, digits, '-' and '.'",
    ENV_NAME_PATTERN: "an environment variable name: letters, digits, '_', '-', '.', not starting with a digit",
    ENDPOINT_PATTERN: "http(s)://host[:port][/path], without user:password@, a query (?...) or whitespace",
    OPTIONAL_QUALIFIED_NAME_PATTERN: "empty or a label key: [prefix/]name, name at most 63 characters of letters, "
                                     "digits, '-', '_', '.'",
    OPTIONAL_DNS_SUBDOMAIN_PATTERN: "empty or a DNS subdomain: lowercase letters, digits, '-' and '.'",
}
MULTIMODAL = ("image-text", "interleaved")
# LLM model types (transformers 5.x) whose forward lets packed samples see each other, so
# data.packing must be false for them: recurrent or hybrid state that runs across the whole
# row, or positions/biases not taken from position_ids. Measured: samples packed with
# restarted position_ids vs. alone (vlm_trainer.model.packing_isolation_error runs the same
# check on any other LLM when the trainer starts).
PACKING_UNSUPPORTED_LLMS = {
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "xlstm"),
                    "recurrent state spans the sequence"),
    **dict.fromkeys(("jamba", "bamba", "zamba", "zamba2", "falcon_h1", "nemotron_h", "granitemoehybrid", "qwen3_next"),
                    "hybrid attention/state-space layers: the state spans the sequence"),
    **dict.fromkeys(("opt", "bloom", "mpt", "xglm", "biogpt", "gpt_oss"),
                    "its attention does not isolate samples given restarted position_ids"),
}


def run_name_problem(name: Any) -> str | None:
    """Why `name` cannot be a run's metadata.name (None: it can). The CRD's root CEL rule
    (RUN_NAME_RULE) says the same to the API server."""
    if not isinstance(name, str) or not name:
        return "required: " + RUN_NAME_MESSAGE.removeprefix("metadata.name ")
    if len(name) > MAX_RUN_NAME or not re.match(RUN_NAME_PATTERN, name):
        return RUN_NAME_MESSAGE.removeprefix("metadata.name ")
    return None


Quantity = Union[int, Annotated[str, StringConstraints(max_length=32)]]
QUANTITY_CEL = [
    {
        "rule": f"type(self) == int ? self > 0 && self <= {MAX_TOKENS} : self.matches('{QUANTITY_PATTERN}')",
        "message": f"must be a positive integer (at most {MAX_TOKENS}) or a number with a K/M/B/T suffix, e.g. '4M'",
    }
]
INTERVAL_CEL = [
    {
        "rule": f"type(self) == int ? self >= 1 && self <= {MAX_STEPS} : self.matches('{DURATION_PATTERN}')",
        "message": "must be steps (integer >= 1) or a duration such as '30m' or '2h'",
    }
]


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict:
    out: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def secret_ref(reads: str) -> Any:
    """A `credentialsSecret` field: the name of a Secret holding AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY (optional AWS_SESSION_TOKEN); `reads` says what it is for."""
    return Field(None, max_length=253, pattern=NAME_PATTERN, description="Secret with AWS_ACCESS_KEY_ID / "
                 f"AWS_SECRET_ACCESS_KEY (optional AWS_SESSION_TOKEN) {reads}")


def free_form(description: str) -> dict:
    """Field arguments of a free-form mapping (model configs): the CRD keeps it as written
    (x-kubernetes-preserve-unknown-fields), bounded at the top; depth and size are capped by
    vlm_api.limits (the CRD cannot bound the depth of such a subtree)."""
    return {
        "description": f"{description} At most {limits.MAX_CONFIG_DEPTH} levels deep and "
        f"{limits.MAX_CONFIG_BYTES // 1024} KiB as JSON.",
        "json_schema_extra": {"maxProperties": limits.MAX_CONFIG_KEYS},
    }


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )

    def dump(self) -> dict:
        """The camelCase dict a user would write (defaults included)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# Lists of named items are `x-kubernetes-list-type: map` keyed by name: the API server itself
# refuses a duplicate name (in linear time; a CEL rule comparing every pair costs n^2).
def list_map(key: str = "name") -> dict:
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


IMMUTABLE = [cel("self == oldSelf", "is immutable once created; a changed recipe is a new run")]


class FieldError(ValueError):
    """A cross-field error that knows its own path (relative to spec)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
