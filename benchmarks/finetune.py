"""Fine-tuning benchmark: off-the-shelf vs fine-tuned mAP, and training throughput.

For each collection (the database images of a benchmark, used as an unlabeled collection):
1. ingest: a manifest of the database images (no labels, no queries);
2. clean (raytrieval.mining.stages): kNN pairs -> spatial verification -> clusters;
   mine: manifold tuples (Iscen et al. 2018) from the off-the-shelf descriptors;
3. fine-tune with Ray Train (2 workers) for every (pairs, loss) in
   {clusters, manifold tuples} x {contrastive, triplet}; negatives re-mined every epoch;
4. report validation mAP E/M/H on the benchmark: epoch 0 (off-the-shelf) and the last epoch.

Throughput: the same epoch (same tuples, mined with the initial model) timed as a plain
single-process PyTorch loop and through Ray Train with 1 and 2 workers, in the same run.

    .venv/bin/python benchmarks/finetune.py                       # everything (hours on 2 busy cores)
    .venv/bin/python benchmarks/finetune.py --only throughput
    .venv/bin/python benchmarks/finetune.py --smoke-test          # minutes: tiny settings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raytrieval.cluster.runtime import apply_offline_env, init_ray  # noqa: E402

VARIANTS = [("clusters", "contrastive"), ("clusters", "triplet"), ("manifold", "contrastive"), ("manifold", "triplet")]


def collection_dir(out: Path, dataset: str) -> Path:
    return out / dataset


def prepare(dataset: str, data_root: Path, out: Path, workers: int) -> dict[str, Any]:
    """Manifest of the benchmark's database images, clusters and manifold tuples."""
    from raytrieval.evaluation.datasets import load_benchmark
    from raytrieval.mining.stages import CleanConfig, MineConfig, clean, mine
    from raytrieval.retrieval.manifest import build_manifest, write_manifest
    from raytrieval.retrieval.model import ModelSpec

    if dataset == "demo":
        from raytrieval.evaluation.demo import generate_demo

        generate_demo(data_root)
    bench = load_benchmark(dataset, data_root)
    run_dir = collection_dir(out, dataset)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = run_dir / "images.parquet"
    if not manifest.is_file():
        write_manifest(build_manifest(bench.images, progress=False), manifest)
    model = ModelSpec(max_size=512)
    t0 = time.perf_counter()
    cleaned = clean(CleanConfig(run_dir=str(run_dir), model=model, workers=workers, progress=False))
    t_clean = time.perf_counter() - t0
    t0 = time.perf_counter()
    # a few hundred images: a sparser graph than Iscen et al.'s k=30 (which leaves ~8 anchors here)
    # and several positives per anchor
    mined = mine(MineConfig(run_dir=str(run_dir), method="manifold", model=model, workers=workers,
                            k=5, k_euclidean=20, k_manifold=20, positives_per_anchor=5,
                            out=str(run_dir / "tuples_manifold.parquet")))
    return {
        "images": bench.num_images, "queries": bench.num_queries,
        "clean": cleaned["counts"], "clean_s": t_clean,
        "manifold": mined["counts"], "mine_s": time.perf_counter() - t0,
        "quality": tuple_quality(bench, run_dir),
    }


