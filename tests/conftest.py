"""Shared test setup: no traffic off 127.0.0.1, one Ray for the session, the shared data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports ray or mlflow (see ../shared/STACK.md).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_REPORT_URL"] = "http://127.0.0.1:9/"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt-ray-"))
os.environ.pop("RAY_ADDRESS", None)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; tests that need it skip when it is absent."""
    if not (SHARED_DATA / "rparis6k-mini").is_dir():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One embedded 2-CPU Ray for the whole test session."""
    import ray

    from raytrieval.cluster.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
