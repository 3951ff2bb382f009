#!/usr/bin/env bash
# The test suite: installs what it needs (./.venv, promtool on first use), then runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/test_cli.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
rc=$?
# pytest's 5 means "no tests collected": with a filter that matched nothing, that is not a failure.
if [ "$rc" = 5 ] && [ $# -gt 0 ]; then rc=0; fi
exit $rc
