"""`vlmpretrain` as a user runs it: exit codes and one `FILE: path: reason` line per problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def vlm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlm_api.cli", *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120
    )


def test_validate_accepts_the_examples():
    out = vlm("validate", "examples/demo.yaml", "examples/run.yaml", "examples/run-kueue.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == ""
    # the deprecated field still validates, with a warning naming its successor
    assert ("examples/run.yaml: warning: spec.resources.priorityClassName: deprecated: use "
            "spec.scheduling.priorityClassName") in out.stderr
    assert "run-kueue.yaml: warning" not in out.stderr


def test_validate_prints_one_line_per_problem_and_exits_1(tmp_path):
    bad = yaml.safe_load((REPO / "examples/demo.yaml").read_text())
    bad["spec"]["stages"][0]["mixture"]["text"] = 0.9
    bad["spec"]["resources"]["nodes"] = {"min": 4, "max": 2}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("spec: [oops\n")
    out = vlm("validate", str(path), str(garbage), "examples/run.yaml")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert f"{path}: spec.stages[0].mixture: mixture fractions must sum to 1 (within 1e-6)" in lines
    assert f"{path}: spec.resources.nodes.min: min must be <= max" in lines
    assert any(line.startswith(f"{garbage}: <yaml>: not valid YAML at line") for line in lines)
    assert not any("examples/run.yaml" in line for line in lines)
    assert "Traceback" not in out.stderr


def test_validate_reports_a_missing_file_without_traceback():
    out = vlm("validate", "does/not/exist.yaml")
    assert out.returncode == 1 and "does/not/exist.yaml: <file>:" in out.stdout and "Traceback" not in out.stderr


def test_render_prints_the_children_as_multi_document_yaml():
    start = "s3://ckpt/runs/llama1b-intro80/pretrain/step-000024000/"
    out = vlm("render", "examples/run.yaml", "--stage", "sft", "--init-from", start)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert [d["kind"] for d in docs] == ["NetworkPolicy", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                                         "PyTorchJob", "PodMonitor"]
    assert docs[5]["metadata"]["name"] == "llama1b-intro80-sft"
    assert yaml.safe_load(docs[1]["data"]["config.yaml"])["initFrom"] == start  # as the operator sets it


def test_render_of_a_later_stage_without_its_start_says_what_to_give():
    out = vlm("render", "examples/run.yaml", "--stage", "sft")
    assert out.returncode == 1 and "--init-from" in out.stderr and "Traceback" not in out.stderr


def test_render_refuses_an_invalid_manifest():
    out = vlm("render", "-", stdin="apiVersion: v1\nkind: Pod\n")
    assert out.returncode == 1 and "apiVersion" in out.stderr and out.stdout == ""


def test_crd_check_detects_a_stale_file(tmp_path):
    assert vlm("crd", "--check").returncode == 0
    stale = tmp_path / "crd.yaml"
    stale.write_text("old")
    out = vlm("crd", "--check", "-o", str(stale))
    assert out.returncode == 1 and "stale" in out.stderr
