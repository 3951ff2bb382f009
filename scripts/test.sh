#!/usr/bin/env bash
# The test suite: installs what it needs (./.venv, kubectl, promtool on first use), then runs pytest.
# `--fast` runs the unit tier only (`-m unit`: pure or in-process tests, about 2 minutes);
# other arguments go to pytest, e.g. `scripts/test.sh tests/test_cli.py -x`. Tiers: unit,
# integration, slow (tests/conftest.py); `-m 'not slow'` skips the end-to-end runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
source scripts/kubectl.sh  # kubectl 1.22+ on PATH (.venv/bin first)
args=()
for arg in "$@"; do
  if [ "$arg" = --fast ]; then args+=(-m unit); else args+=("$arg"); fi
done
set +e
.venv/bin/python -m pytest "${args[@]}"
rc=$?
# pytest's 5 means "no tests collected": with a filter that matched nothing, that is not a failure.
if [ "$rc" = 5 ] && [ $# -gt 0 ]; then rc=0; fi
exit $rc
