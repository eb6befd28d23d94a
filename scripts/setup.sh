#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system services the tests use, a venv, torch
# (pinned CPU build first, so pip never pulls GBs of CUDA wheels), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
WITH_SERVICES=${WITH_SERVICES:-0}

need_apt=()
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then need_apt+=(python3-venv); fi
if [ "$WITH_SERVICES" = 1 ]; then
  command -v redis-server >/dev/null || need_apt+=(redis-server)
  command -v prometheus >/dev/null || need_apt+=(prometheus)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

stamp="$VENV/.stream-cl-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==2.13.0" numpy
  "$VENV/bin/pip" install -q -e ".[test]"
  touch "$stamp"
fi
