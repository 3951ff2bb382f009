#!/usr/bin/env bash
# Creates ./.venv with everything the demo and the tests need; cheap when already done.
# Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv 2>/dev/null; then
      # Debian ships venv separately.
      if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; fi
      rm -rf .venv && "$PY" -m venv .venv
    fi
  fi
  echo "setting up .venv (first run only: torch, transformers, kopf, ...)" >&2
  # torch first and pinned: 2.13.0 is the CPU build here; an unpinned torch pulls a multi-GB CUDA build.
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check -e '.[operator,local,dev]'  # local includes trainer
  rm -f .venv/.installed-* && touch "$stamp"
fi
