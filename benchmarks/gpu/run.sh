#!/usr/bin/env bash
# The GPU run in one command: `stream-cl bench gpu` on the first CUDA device, report in benchmarks/gpu/results/.
# Needs no network: river, kafka-python, crc32c and redis come from wheels in .whl/ when the machine lacks them
# (see benchmarks/gpu/README.md). Extra options go to the benchmark, e.g. `--device cpu --tiny` for a smoke run.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
if [ -d .whl ] && ! "$python" -c "import river, kafka, crc32c, redis" 2>/dev/null; then
    "$python" -m pip install -q --no-index --find-links .whl river kafka-python crc32c redis
fi
# 470 s: the whole run, installs included, stays under 8 minutes; the report is rewritten after each of its three
# parts, so a run cut short keeps what it measured.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec timeout 470 "$python" -m stream_cl bench gpu --device cuda "$@"
