"""The Dockerfile, checked for what can be checked without a Docker engine."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from vlm_api.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def stages() -> dict[str, list[str]]:
    """Stage name -> its instruction lines (continuations joined)."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(2)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def _last(lines: list[str], instruction: str) -> str:
    found = [l for l in lines if l.upper().startswith(instruction + " ")]
    assert found, f"no {instruction}"
    return found[-1].split(None, 1)[1]


def test_both_targets_exist():
    assert {"operator", "trainer"} <= set(stages())


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_targets_run_as_a_numeric_non_root_user(target):
    user = _last(stages()[target], "USER")
    assert user.isdigit() and int(user) != 0


def test_operator_image_has_no_torch():
    lines = " ".join(stages()["operator"])
    assert "python:3.11-slim" in lines
    assert "[operator]" in lines and "[trainer]" not in lines and "torch" not in lines.replace("torchx", "")


def test_trainer_image_installs_the_torch_the_tests_use():
    trainer = " ".join(stages()["trainer"])
    pinned = re.search(r"ARG TORCH_VERSION=(\S+)", trainer)
    assert pinned and '"torch==${TORCH_VERSION}"' in trainer
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert f"torch=={pinned[1]}" in setup, "the image and the test set-up pin different torch versions"


def test_entrypoints_name_real_commands():
    op = _last(stages()["operator"], "ENTRYPOINT")
    assert op == '["vlmpretrain", "operator"]'
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert "operator" in subcommands, "the operator image's entrypoint needs `vlmpretrain operator`"
    trainer = _last(stages()["trainer"], "ENTRYPOINT") + _last(stages()["trainer"], "CMD")
    assert "torchrun" in trainer and '"-m", "vlm_trainer"' in trainer
    assert importlib.util.find_spec("vlm_trainer.__main__") is not None


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
