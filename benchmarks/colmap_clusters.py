"""Clusters from connected components vs COLMAP 3-D models, scored against the ground truth.

    .venv/bin/python benchmarks/colmap_clusters.py --data-root ../shared/data --out benchmarks/colmap_clusters.md

Same collections and settings as benchmarks/mining.py (database images, no queries; GeM at
512 px; top-10 kNN candidates; RootSIFT 1000 keypoints; MAGSAC homography; 15 inliers). The
clean stage runs twice in one run directory, ``clusters='components'`` then
``clusters='colmap'``; the second reuses the descriptors and matches of the first, so its time
is COLMAP's (features of the clustered images, putative matches, two-view verification,
incremental mapping). Each clustering is scored like in mining.md, and the sfm tuples mined
from it (positive by inliers, 5 negatives) are judged against the ground truth.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402

from benchmarks.baseline import machine, write_markdown  # noqa: E402
from benchmarks.mining import Truth, ari, f, purity, tuple_scores  # noqa: E402
from raytrieval.evaluation.datasets import load_benchmark  # noqa: E402
from raytrieval.mining.cleaning import read_clusters  # noqa: E402
from raytrieval.mining.stages import CleanConfig, MineConfig, clean, mine_indices, read_descriptors  # noqa: E402
from raytrieval.mining.verify import VerifyConfig  # noqa: E402
from raytrieval.retrieval.manifest import build_manifest, write_manifest  # noqa: E402
from raytrieval.retrieval.model import ModelSpec  # noqa: E402


def labels_of(run: Path, ids: list[str]) -> np.ndarray:
    table = read_clusters(run / "clusters.parquet")
    index = {image_id: i for i, image_id in enumerate(ids)}
    labels = np.full(len(ids), -1, np.int64)
    for image_id, c in zip(table.column("image_id").to_pylist(), table.column("cluster_id").to_pylist()):
        labels[index[image_id]] = c
    return labels


def dataset_rows(name: str, root: str, work: Path, min_inliers: int) -> list[str]:
    bench = load_benchmark(name, root)
    run = work / name
    run.mkdir(parents=True, exist_ok=True)
    ids = [Path(p).stem for p in bench.images]
    write_manifest(build_manifest(dict(zip(ids, bench.images)), progress=False), run / "images.parquet")
    truth = Truth(bench)
    rows = []
    for mode in ("components", "colmap"):
        cfg = CleanConfig(run_dir=str(run), model=ModelSpec(max_size=512, pooling_kwargs={"p": 3.0}), workers=0,
                          k=10, verify=VerifyConfig(max_features=1000), min_inliers=min_inliers, clusters=mode,
                          progress=False)
        t0 = time.perf_counter()
        record = clean(cfg)
        seconds = time.perf_counter() - t0
        step_s = record["timings"]["cluster_s"]
        labels = labels_of(run, ids)
        _, X, _ = read_descriptors(run / "descriptors.parquet")
        q, p, neg = mine_indices(MineConfig(run_dir=str(run), method="sfm", num_negatives=5), ids, X)
        tuples, pos_ok, neg_ok = tuple_scores(truth, q, p, neg)
        clustered = labels >= 0
        sizes = np.bincount(labels[clustered]) if clustered.any() else np.zeros(0, np.int64)
        extra = (f"{record['colmap']['points3d']:,} points" if mode == "colmap" else "")
        rows.append(
            f"| {name} | {mode} | {len(sizes)} | {int(clustered.sum())} | {sizes.max(initial=0)} | "
            f"{f(purity(labels, truth.labels))} | {f(ari(labels, truth.labels), pct=False)} | {tuples} | "
            f"{f(pos_ok)} | {f(neg_ok)} | {step_s:.1f} ({seconds:.0f} stage) | {extra} |"
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--demo-root", default="runs/data")
    p.add_argument("--datasets", default="rparis6k-mini,ukbench-56,demo")
    p.add_argument("--work", default="runs/bench-colmap")
    p.add_argument("--min-inliers", type=int, default=15)
    p.add_argument("--out", default="benchmarks/colmap_clusters.md")
    args = p.parse_args(argv)

    started = time.perf_counter()
    rows = []
    for name in args.datasets.split(","):
        if name == "demo":
            from raytrieval.evaluation.demo import generate_demo

            generate_demo(Path(args.demo_root))
        rows += dataset_rows(name, args.demo_root if name == "demo" else args.data_root, Path(args.work),
                             args.min_inliers)
    import pycolmap

    lines = [
        "# Clusters: connected components vs COLMAP 3-D models",
        "",
        f"Measured {dt.date.today()} on {machine()}, pycolmap {pycolmap.__version__}; the whole script took "
        f"{(time.perf_counter() - started) / 60:.1f} min.",
        "",
        f"Command: `.venv/bin/python benchmarks/colmap_clusters.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "Collections, descriptors and verification as in mining.md; clusters of at least 2 images",
        f"from the pairs with >= {args.min_inliers} inliers. Purity: share of clustered images with their",
        "cluster's majority landmark; ARI over all images (unclustered = singletons). Tuples: sfm",
        "mining over each clustering (positive = most inliers, 5 random negatives from other",
        "clusters), judged by the ground truth (used only to score). Cluster s: the clustering step",
        "of the clean stage (COLMAP: features, matching, verification, mapping), then the whole stage.",
        "",
        "| dataset | clusters from | clusters | clustered images | largest | purity % | ARI | tuples | "
        "positives % | negatives % | cluster s | 3-D |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    return write_markdown(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
