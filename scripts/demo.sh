#!/usr/bin/env bash
# Set up and run the main job on the embedded default: the demo collection (generated from
# photos shipped inside installed wheels), an embedded local Ray, everything under ./runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/raytrieval eval --dataset demo --data-root runs/data "$@"