def tuple_quality(bench, run_dir: Path) -> dict[str, Any]:
    """How right the unsupervised pairs are, judged with the benchmark's ground truth (analysis only).

    Two database images count as the same landmark when some query lists both as positives
    (easy or hard), as different when both are listed by some query but never by the same one;
    other pairs are not judged. Epoch-1 negatives are mined as the trainer does, with the
    off-the-shelf descriptors of the clean stage.
    """
    import numpy as np

    from raytrieval.mining.cleaning import read_clusters
    from raytrieval.mining.stages import read_descriptors
    from raytrieval.mining.tuples import read_tuples
    from raytrieval.mining.tuples import build_tuples, plan_epoch
    from raytrieval.trainers.data import load_training_set

    ids, X, _ = read_descriptors(run_dir / "descriptors.parquet")
    names = [Path(p).stem for p in bench.images]
    index = {n: i for i, n in enumerate(names)}
    marks: list[set[int]] = [set() for _ in names]
    for qi, g in enumerate(bench.gnd):
        for i in np.concatenate([g["easy"], g["hard"]]):
            marks[int(i)].add(qi)
    # queries of the same landmark share positives: merge them into landmarks
    parent = list(range(len(bench.gnd)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for m in marks:
        m = sorted(m)
        for a, b in zip(m, m[1:]):
            parent[find(a)] = find(b)
    landmark = [({find(q) for q in m} or None) for m in marks]

    def judge(a: int, b: int) -> str:
        la, lb = landmark[a], landmark[b]
        if la is None or lb is None:
            return "unknown"
        return "same" if la & lb else "different"

    def tally(pairs) -> dict[str, int]:
        out = {"same": 0, "different": 0, "unknown": 0}
        for a, b in pairs:
            out[judge(a, b)] += 1
        return out

    clusters = read_clusters(run_dir / "clusters.parquet")
    labels = {index[i]: c for i, c in zip(clusters.column("image_id").to_pylist(), clusters.column("cluster_id").to_pylist())}
    members: dict[int, list[int]] = {}
    for i, c in labels.items():
        members.setdefault(c, []).append(i)
    cluster_pairs = [(a, b) for m in members.values() for k, a in enumerate(m) for b in m[k + 1:]]
    tuples = read_tuples(run_dir / "tuples_manifold.parquet")
    q = [index[i] for i in tuples.column("query").to_pylist()]
    p = [index[i] for i in tuples.column("positive").to_pylist()]
    negs = [[index[i] for i in row] for row in tuples.column("negatives").to_pylist()]
    out = {
        "landmarks": len({find(i) for i in range(len(bench.gnd))}),
        "cluster_pairs": tally(cluster_pairs),
        "manifold_positives": tally(zip(q, p)),
        "manifold_negatives": tally((a, n) for a, row in zip(q, negs) for n in row),
    }
    # epoch-1 hard negatives of the clusters variant, mined as the trainer mines them
    from raytrieval.trainers.config import TrainConfig

    cfg = TrainConfig(manifest=str(run_dir / "images.parquet"), clusters=str(run_dir / "clusters.parquet"),
                      num_queries=10_000, pool_size=10_000, val_dataset=None)
    ts = load_training_set(cfg)
    assert [Path(p).stem for p in ts.paths] == ids
    plan = plan_epoch(ts, cfg.tuple_rules(), epoch=1)
    mined = build_tuples(ts, cfg.tuple_rules(), plan, X[plan.embed], 1)
    out["cluster_hard_negatives"] = tally((int(r[0]), int(n)) for r in mined for n in r[2:] if n >= 0)
    return out


def train_config(dataset: str, data_root: Path, out: Path, pairs: str, loss: str, args: argparse.Namespace, **kw):
    from raytrieval.trainers.config import TrainConfig

    run_dir = collection_dir(out, dataset)
    common = dict(
        manifest=str(run_dir / "images.parquet"), clusters=str(run_dir / "clusters.parquet"),
        num_queries=args.queries, pool_size=args.pool, num_negatives=args.negatives,
        image_size=args.image_size, max_size=512, loss=loss, lr=args.lr, epochs=args.epochs,
        batch_size=args.batch, val_every=args.val_every, val_dataset=dataset, val_data_root=str(data_root), workers=args.workers,
        out=str(out / "runs"), name=f"{dataset}-{pairs}-{loss}-{args.tag}", tracking_uri=f"sqlite:///{out / 'mlflow.db'}",
        experiment="finetune-benchmark", registered_model=None,
    )
    if loss == "contrastive":
        common["margin"] = args.margin
    if pairs == "clusters":
        common.update(pairs="clusters", negatives="pool")
        if args.exclude_knn:
            common.update(knn=str(run_dir / "knn.parquet"), exclude_knn=args.exclude_knn)
    else:  # manifold tuples alone (no cleaning): pairs from the file, its negatives re-ranked by
        # the current model; the connected components of the query-positive pairs label the images
        common.update(pairs="tuples", tuples=str(run_dir / "tuples_manifold.parquet"), clusters=None,
                      negatives="listed")
    common.update(kw)
    return TrainConfig(**common)


def finetune(dataset: str, data_root: Path, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from raytrieval.trainers.fit import fit

    rows = []
    for pairs, loss in [tuple(v.split("/")) for v in args.variants.split(",")]:
        cfg = train_config(dataset, data_root, out, pairs, loss, args)
        t0 = time.perf_counter()
        result = fit(cfg)
        seconds = time.perf_counter() - t0
        h = result.history
        best = max([r for r in h[1:] if "val_map_medium" in r] or h[:1], key=lambda r: r["val_map_medium"])
        rows.append({
            "dataset": dataset, "pairs": pairs, "loss": loss, "margin": cfg.margin, "epochs": cfg.epochs,
            "exclude_knn": cfg.exclude_knn,
            "tuples_per_epoch": h[-1].get("tuples"), "fit_s": seconds,
            "off_the_shelf": {p: h[0][f"val_map_{p}"] for p in ("easy", "medium", "hard")},
            "final": {p: h[-1][f"val_map_{p}"] for p in ("easy", "medium", "hard")},
            "best_epoch": best["epoch"], "best": {p: best[f"val_map_{p}"] for p in ("easy", "medium", "hard")},
            "history": h,
        })
        print(f"{dataset} {pairs}/{loss}: off-the-shelf M {100 * h[0]['val_map_medium']:.1f} -> "
              f"final M {100 * h[-1]['val_map_medium']:.1f} ({seconds:.0f} s)", flush=True)
    return rows


def throughput(dataset: str, data_root: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same first epoch (same tuples, mined with the initial model) timed four ways, in turn:
    a plain single-process loop with 1 thread, Ray Train with 1 worker x 1 CPU and 2 workers x
    1 CPU (1 thread each), and the plain loop with 2 threads. Only the training steps are timed
    (`tuples_per_s` of `train_epoch`), not mining, startup or checkpoints. The load average is
    recorded around each measurement: other jobs on the machine change the figures."""
    import torch

    from raytrieval.trainers.data import ImageStore, load_training_set
    from raytrieval.trainers.fit import fit
    from raytrieval.trainers.loop import TupleNet, build_optimizer, mine_epoch, new_model, train_epoch

    base = dict(val_dataset=None, epochs=1, num_queries=args.tp_queries)
    cfg = train_config(dataset, data_root, out, "clusters", "contrastive", args, **base)
    ts = load_training_set(cfg)
    rows: dict[str, Any] = {}

    def plain(threads: int) -> None:
        torch.set_num_threads(threads)
        model = new_model(cfg)
        store = ImageStore(ts.paths, cfg.image_size)
        tuples, _ = mine_epoch(model, store, ts, cfg, epoch=1)
        optimizer, _ = build_optimizer(model, cfg)
        load = os.getloadavg()[0]
        stats = train_epoch(TupleNet(model), model, store, tuples, cfg, optimizer, epoch=1)
        rows[f"plain_{threads}thread"] = {"tuples_per_s": stats["tuples_per_s"], "tuples": stats["tuples"],
                                          "load": [load, os.getloadavg()[0]]}
        print(f"plain loop, {threads} thread(s): {stats['tuples_per_s']:.2f} tuples/s", flush=True)

    def ray_train(workers: int) -> None:
        run_cfg = cfg.with_overrides(workers=workers, cpus_per_worker=1,
                                     name=f"throughput-{dataset}-{workers}w-{int(time.time())}")
        load = os.getloadavg()[0]
        h = fit(run_cfg, track=False).history
        rows[f"ray_{workers}worker"] = {"tuples_per_s": h[1]["tuples_per_s"], "tuples": h[1]["tuples"],
                                        "load": [load, os.getloadavg()[0]]}
        print(f"Ray Train, {workers} worker(s) x 1 CPU: {h[1]['tuples_per_s']:.2f} tuples/s", flush=True)

    plain(1)
    ray_train(1)
    ray_train(2)
    plain(2)
    return rows


def machine() -> dict[str, Any]:
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "torch": torch.__version__,
        "cpus": os.cpu_count(), "platform": platform.platform(), "gpu": torch.cuda.is_available(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="rparis6k-mini,demo")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--demo-root", default=str(ROOT / "runs" / "data"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "finetune"))
    p.add_argument("--only", choices=("finetune", "throughput"), default=None)
    p.add_argument("--variants", default=",".join(f"{a}/{b}" for a, b in VARIANTS),
                   help="comma-separated pairs/loss, e.g. clusters/triplet,manifold/contrastive")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--val-every", type=int, default=4, help="validate every this many epochs (0 and last always)")
    p.add_argument("--queries", type=int, default=80, help="tuples per epoch")
    p.add_argument("--pool", type=int, default=400)
    p.add_argument("--negatives", type=int, default=5)
    p.add_argument("--exclude-knn", type=int, default=0,
                   help="clusters variants: no negative from clusters linked by this many kNN neighbours")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--margin", type=float, default=0.7, help="contrastive margin")
    p.add_argument("--batch", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tp-queries", type=int, default=40, help="tuples of the throughput epoch")
    p.add_argument("--tag", default="v1", help="suffix of the run names (an existing name is resumed)")
    p.add_argument("--smoke-test", action="store_true", help="1 epoch, 10 tuples, 128 px")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.epochs, args.queries, args.image_size, args.tp_queries, args.pool = 1, 10, 128, 10, 100
    apply_offline_env()
    init_ray(num_cpus=os.cpu_count())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("invocations", []).append({"machine": machine(), "args": vars(args)})
    for dataset in [d for d in args.datasets.split(",") if d]:
        root = Path(args.demo_root if dataset == "demo" else args.data_root)
        entry = results.setdefault(dataset, {})
        entry["collection"] = prepare(dataset, root, out, args.workers)
        print(f"{dataset}: {json.dumps(entry['collection'])}", flush=True)
        if args.only in (None, "finetune"):
            rows = {(r["pairs"], r["loss"]): r for r in entry.get("finetune", [])}
            rows.update({(r["pairs"], r["loss"]): r for r in finetune(dataset, root, out, args)})
            entry["finetune"] = [rows[v] for v in VARIANTS if v in rows]
        if args.only in (None, "throughput") and dataset == args.datasets.split(",")[0]:
            entry["throughput"] = throughput(dataset, root, out, args)
        results_path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
