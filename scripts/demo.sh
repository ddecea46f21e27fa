#!/usr/bin/env bash
# Set up and run the main job on the embedded default: the whole pipeline on the demo collection
# (generated from photos shipped inside installed wheels) on an embedded local Ray, everything
# under ./runs, ending with the endpoint up on 127.0.0.1:8000 and an example query printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/raytrieval pipeline "$@"
