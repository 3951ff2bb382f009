#!/usr/bin/env bash
# The demo: installs what it needs, then `vlmpretrain demo` (local run, CPU, generated data).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/vlmpretrain demo "$@"
