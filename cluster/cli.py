"""The `raytrieval` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cluster.runtime import apply_offline_env


def _floats(text: str) -> tuple[float, ...]:
    """'1,0.7071,0.5' -> (1.0, 0.7071, 0.5)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags that define an off-the-shelf model (`ModelSpec`)."""
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="efficientnet_lite0")
    g.add_argument("--pooling", default="gem", help="mac | spoc | gem | rmac | crow")
    g.add_argument("--gem-p", type=float, default=3.0, help="initial GeM power")
    g.add_argument("--weights", default="imagenet", help="'imagenet', a local state-dict file, or 'none'")
    g.add_argument("--scales", type=_floats, default=(1.0,), help="e.g. 1 or 1,0.7071,0.5")
    g.add_argument("--max-size", type=int, default=512, help="longer image side")


def model_spec(args: argparse.Namespace):
    from retrieval.model import ModelSpec

    return ModelSpec(
        backbone=args.backbone,
        pooling=args.pooling,
        pooling_kwargs={"p": args.gem_p} if args.pooling == "gem" else {},
        max_size=args.max_size,
        scales=args.scales,
        weights=None if args.weights == "none" else args.weights,
    )


def add_ray_args(p: argparse.ArgumentParser, workers: int = 2) -> None:
    g = p.add_argument_group("ray")
    g.add_argument("--workers", type=int, default=workers, help="Ray actors (0: no Ray, in-process)")
    g.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")


def cmd_eval(args: argparse.Namespace) -> int:
    from cluster.eval_stage import EvalConfig, run_eval

    run_eval(EvalConfig(
        dataset=args.dataset, data_root=args.data_root, model=model_spec(args), checkpoint=args.checkpoint,
        workers=args.workers, address=args.address, out=args.out,
    ))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from evaluation.demo import generate_demo

    print(generate_demo(args.out, seed=args.seed))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from retrieval.manifest import build_manifest, write_manifest

    table = build_manifest(args.source)
    write_manifest(table, args.out)
    status = table.column("status").to_pylist()
    bad = [(u, s) for u, s in zip(table.column("uri").to_pylist(), status) if s != "ok"]
    print(f"{len(status) - len(bad)} images ok, {len(bad)} rejected -> {args.out}")
    for uri, reason in bad:
        print(f"  rejected {uri}: {reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytrieval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="mAP of a model on a benchmark (revisitop protocol)")
    p.add_argument("--dataset", default="demo", help="rparis6k-mini | ukbench-56 | demo | <name in data-root>")
    p.add_argument("--data-root", default="runs/data")
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint directory")
    p.add_argument("--out", default=None, help="output directory (default runs/eval/<dataset>-<model>)")
    add_model_args(p)
    add_ray_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="generate the embedded demo collection")
    p.add_argument("--out", default="runs/data")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ingest", help="decode-check a folder of images into images.parquet")
    p.add_argument("source", help="image folder")
    p.add_argument("--out", default="runs/ingest/images.parquet")
    p.set_defaults(func=cmd_ingest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    apply_offline_env()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"raytrieval {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
