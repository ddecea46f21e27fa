"""Ray runtime: an embedded local Ray by default, or an existing cluster by address.

Everything that starts Ray or MLflow goes through `apply_offline_env` first, so that no
traffic leaves 127.0.0.1 (usage stats, telemetry, cloud-metadata probes).
"""

from __future__ import annotations

import os
import tempfile

OFFLINE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "RAY_AUTH_MODE": "disabled",
}


def apply_offline_env() -> None:
    """Set the variables that keep Ray and MLflow off the network (existing values win)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), f"raytrieval-ray-{os.getuid()}"))
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start an embedded local Ray.

    Args:
        address: a Ray cluster address such as "ray://host:10001" or "auto"; None for local.
        num_cpus: CPUs of an embedded Ray (default: all).
        num_gpus: GPUs of an embedded Ray (default: detected).
    """
    import ray

    apply_offline_env()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard (on 127.0.0.1) serves the State API, which Ray Train's placement-group
        # cleaner polls: without it a trial stopped by Tune leaks its workers' resources.
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            _temp_dir=os.environ["RAY_TMPDIR"],
        )


def cluster_resources() -> dict[str, float]:
    """CPUs and GPUs the connected Ray cluster has."""
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}
