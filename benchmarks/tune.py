"""Tune benchmark: a Ray Tune sweep of fine-tuning runs on rparis6k-mini, written to benchmarks/tune.md.

The unlabeled collection is the benchmark's 397 database images (no queries, no labels): it is
cleaned (kNN -> spatial verification -> clusters, `raytrieval.mining.stages.clean`, skipped when done) and
every trial fine-tunes on those clusters with Ray Train, validated every epoch on the 19
queries. The base configuration runs as the first trial (`include_default`), so the gain of
the sweep is measured against it in the same run; wall time is compared with the sum of the
trials' training times (how many trials Tune keeps busy at once).

    .venv/bin/python benchmarks/tune.py --data-root ../shared/data            # ~20 min on 2 cores
    .venv/bin/python benchmarks/tune.py --num-samples 3 --epochs 1            # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from benchmarks.baseline import machine  # noqa: E402
from raytrieval.cluster.runtime import apply_offline_env, init_ray  # noqa: E402


def prepare(data_root: Path, run_dir: Path, workers: int) -> dict:
    """images.parquet and clusters.parquet of the database images (stages skip when up to date)."""
    from raytrieval.evaluation.datasets import load_benchmark
    from raytrieval.mining.stages import CleanConfig, clean
    from raytrieval.retrieval.manifest import build_manifest, write_manifest
    from raytrieval.retrieval.model import ModelSpec

    bench = load_benchmark("rparis6k-mini", data_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "images.parquet").is_file():
        write_manifest(build_manifest(bench.images, progress=False), run_dir / "images.parquet")
    return clean(CleanConfig(run_dir=str(run_dir), model=ModelSpec(max_size=512), workers=workers, progress=False))


def sweep_config(args: argparse.Namespace, run_dir: Path):
    from raytrieval.trainers.sweep_config import SweepConfig

    return SweepConfig(
        train=dict(
            manifest=str(run_dir / "images.parquet"), pairs="clusters", clusters=str(run_dir / "clusters.parquet"),
            epochs=args.epochs, num_queries=args.queries, pool_size=400, num_negatives=5, image_size=256,
            max_size=args.val_size, loss="contrastive", lr=1e-5, batch_size=5, val_dataset="rparis6k-mini",
            val_data_root=str(Path(args.data_root).resolve()), workers=1, cpus_per_worker=0.9, max_failures=0,
        ),
        search_space={
            "loss": ["contrastive", "triplet"],
            "pooling": ["gem", "mac", "rmac"],
            "lr": {"loguniform": [1e-6, 2e-4]},
        },
        searcher=args.searcher, num_samples=args.num_samples, include_default=True, scheduler="asha",
        grace_period=1, reduction_factor=2, out=str(Path(args.out).resolve()), name=args.name,
        experiment="tune-benchmark", registered_model="raytrieval-tune-benchmark", seed=args.seed,
    )


def write_markdown(path: Path, cfg, result, collection: dict, args: argparse.Namespace, started: str) -> None:
    from raytrieval.trainers.sweep_report import default_row, markdown_table

    rows = result.trials
    train_s = sum(r["train_s"] or 0.0 for r in rows)
    default = default_row(rows, cfg)
    plots = path.parent / "tune"
    plots.mkdir(exist_ok=True)
    for png in (cfg.sweep_dir / "plots").glob("*.png"):
        shutil.copy2(png, plots / png.name)
    best = result.best
    lines = [
        "# Tune benchmark: a Ray Tune sweep of fine-tuning runs on rparis6k-mini", "",
        f"- Machine: {machine()}",
        f"- Date: {started} UTC. Command: `.venv/bin/python benchmarks/tune.py {' '.join(sys.argv[1:])}`",
        f"- Collection: the {collection['counts'].get('images', 397)} database images, unlabeled; cleaning found "
        f"{collection['counts'].get('clusters', '?')} clusters over {collection['counts'].get('clustered_images', '?')} images "
        "(spatially verified kNN pairs, connected components).",
        f"- Trials: Ray Train, 1 worker x 0.9 CPU each (+0.1 for the trial's Tune actor), so two trials run side by "
        f"side on the 2 cores; EfficientNet-Lite0, {args.epochs} epochs of {args.queries} tuples (5 hard negatives "
        f"re-mined each epoch), training images 256 px; validation mAP every epoch at {args.val_size} px, single scale, "
        "no whitening or re-ranking. Searcher: "
        f"{cfg.searcher} ({cfg.num_samples} trials, the default configuration first), ASHA on "
        f"{cfg.metric} (grace 1 epoch, reduction factor 2).",
        "- Search space: " + ", ".join(f"{k} {json.dumps(v)}" for k, v in cfg.search_space.items())
        + ". Default (base) configuration: contrastive, GeM, lr 1e-5, margin 0.7.",
        "- The validation queries are the benchmark's queries: choosing the best trial and epoch on them is "
        "selection on the test set. The table shows what each configuration reaches, not an unbiased estimate.",
        "", "## Results", "",
        f"- {len(rows)} trials: {sum(r['status'] == 'FINISHED' for r in rows)} ran all epochs, "
        f"{sum(r['status'] == 'STOPPED' for r in rows)} were stopped early by ASHA, "
        f"{sum(r['status'] == 'ERROR' for r in rows)} errored.",
    ]
    if best:
        lines.append(f"- Best: `{json.dumps(best['params'])}`: Medium {100 * best['best']:.1f} at epoch "
                     f"{best['best_epoch']} (E/M/H {100 * best['metrics'].get('val_map_easy', float('nan')):.1f} / "
                     f"{100 * best['metrics'].get('val_map_medium', float('nan')):.1f} / "
                     f"{100 * best['metrics'].get('val_map_hard', float('nan')):.1f}); registered as "
                     f"`{cfg.registered_model}` version {result.model_version} with alias `{cfg.champion_alias}`.")
    if best and default and default["best"] is not None:
        off = default["history"][0].get("val_map_medium")
        lines.append(f"- Default configuration: best Medium {100 * default['best']:.1f} (off-the-shelf, epoch 0: "
                     f"{100 * off:.1f}); the sweep's best is **{100 * (best['best'] - default['best']):+.1f}** Medium over it.")
    lines += [
        f"- Wall time {result.wall_s:.0f} s against {train_s:.0f} s of trial training time summed: Tune kept "
        f"**{train_s / result.wall_s:.2f}** trials running on average (at most 2 fit on the 2 cores).",
        "", markdown_table(rows, cfg), "",
        "![mAP vs margin](tune/map_vs_margin.png)", "![mAP per epoch](tune/map_per_epoch.png)", "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="runs/bench/tune")
    p.add_argument("--name", default="sweep")
    p.add_argument("--collection", default="runs/bench/finetune/rparis6k-mini",
                   help="run directory of the cleaned collection (shared with benchmarks/finetune.py: cleaned once)")
    p.add_argument("--searcher", default="tpe", choices=("grid", "random", "tpe"))
    p.add_argument("--num-samples", type=int, default=6)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--queries", type=int, default=60, help="tuples per epoch")
    p.add_argument("--val-size", type=int, default=384, help="validation image size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--md", default=str(_HERE / "tune.md"))
    args = p.parse_args(argv)
    apply_offline_env()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    init_ray(num_cpus=2)
    run_dir = Path(args.collection).resolve()
    collection = prepare(Path(args.data_root), run_dir, workers=2)
    print(f"collection: {collection['counts']}", flush=True)
    from raytrieval.trainers.sweep import run_sweep

    cfg = sweep_config(args, run_dir)
    result = run_sweep(cfg)
    write_markdown(Path(args.md), cfg, result, collection, args, started)
    print(Path(args.md).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
