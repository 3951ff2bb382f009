"""Hostile and careless VLMPretrainRun manifests, generated (issue #21): nothing here is
committed as data, the megabyte cases are built on demand.

Each `Case` is a file's bytes and what must become of it:

- `expect` "reject": `vlmpretrain validate` prints short `FILE: path: reason` lines, one
  naming `path` (a prefix) with `words` in its reason, and exits 1; the operator marks the
  run Invalid. "accept": a documented acceptance (`note` says why it is fine).
- `crd`: whether the CRD alone (its OpenAPI schema with strict fields, and its CEL rules,
  as the API server evaluates them) refuses the object: True / False, or None where the
  file never becomes an object the API server could receive (not YAML, not a run, ...).
- `secrets`: substrings that must appear in no output (messages, Events, status).

`maximal_manifest()` is the largest valid spec the schema allows in every dimension that
costs validation time (64 sources with the largest brace ranges, 16 stages mixing all of
them, model configs at their size cap); the benchmark (benchmarks/validation.py) and the
corpus share it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((REPO / "examples" / "run.yaml").read_text())
DEMO = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())

# Credentials as AWS documents them (examples, not live keys) and token shapes.
AKIA = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HF_TOKEN = "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ012345"
SIG = "b3c2f1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2"


@dataclasses.dataclass
class Case:
    id: str
    data: bytes
    expect: str  # "reject" | "accept"
    path: str = ""
    words: str = ""
    crd: bool | None = True
    secrets: tuple[str, ...] = ()
    note: str = ""

    def doc(self) -> Any:
        """The first document as the API server would receive it (None: it never could)."""
        try:
            docs = [d for d in yaml.safe_load_all(self.data.decode("utf-8")) if d is not None]
        except Exception:  # noqa: BLE001
            return None
        return docs[0] if len(docs) == 1 else None


def dump(obj: Any) -> bytes:
    return yaml.safe_dump(obj, sort_keys=False, width=10_000).encode()


def mutate(fn: Callable[[dict], Any], base: dict = BASE) -> bytes:
    obj = copy.deepcopy(base)
    fn(obj)
    return dump(obj)


def setp(obj: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = obj
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value


def with_(path: str, value: Any, base: dict = BASE) -> bytes:
    return mutate(lambda o: setp(o, path, value), base)


def nested(depth: int, leaf: Any = 1) -> Any:
    out: Any = leaf
    for _ in range(depth):
        out = {"k": out}
    return out


def maximal_spec(shards: str = "{000000..999999}") -> dict:
    """The costliest valid spec: every list at its maximum, the largest brace ranges,
    model configs near their 64 KiB cap (see the module docstring)."""
    sources = [{"name": f"source-{i:02d}", "modality": ("text", "image-text", "interleaved")[i % 3],
                "uri": f"s3://training-data-{i % 8}/corpus/source-{i:02d}/shard-{shards}.tar",
                "validationUri": f"s3://training-data-{i % 8}/heldout/source-{i:02d}/shard-{shards}.tar"}
               for i in range(64)]
    stages = []
    for j in range(16):
        stages.append({
            "name": f"stage-{j:02d}", "tokens": "100B", "mixture": {src["name"]: 1 / 64 for src in sources},
            "visualIntroduceAt": 0.5, "globalBatchTokens": "4M",
            "trainable": {"visionEncoder": False, "projector": True,
                          "llm": {"visualRegion": {"fraction": 0.25}} if j % 2 else {"layers": list(range(0, 32, 2))}},
            "optimizer": {"lr": 3e-4, "schedule": "cosine", "warmupSteps": 100},
        })

    def config(model_type: str, extra: int) -> dict:
        cfg: dict = {"model_type": model_type, "num_hidden_layers": 32, "hidden_size": 2048, "image_size": 384,
                     "patch_size": 14}
        for i in range(extra):
            cfg[f"option_{i:04d}"] = {"value": i, "name": f"setting number {i}", "flags": [True, False, None]}
        return cfg

    return {
        "image": "ghcr.io/acme/vlm-trainer:0.1.0",
        "model": {"llm": {"config": config("llama", 480)}, "visionEncoder": {"config": config("siglip_vision_model", 480)},
                  "tokenizer": {"path": "s3://models/llama-tokenizer/"}},
        "data": {"sources": sources, "seqLength": 4096},
        "stages": stages,
        "resources": {
            "nodes": {"min": 1, "max": 4096}, "gpusPerNode": 8, "cpu": "96", "memory": "1600Gi",
            "nodeSelector": {f"example.com/label-{i:02d}": f"value-{i:02d}" for i in range(64)},
            "tolerations": [{"key": f"example.com/taint-{i:02d}", "operator": "Exists", "effect": "NoSchedule"}
                            for i in range(64)],
            "priorityClassName": "research-high",
        },
        "checkpoint": {"uri": "s3://checkpoints/runs/maximal/", "credentialsSecret": "s3-credentials",
                       "endpoint": "https://s3.us-east-1.amazonaws.com"},
        "maxRetries": 100,
    }


def maximal_manifest(name: str = "maximal-run", shards: str = "{000000..999999}") -> dict:
    return {"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainRun",
            "metadata": {"name": name, "namespace": "research"}, "spec": maximal_spec(shards)}


def _alias_bomb() -> bytes:
    text = dump(BASE).decode()
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    bomb = "\n".join("      " + line for line in lines)
    return text.replace("    llm:\n      path: s3://models/llama-1b/\n",
                        "    llm:\n      config:\n        model_type: llama\n" + bomb.replace("      ", "        ") + "\n"
                        ).encode()


def _block_nesting(depth: int) -> bytes:
    text = dump(BASE).decode()
    deep = "".join("  " * (4 + i) + f"k{i}:\n" for i in range(depth)) + "  " * (4 + depth) + "leaf: 1\n"
    return text.replace("    llm:\n      path: s3://models/llama-1b/\n",
                        "    llm:\n      config:\n        model_type: llama\n" + deep).encode()


def _stages_sft_and_sft_r1(o: dict) -> None:
    extra = copy.deepcopy(o["spec"]["stages"][1])
    extra["name"] = "sft-r1"
    o["spec"]["stages"].append(extra)


def cases() -> list[Case]:
    """The corpus (generated each time; ~1 MiB is built for the size cases)."""
    rnd = random.Random(21)
    C = Case
    out = [
        # ---------------------------------------------------------------- files and YAML
        C("empty-file", b"", "reject", "<yaml>", "no documents", None),
        C("only-comments", b"# nothing to see\n---\n# here either\n", "reject", "<yaml>", "no documents", None),
        C("binary-file", bytes(rnd.randrange(256) for _ in range(4096)) + b"\x00", "reject", "<file>", "binary", None),
        C("latin-1-file", "metadata: {name: caf\u00e9}\n".encode("latin-1"), "reject", "<file>", "not UTF-8", None),
        C("utf-16-file", dump(BASE).decode().encode("utf-16"), "reject", "<file>", "NUL", None),
        C("huge-file", b"# " + b"x" * (1 << 20) + b"\n" + dump(BASE), "reject", "<file>", "1 MiB", None),
        C("top-level-list", b"- apiVersion: pretrain.vlm.dev/v1alpha1\n- kind: VLMPretrainRun\n", "reject", "<document>",
          "not a mapping", None),
        C("top-level-scalar", b"hello\n", "reject", "<document>", "not a mapping", None),
        C("alias-bomb-in-config", _alias_bomb(), "reject", "<yaml>", "more than", None),
        C("recursive-alias", b"a: &a [1, *a]\n", "reject", "<yaml>", "recursive", None),
        C("flow-nesting-3000", dump(BASE).replace(b"path: s3://models/llama-1b/", b"config: " + b"[" * 3000 + b"]" * 3000),
          "reject", "<yaml>", "depth", None),
        C("block-nesting-700", _block_nesting(700), "reject", "<yaml>", "deeper than 64", None),
        C("json-nesting-3000", ('{"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainRun", '
                                '"metadata": {"name": "deep"}, "spec": ' + '{"k": ' * 3000 + "1" + "}" * 3001).encode(),
          "reject", "<yaml>", "deeper than 64", None),
        C("duplicate-key", dump(BASE) + b"spec:\n  image: evil/image:1\n", "reject", "<yaml>", "duplicate key", None),
        C("integer-mapping-key", dump(BASE).replace(b"dclm: 0.85", b"1: 0.85"), "reject", "<yaml>", "must be strings", None),
        C("python-object-tag", dump(BASE).replace(b"image: ghcr.io", b"image: !!python/object/apply:os.system [id] #"),
          "reject", "<yaml>", "constructor", None),
        C("binary-tag", dump(BASE).replace(b"image: ghcr.io/acme/vlm-trainer:0.1.0", b"image: !!binary aGVsbG8="),
          "reject", "<yaml>", "not supported", None),
        C("too-many-documents", b"---\n".join([dump(BASE)] * 65), "reject", "<yaml>", "at most 64", None),
        C("unclosed-flow", b"spec: [unclosed\n", "reject", "<yaml>", "not valid YAML", None),
        C("tab-indent", b"spec:\n\timage: x\n", "reject", "<yaml>", "not valid YAML", None),
        C("control-character", dump(BASE).replace(b"research-high", b"research\x07high"), "reject", "<yaml>",
          "control characters", None),
        # ---------------------------------------------------------------- object and metadata
        C("metadata-list", with_("metadata", ["name", "x"]), "reject", "metadata", "must be a mapping", True),
        C("metadata-missing", mutate(lambda o: o.pop("metadata")), "reject", "metadata.name", "required", True),
        C("name-with-dot", with_("metadata.name", "my.run"), "reject", "metadata.name", "DNS label", True),
        C("name-leading-digit", with_("metadata.name", "1run"), "reject", "metadata.name", "DNS label", True),
        C("name-41-chars", with_("metadata.name", "r" * 41), "reject", "metadata.name", "at most 40", True),
        C("name-63-chars", with_("metadata.name", "r" * 63), "reject", "metadata.name", "at most 40", True),
        C("name-uppercase", with_("metadata.name", "MyRun"), "reject", "metadata.name", "DNS label", True),
        C("name-40-chars-longest-stage", mutate(lambda o: (setp(o, "metadata.name", "r" + "x" * 39),
                                                            setp(o, "spec.stages.1.name", "s" * 40),
                                                            setp(o, "spec.maxRetries", 100))),
          "accept", crd=False, note="the longest names: every child name still fits 63 characters (render._fit)"),
        C("namespace-invalid", with_("metadata.namespace", "Bad_NS"), "reject", "metadata.namespace", "DNS label", None),
        C("wrong-api-version", with_("apiVersion", "v1"), "reject", "apiVersion", "must be", None),
        C("wrong-kind", with_("kind", "Pod"), "reject", "kind", "must be", None),
        C("spec-missing", mutate(lambda o: o.pop("spec")), "reject", "spec", "required", True),
        C("spec-list", with_("spec", [1, 2]), "reject", "spec", "must be a mapping", True),
        C("spec-empty", with_("spec", {}), "reject", "spec.", "required", True),
        C("unknown-top-level-field", with_("specs", {"image": "x"}), "reject", "specs", "unknown top-level", True),
        C("status-from-the-user", with_("status", {"phase": "Succeeded", "stage": "sft"}), "accept", crd=False,
          note="status is the operator's: the API server drops it on create (status subresource)"),
        # ---------------------------------------------------------------- numbers
        C("tokens-10e30", with_("spec.stages.0.tokens", 10**30), "reject", "spec.stages[0].tokens", "int64", True),
        C("tokens-too-many-T", with_("spec.stages.0.tokens", "999999999T"), "reject", "spec.stages[0].tokens",
          "1000T", False),
        C("tokens-negative", with_("spec.stages.0.tokens", -5), "reject", "spec.stages[0].tokens", "positive", True),
        C("tokens-boolean", with_("spec.stages.0.tokens", True), "reject", "spec.stages[0].tokens", "type", True),
        C("steps-huge", mutate(lambda o: (o["spec"]["stages"][1].pop("epochs"), setp(o, "spec.stages.1.steps", 10**13))),
          "reject", "spec.stages[1].steps", "maximum", True),
        C("mixture-nan", dump(BASE).replace(b"dclm: 0.85", b"dclm: .nan"), "reject", "spec.stages[0].mixture.dclm",
          "finite", True),
        C("lr-infinite", dump(BASE).replace(b"lr: 0.0003", b"lr: .inf"), "reject", "spec.stages[0].optimizer.lr",
          "finite", True),
        C("seq-length-string", with_("spec.data.seqLength", "2048"), "reject", "spec.data.seqLength", "integer", True),
        C("suspend-string", with_("spec.suspend", "yes please"), "reject", "spec.suspend", "boolean", True),
        # ---------------------------------------------------------------- images and resources
        C("image-empty", with_("spec.image", ""), "reject", "spec.image", "empty", True),
        C("image-whitespace", with_("spec.image", "   "), "reject", "spec.image", "image reference", True),
        C("image-newline", with_("spec.image", "repo/img:1\n--privileged"), "reject", "spec.image", "image reference", True),
        C("image-500k", with_("spec.image", "a" * 500_000), "reject", "spec.image", "longer than 512", True),
        C("cpu-lots", with_("spec.resources.cpu", "lots"), "reject", "spec.resources.cpu", "quantity", True),
        C("cpu-negative", with_("spec.resources.cpu", "-1"), "reject", "spec.resources.cpu", "quantity", True),
        C("memory-8-bytes", with_("spec.resources.memory", "8"), "reject", "spec.resources.memory", "64Mi", False),
        C("gpu-resource-memory", with_("spec.resources.gpuResourceName", "memory"), "reject",
          "spec.resources.gpuResourceName", "extended resource", True),
        C("gpu-resource-cpu", with_("spec.resources.gpuResourceName", "cpu"), "reject", "spec.resources.gpuResourceName",
          "extended resource", True),
        C("gpu-resource-hugepages", with_("spec.resources.gpuResourceName", "hugepages-2Mi"), "reject",
          "spec.resources.gpuResourceName", "extended resource", True),
        C("gpu-resource-kubernetes-io", with_("spec.resources.gpuResourceName", "requests.kubernetes.io/gpu"), "reject",
          "spec.resources.gpuResourceName", "kubernetes.io", True),
        # the CRD checks a key's length only (a regex on map keys exceeds the API server's CEL cost budget)
        C("node-selector-bad-key", with_("spec.resources.nodeSelector", {"bad key!": "x"}), "reject",
          "spec.resources.nodeSelector", "label key", False),
        C("node-selector-long-name", with_("spec.resources.nodeSelector", {"example.com/" + "n" * 64: "x"}), "reject",
          "spec.resources.nodeSelector", "label key", False),
        C("node-selector-key-400", with_("spec.resources.nodeSelector", {"k" * 400: "x"}), "reject",
          "spec.resources.nodeSelector", "at most 317", True),
        C("node-selector-long-value", with_("spec.resources.nodeSelector", {"pool": "v" * 64}), "reject",
          "spec.resources.nodeSelector.pool", "longer than 63", True),
        C("toleration-bad-key", with_("spec.resources.tolerations.0.key", "not a key"), "reject",
          "spec.resources.tolerations[0].key", "label key", True),
        C("toleration-exists-with-value", with_("spec.resources.tolerations.0.value", "x"), "reject",
          "spec.resources.tolerations[0]", "no value", True),
        C("toleration-empty-key-equal", with_("spec.resources.tolerations", [{"operator": "Equal", "value": "x"}]),
          "reject", "spec.resources.tolerations[0]", "empty key", True),
        C("toleration-seconds-noschedule", with_("spec.resources.tolerations.0.tolerationSeconds", 30), "reject",
          "spec.resources.tolerations[0]", "NoExecute", True),
        C("priority-class-invalid", with_("spec.resources.priorityClassName", "Bad_Class"), "reject",
          "spec.resources.priorityClassName", "DNS subdomain", True),
        C("tolerations-10000", with_("spec.resources.tolerations", [{"operator": "Exists"} for _ in range(10_000)]), "reject",
          "spec.resources.tolerations", "more than 64", True),
        # ---------------------------------------------------------------- ports and names of children
        C("metrics-port-rendezvous", with_("spec.metrics.port", 29400), "reject", "spec.metrics.port", "29400", True),
        C("metrics-port-store-health", with_("spec.metrics.port", 8081), "reject", "spec.metrics.port", "8081", True),
        C("stages-sft-and-sft-r1", mutate(_stages_sft_and_sft_r1), "reject", "spec.stages[2].name", "-r<N>", True),
        C("stage-named-pruned", with_("spec.stages.1.name", "pretrain-pruned"), "reject", "spec.stages[1].name",
          "-pruned", True),
        C("duplicate-stage-names", with_("spec.stages.1.name", "pretrain"), "reject", "spec.stages[1].name", "unique", True),
        C("stage-name-bidi", with_("spec.stages.1.name", "sft\u202egnp"), "reject", "spec.stages[1].name", "DNS label", True),
        # ---------------------------------------------------------------- credentials
        C("endpoint-userinfo", with_("spec.checkpoint.endpoint", f"https://{AKIA}:{AWS_SECRET}@minio.example.com:9000"),
          "reject", "spec.checkpoint.endpoint", "Secret", True, (AKIA, AWS_SECRET)),
        C("checkpoint-file-userinfo", with_("spec.checkpoint.uri", "file://key:secret@host/ckpt"), "reject",
          "spec.checkpoint.uri", "userinfo", True, ("key:secret",)),
        C("checkpoint-s3-userinfo", with_("spec.checkpoint.uri", f"s3://{AKIA}:{AWS_SECRET}@ckpt/runs/"), "reject",
          "spec.checkpoint.uri", "Secret", True, (AKIA, AWS_SECRET)),
        C("presigned-data-uri", with_("spec.data.sources.0.uri",
                                      f"s3://data/dclm/x.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={AKIA}"
                                      f"%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature={SIG}"),
          "reject", "spec.data.sources[0].uri", "Secret", True, (AKIA, SIG)),
        C("https-sas-data-uri", with_("spec.data.sources.0.uri", f"https://acct.blob.example.net/c/x.tar?sv=1&sig={SIG}"),
          "reject", "spec.data.sources[0].uri", "query parameter", True, (SIG,)),
        C("aws-key-in-model-config", mutate(lambda o: setp(o, "spec.model.llm", {"config": {
            "model_type": "llama", "hub": {"id": AKIA, "secret": AWS_SECRET}}})), "reject", "spec.model.llm.config.hub",
          "AWS", False, (AKIA, AWS_SECRET)),
        C("hf-token-in-image-token", with_("spec.model.tokenizer.imageToken", HF_TOKEN), "reject",
          "spec.model.tokenizer.imageToken", "Hugging Face", False, (HF_TOKEN,)),
        C("secret-key-field-in-config", mutate(lambda o: setp(o, "spec.model.llm", {"config": {
            "model_type": "llama", "aws_secret_access_key": "hunter2-not-a-real-key"}})), "reject",
          "spec.model.llm.config.aws_secret_access_key", "credential", False, ("hunter2",)),
        C("private-key-in-config", mutate(lambda o: setp(o, "spec.model.llm", {"config": {
            "model_type": "llama", "note": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"}})),
          "reject", "spec.model.llm.config.note", "private key", False, ("MIIEowIBAAKCAQEA",)),
        C("aws-key-as-mapping-key", dump(BASE).replace(b"dclm: 0.85", AKIA.encode() + b": 0.85"), "reject",
          "spec.stages[0].mixture", "AWS", True, (AKIA,)),
        C("aws-key-in-unknown-field", with_("spec.resources.accessKey", AKIA), "reject", "spec.resources.accessKey",
          "AWS", True, (AKIA,)),
        # ---------------------------------------------------------------- brace ranges
        C("brace-range-1m-shards", with_("spec.data.sources.0.uri", "s3://data/dclm/{000000..999999}.tar"), "accept",
          crd=False, note="1,000,000 shards is the per-URI maximum: counted arithmetically, never expanded"),
        C("brace-range-10m-shards", with_("spec.data.sources.0.uri", "s3://data/dclm/{0000000..9999999}.tar"), "reject",
          "spec.data.sources[0].uri", "at most 1000000", False),
        C("brace-ranges-multiply", with_("spec.data.sources.0.uri", "s3://data/{000..999}/{0000..9999}.tar"), "reject",
          "spec.data.sources[0].uri", "at most 1000000", False),
        C("brace-ranges-nine", with_("spec.data.sources.0.uri", "s3://data/" + "{0..1}" * 9 + ".tar"), "reject",
          "spec.data.sources[0].uri", "at most 8", False),
        C("brace-range-30-digits", with_("spec.data.sources.0.uri", "s3://data/{0.." + "9" * 30 + "}.tar"), "reject",
          "spec.data.sources[0].uri", "18 digits", False),
        C("brace-range-malformed", with_("spec.data.sources.0.uri", "./data/{0..}.tar"), "reject",
          "spec.data.sources[0].uri", "malformed", False),
        C("maximal-valid-spec", dump(maximal_manifest()), "accept", crd=False,
          note="the largest spec the schema allows: valid, validated in bounded time (benchmarks/validation.py)"),
        # ---------------------------------------------------------------- free-form configs and nesting
        C("config-depth-35", mutate(lambda o: setp(o, "spec.model.llm", {"config": {"model_type": "llama",
                                                                                      "deep": nested(34)}})),
          "reject", "spec.model.llm.config", "deeper than 32", False),
        C("config-100-kib", mutate(lambda o: setp(o, "spec.model.llm", {"config": {"model_type": "llama",
                                                                                    "blob": "x" * 100_000}})),
          "reject", "spec.model.llm.config", "64 KiB", False),
        C("config-600-keys", mutate(lambda o: setp(o, "spec.model.llm", {"config": {"model_type": "llama",
                                                                                    **{f"k{i}": i for i in range(600)}}})),
          "reject", "spec.model.llm.config", "more than 512", True),
        C("trainable-llm-deep", with_("spec.stages.0.trainable.llm", {"layers": nested(50)}), "reject",
          "spec.stages[0].trainable.llm", "deeper than 40", False),
        C("ansi-escape-in-field-name", with_("spec.resources.\x1b[31mevil\x1b[0m", 1), "reject", "spec.resources",
          "unknown field", True, ("\x1b",)),
        C("unknown-nested-field", with_("spec.resources.gpus", 8), "reject", "spec.resources", "unknown field", True),
        C("sources-65", with_("spec.data.sources", [dict(BASE["spec"]["data"]["sources"][0], name=f"s{i}")
                                                    for i in range(65)]), "reject", "spec.data.sources", "more than 64",
          True),
        # ---------------------------------------------------------------- controls: valid inputs stay valid
        C("endpoint-plain", with_("spec.checkpoint.endpoint", "http://minio.storage:9000"), "accept", crd=False,
          note="an S3-compatible endpoint without credentials"),
        C("yaml-merge-keys", dump(BASE).replace(b"  maxRetries: 3\n", b"  maxRetries: 3\n")
          .replace(b"kind: VLMPretrainRun\n", b"kind: VLMPretrainRun\nx-defaults: &d {lr: 0.0003}\n", 1), "reject",
          "x-defaults", "unknown top-level", True, note="anchors are fine; an unknown top-level field is not"),
    ]
    return out


def write(case: Case, directory: Path) -> Path:
    path = directory / f"{case.id}.yaml"
    path.write_bytes(case.data)
    return path


if __name__ == "__main__":  # python -m tests.support.hostile DIR: write the corpus out
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    target.mkdir(parents=True, exist_ok=True)
    for c in cases():
        write(c, target)
    print(json.dumps({"cases": len(cases()), "dir": str(target)}))
