"""Ray runtime: an embedded local Ray by default, or an existing cluster by address.

Everything that starts Ray or MLflow goes through `apply_offline_env` first, so that no
traffic leaves 127.0.0.1 (usage stats, telemetry, cloud-metadata probes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

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


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             log_file: str | os.PathLike | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start an embedded local Ray.

    Args:
        address: a Ray cluster address such as "ray://host:10001" or "auto"; None for local.
        num_cpus: CPUs of an embedded Ray (default: all).
        num_gpus: GPUs of an embedded Ray (default: detected).
        log_file: keep the console for the caller's own lines: Ray's driver-side log records
            go to this file, and the workers' output stays in Ray's session logs (not echoed).
    """
    import ray

    apply_offline_env()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    log_to_driver = log_file is None
    if log_file is not None:
        _ray_logs_to(Path(log_file))
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # The dashboard (on 127.0.0.1) serves the State API, which Ray Train's placement-group
        # cleaner polls: without it a trial stopped by Tune leaks its workers' resources.
        with local_provider_home():
            ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=log_to_driver,
                _temp_dir=os.environ["RAY_TMPDIR"],
            )
    if log_file is not None:
        _ray_logs_to(Path(log_file))  # ray.init may have added its console handler again
        where = "the cluster's session logs" if address else f"{os.environ['RAY_TMPDIR']}/session_latest/logs"
        logging.getLogger("ray").info("the Ray workers' output is in %s", where)


@contextlib.contextmanager
def local_provider_home() -> Iterator[None]:
    """HOME -> a folder holding `ray_bootstrap_config.yaml` with a local provider, while Ray starts.

    Ray's dashboard reads `~/ray_bootstrap_config.yaml` and, when there is none, probes the
    cloud-metadata addresses (169.254.169.254, metadata.google.internal) to name the cloud it
    runs on (../shared/STACK.md). The processes Ray starts keep this HOME, so TORCH_HOME is
    pinned to the real torch cache first (where torchvision weights are looked up).
    """
    home = Path(os.environ["RAY_TMPDIR"]) / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    old = os.environ.get("HOME")
    os.environ.setdefault("TORCH_HOME", str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "torch"))
    os.environ["HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old



_RAY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.serve", "ray.data")


def _ray_logs_to(path: Path) -> None:
    """Send the records of Ray's loggers to `path` instead of the console (idempotent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in _RAY_LOGGERS:
        log = logging.getLogger(name)
        for handler in list(log.handlers):
            if not (isinstance(handler, logging.FileHandler) and handler.baseFilename == str(path.resolve())):
                log.removeHandler(handler)
        log.propagate = name != "ray"  # children pass records up to "ray", "ray" not to the root
    root = logging.getLogger("ray")
    if not root.handlers:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


INTERRUPTED = 130  # exit status of a process ended by Ctrl-C (128 + SIGINT)


SHUTDOWN_S = 12.0  # Ctrl-C ends the process within 20 s: past this, Ray's processes are killed


def serve_until_stopped(shutdown_s: float = SHUTDOWN_S) -> int:
    """Block while Serve answers, until SIGINT (Ctrl-C) or SIGTERM; then shut Serve and Ray down.

    Installs its own handlers for both signals (replacing any left by a library, e.g. Ray
    Train's SIGINT handler) and restores the previous ones before returning. A shutdown that
    takes longer than `shutdown_s` (seen once in benchmarks/pipeline.md: a second run's
    Ctrl-C still waiting after 60 s) is cut short: the embedded Ray's processes are killed
    and the process exits at once with the status below.

    Returns:
        The exit status: 130 after SIGINT, 0 after SIGTERM.
    """
    received: list[int] = []
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        status = INTERRUPTED if received and received[0] == signal.SIGINT else 0
        closer = threading.Thread(target=shutdown_ray, kwargs={"serve_too": True}, daemon=True)
        closer.start()
        closer.join(shutdown_s)
        if closer.is_alive():
            print(f"Ray did not shut down within {shutdown_s:.0f} s: killing its processes", flush=True)
            kill_local_ray()
            sys.stderr.flush()
            os._exit(status)  # the stuck shutdown thread (and Ray's atexit hook) would block a normal exit
    return status


def kill_local_ray() -> None:
    """SIGKILL the processes of the Ray node this process started (none if it joined a cluster)."""
    from ray._private import worker

    if worker._global_node is not None:
        worker._global_node.kill_all_processes(check_alive=False, allow_graceful=False)


def shutdown_ray(serve_too: bool = False) -> None:
    """Stop Serve's applications (if asked) and disconnect from Ray, stopping an embedded Ray."""
    import ray

    if serve_too and ray.is_initialized():
        from ray import serve

        with contextlib.suppress(Exception):
            serve.shutdown()
    ray.shutdown()
