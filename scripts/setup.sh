#!/usr/bin/env bash
# Create .venv (if missing) and install raytrieval with its test extras. Offline-safe: torch and
# torchvision resolve to the builds on local disk (see ../shared/STACK.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,colmap]'
