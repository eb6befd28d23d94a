#!/usr/bin/env bash
# Set up (idempotent, including redis-server, prometheus and the tansu broker), lint, run every test.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_SERVICES=1 ./scripts/setup.sh
BIN=${VENV:-.venv}/bin
"$BIN/ruff" check .
"$BIN/ruff" format --check .
status=0
"$BIN/python" -m pytest "$@" || status=$?
# pytest's 5 means "no tests collected": that is a failure here, never a silent pass.
exit "$status"
