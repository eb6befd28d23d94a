#!/usr/bin/env bash
# Set up (idempotent) and learn the shipped stream; extra arguments go to `stream-cl run`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec "${VENV:-.venv}/bin/stream-cl" run "$@"
