"""Command-line flags generated from the config dataclasses (`raytrieval.cluster.flags`)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from raytrieval.cluster.cli import COMMANDS, build_parser, model_spec
from raytrieval.cluster.flags import add_fields, converter, field_help, given


@dataclass
class Toy:
    """A config for the tests.

    Args:
        run_dir: where it goes,
            over two lines.
        k: neighbours.
        scales: extraction scales.
        limit: at most this many (None: all).
        fast: go fast.
        extra: a mapping no flag can hold.
    """

    run_dir: str
    k: int = 10
    scales: tuple[float, ...] = (1.0,)
    limit: int | None = None
    fast: bool = False
    extra: dict = field(default_factory=dict)


def toy_parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_fields(parser, Toy, "toy", skip=("extra",), **kwargs)
    return parser


def test_help_comes_from_the_docstring_with_continuation_lines():
    docs = field_help(Toy)
    assert docs["run_dir"] == "where it goes, over two lines."
    assert set(docs) == {f.name for f in dataclasses.fields(Toy)}


def test_flags_parse_to_the_field_types_and_only_given_ones_are_returned():
    parser = toy_parser()
    args = parser.parse_args(["--run-dir", "r", "--scales", "1,0.5", "--limit", "none", "--fast"])
    assert given(args, "toy") == {"run_dir": "r", "scales": (1.0, 0.5), "limit": None, "fast": True}
    assert Toy(**given(args, "toy")).k == 10  # the dataclass default, not a copy of it
    assert given(parser.parse_args(["--run-dir", "r", "--no-fast", "--limit", "3"]), "toy") == {
        "run_dir": "r", "fast": False, "limit": 3}
    with pytest.raises(SystemExit):  # a field without a default is a required flag
        parser.parse_args([])
    with pytest.raises(SystemExit):
        parser.parse_args(["--run-dir", "r", "--k", "ten"])


def test_help_shows_the_dataclass_default_and_renames_and_command_defaults():
    parser = toy_parser(rename={"k": "neighbours"}, defaults={"limit": 5})
    text = parser.format_help()
    assert "--neighbours NEIGHBOURS" in text and "--k " not in text
    assert "neighbours. (default: 10)" in " ".join(text.split())
    assert given(parser.parse_args(["--run-dir", "r"]), "toy") == {"run_dir": "r", "limit": 5}


def test_fields_a_flag_cannot_hold_and_undocumented_fields_are_refused():
    with pytest.raises(TypeError, match="dict"):
        converter(dict)

    @dataclass
    class Undocumented:
        """No Args section."""

        k: int = 1

    with pytest.raises(ValueError, match="Undocumented.k"):
        add_fields(argparse.ArgumentParser(), Undocumented, "u")


def test_every_command_builds_and_the_cli_defaults_are_the_dataclass_defaults():
    from raytrieval.cluster.eval_stage import EvalConfig
    from raytrieval.evaluation.rerank import RerankConfig
    from raytrieval.mining.stages import CleanConfig, MineConfig
    from raytrieval.retrieval.model import ModelSpec

    parser = build_parser()
    assert set(next(a for a in parser._actions if a.dest == "command").choices) == set(COMMANDS)
    args = parser.parse_args(["eval"])
    # a GeM spec records GeM's default power (what the CLI always wrote: descriptor fingerprints stay)
    assert EvalConfig(**given(args, "eval"), model=model_spec(args)) == EvalConfig(
        model=ModelSpec(pooling_kwargs={"p": 3.0}))
    assert RerankConfig(**given(args, "rerank")) == RerankConfig()
    args = parser.parse_args(["clean", "--run-dir", "r", "--local-max-size", "640", "--geometry", "fundamental"])
    assert given(args, "verify") == {"max_size": 640, "model": "fundamental"}
    assert CleanConfig(**given(args, "clean")) == CleanConfig(run_dir="r")
    args = parser.parse_args(["mine", "--run-dir", "r", "--exclude-knn", "0", "--pooling", "mac",
                              "--weights", "none", "--scales", "1,0.7071"])
    assert MineConfig(**given(args, "mine")).exclude_knn == 0
    assert model_spec(args) == ModelSpec(pooling="mac", weights=None, scales=(1.0, 0.7071))
    args = parser.parse_args(["eval", "--gem-p", "4", "--rerank", "aqe,sv"])
    assert model_spec(args).pooling_kwargs == {"p": 4.0}
    assert RerankConfig(**given(args, "rerank")).steps == ("aqe", "sv")
    args = parser.parse_args(["index", "build", "--images", "x", "--memory", "2G"])
    assert given(args, "index") == {"memory": 2.0 * 2**30}
    args = parser.parse_args(["train", "--gpus", "--epochs", "3"])  # YAML first: only what was passed
    assert given(args, "train") == {"use_gpu": True, "epochs": 3}
    args = parser.parse_args(["pipeline", "--images", "photos", "--no-serve"])
    assert given(args, "pipeline") == {"collection": "photos", "serve": False}


def test_a_command_parser_has_only_its_own_flags():
    parser = build_parser("demo")
    assert parser.parse_args(["demo", "--seed", "3"]).seed == 3
    with pytest.raises(SystemExit):  # eval's flags were not added
        parser.parse_args(["eval", "--dataset", "demo"])


def test_serve_flags_come_from_the_pydantic_app_args():
    from raytrieval.serving.app import AppArgs

    parser = build_parser("serve")
    args = parser.parse_args(["serve", "--public-host", "a.example", "--public-host", "b.example", "--embedders", "2"])
    app = AppArgs(**given(args, "serve"))
    assert (app.index, app.public_hosts, app.embedder_replicas) == ("runs/index", ["a.example", "b.example"], 2)
    assert AppArgs(**given(parser.parse_args(["serve"]), "serve")) == AppArgs(index="runs/index")
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    assert "queries an embedder batches together (default: 8)" in " ".join(serve.format_help().split())
