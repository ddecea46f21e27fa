"""`raytrieval eval` end to end on the shared real data (Ray Data embedding, metrics.json)."""

from __future__ import annotations

import json

import pytest

from raytrieval.cluster.cli import main

# Independently measured reference (../shared/data/README.md): EfficientNet-Lite0, GeM p=3,
# single scale, longer side 512, query cropped, no whitening.
REFERENCE = {"easy": 80.0, "medium": 63.1, "hard": 38.6}


def run_eval(tmp_path, *args: str) -> dict:
    assert main(["eval", "--out", str(tmp_path), *args]) == 0
    return json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.slow
def test_reproduces_reference_gem_figure(ray_session, shared_data, tmp_path):
    """The reference loader pads as if inputs were 224 x 224; with that padding we match it."""
    record = run_eval(tmp_path, "--dataset", "rparis6k-mini", "--data-root", str(shared_data),
                      "--backbone", "efficientnet_lite0_static", "--pooling", "gem", "--scales", "1",
                      "--max-size", "512", "--workers", "2")
    assert record["num_images"] == 397 and record["num_queries"] == 19
    for protocol, expected in REFERENCE.items():
        assert record["metrics"][protocol]["map"] * 100 == pytest.approx(expected, abs=0.15)


@pytest.mark.slow
def test_default_backbone_close_to_reference(shared_data, tmp_path):
    """TensorFlow 'SAME' padding for the actual image size: within 2 points of the reference."""
    record = run_eval(tmp_path, "--dataset", "rparis6k-mini", "--data-root", str(shared_data), "--workers", "0")
    for protocol, expected in REFERENCE.items():
        assert record["metrics"][protocol]["map"] * 100 == pytest.approx(expected, abs=2.0)


def test_ukbench_ns_score(ray_session, shared_data, tmp_path):
    record = run_eval(tmp_path, "--dataset", "ukbench-56", "--data-root", str(shared_data), "--workers", "1",
                      "--max-size", "320")
    assert 3.0 < record["metrics"]["ns_score"] <= 4.0
    assert record["num_images"] == 56


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    assert main(["eval", "--dataset", "nowhere", "--data-root", str(tmp_path), "--workers", "0"]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--scales", "1,x"])
