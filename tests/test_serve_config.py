"""serving/serve_config.yaml is a valid Serve config, loopback-only, with the app builder's args
and the default Host allowlist."""

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from raytrieval.serving.app import AppArgs

CONFIG = Path(__file__).resolve().parents[1] / "serving" / "serve_config.yaml"


def test_serve_config_is_valid_and_safe():
    data = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema(**data)
    assert data["http_options"]["host"] == "127.0.0.1"
    app = data["applications"][0]
    assert app["import_path"] == "raytrieval.serving.app:build_app"
    args = AppArgs(**app["args"])  # every arg is a field of the typed builder
    assert args.public_hosts == []  # the Host allowlist is loopback only: nothing to open by default
    assert "RAYTRIEVAL_TOKEN" in CONFIG.read_text() and "api-token" in CONFIG.read_text()  # says how to get in
    embedder = next(d for d in app["deployments"] if d["name"] == "Embedder")
    assert embedder["autoscaling_config"]["max_replicas"] >= embedder["autoscaling_config"]["min_replicas"]
