#!/usr/bin/env bash
# GPU paths on a lent GPU machine, one line per check (scripts/gpu_check.py); skips without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
exec timeout 480 "$PY" scripts/gpu_check.py
