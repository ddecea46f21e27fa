"""Mining without labels, scored against ground truth: verified pairs, clusters, mined tuples,
and the throughput of the Ray pools (verification with 1 and 2 actors, embedding vs a loop).

    .venv/bin/python benchmarks/mining.py --data-root ../shared/data --out benchmarks/mining.md

For each benchmark the database images become a collection (manifest of file stems) in
`runs/bench-mining/<name>/`; `clean` (Ray, 2 actors) and `mine` (every method) run on it
exactly as the CLI does. The ground truth is used only to score:

- revisitop sets (rparis6k-mini, demo): two database images are "same landmark" when they
  appear together in some query's easy + hard lists; landmark labels for purity / ARI are the
  connected components of that relation, images in no list are singletons.
- ukbench-56: same group of 4.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `mining` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from benchmarks.baseline import machine, write_markdown  # noqa: E402
from raytrieval.cluster.runtime import init_ray  # noqa: E402
from raytrieval.evaluation.datasets import Benchmark, load_benchmark  # noqa: E402
from raytrieval.mining.cleaning import candidate_pairs, connected_clusters, match_arrays, read_matches  # noqa: E402
from raytrieval.mining.stages import CleanConfig, MineConfig, clean, mine_indices, read_descriptors  # noqa: E402
from raytrieval.mining.embed import embed_images  # noqa: E402
from raytrieval.mining.verify import VerifyConfig, locality_order, verify_pairs  # noqa: E402
from raytrieval.retrieval.extract import extract_descriptors  # noqa: E402
from raytrieval.retrieval.knn import knn_graph  # noqa: E402
from raytrieval.retrieval.manifest import build_manifest, write_manifest  # noqa: E402
from raytrieval.retrieval.model import ModelSpec, RetrievalNet  # noqa: E402

THRESHOLDS = (10, 15, 20, 25, 30, 40, 60)


class Truth:
    """Ground-truth relation over database indices."""

    def __init__(self, bench: Benchmark):
        n = bench.num_images
        if bench.groups is not None:
            self.labels = np.asarray(bench.groups, np.int64)
            same = self.labels[:, None] == self.labels[None, :]
        else:
            same = np.zeros((n, n), bool)
            for g in bench.gnd:
                members = np.union1d(g["easy"], g["hard"]).astype(np.int64)
                same[np.ix_(members, members)] = True
            from scipy.sparse import csr_matrix
            from scipy.sparse.csgraph import connected_components

            _, self.labels = connected_components(csr_matrix(same), directed=False)
        np.fill_diagonal(same, False)
        self.same = same  # (N, N) bool

    def positive_pairs(self) -> int:
        return int(np.triu(self.same, 1).sum())


def purity(pred: np.ndarray, gt: np.ndarray) -> float:
    """Share of clustered images carrying their cluster's majority ground-truth label."""
    clustered = pred >= 0
    if not clustered.any():
        return float("nan")
    total = 0
    for c in np.unique(pred[clustered]):
        total += np.bincount(gt[pred == c]).max()
    return total / int(clustered.sum())


def ari(pred: np.ndarray, gt: np.ndarray) -> float:
    """Adjusted Rand index over all images; unclustered images are singletons."""
    full = pred.copy()
    lonely = np.flatnonzero(full < 0)
    full[lonely] = full.max(initial=-1) + 1 + np.arange(lonely.size)
    return float(adjusted_rand_score(gt, full))


def tuple_scores(truth: Truth, q: np.ndarray, p: np.ndarray, neg: np.ndarray) -> tuple[int, float, float]:
    """(tuples, share of true positives, share of true negatives among the negatives)."""
    if q.size == 0:
        return 0, float("nan"), float("nan")
    pos_ok = truth.same[q, p].mean()
    rows, cols = np.nonzero(neg >= 0)
    neg_ok = (~truth.same[q[rows], neg[rows, cols]]).mean() if rows.size else float("nan")
    return int(q.size), float(pos_ok), float(neg_ok)


def f(x: float, pct: bool = True) -> str:
    return "n/a" if x != x else (f"{100 * x:.1f}" if pct else f"{x:.2f}")


def run_dataset(name: str, bench: Benchmark, work: Path, args) -> dict[str, list[str]]:
    run = work / name
    run.mkdir(parents=True, exist_ok=True)
    ids = [Path(p).stem for p in bench.images]
    write_manifest(build_manifest(dict(zip(ids, bench.images)), progress=False), run / "images.parquet")
    truth = Truth(bench)
    spec = ModelSpec(max_size=args.max_size, pooling_kwargs={"p": 3.0})
    verify_cfg = VerifyConfig(max_features=args.max_features)
    for stale in ("descriptors.parquet", "matches.parquet"):  # measure, never reuse
        (run / stale).unlink(missing_ok=True)
    n = len(ids)

    # clean through Ray, 2 actors: embedding + verification timings come from its record
    record = clean(CleanConfig(
        run_dir=str(run), model=spec, workers=2, k=args.k, verify=verify_cfg, min_inliers=args.min_inliers,
        progress=False,
    ))
    tm = record["timings"]
    out: dict[str, list[str]] = {"throughput": [], "pairs": [], "tuples": [], "facts": []}

    desc_ids, X, _ = read_descriptors(run / "descriptors.parquet")
    assert desc_ids == ids

    # verified pairs against the ground truth, for several inlier thresholds
    m = match_arrays(read_matches(run / "matches.parquet"), ids)
    is_pos = truth.same[m.a, m.b]
    all_pos = truth.positive_pairs()
    out["facts"].append(
        f"| {name} | {n} | {len(m)} | {int(is_pos.sum())} ({f(is_pos.mean())}%) | {all_pos} | "
        f"{record['counts']['skipped']} |"
    )
    for thr in THRESHOLDS:
        ver = m.inliers >= thr
        tp = int((ver & is_pos).sum())
        labels = connected_clusters(n, m.a, m.b, m.inliers, thr, 2)
        out["pairs"].append(
            f"| {name} | {thr} | {int(ver.sum())} | {f(tp / max(ver.sum(), 1))} | {f(tp / max(is_pos.sum(), 1))} | "
            f"{f(tp / max(all_pos, 1))} | {int(labels.max()) + 1} | {int((labels >= 0).sum())} | "
            f"{f(purity(labels, truth.labels))} | {f(ari(labels, truth.labels), pct=False)} |"
        )

    if args.cleaning_only:
        print("\n".join(sum(out.values(), [])), flush=True)
        return out


    # embedding throughput on a subset, interleaved repeats, best of: plain loop vs Ray pool
    sub = bench.images[: args.throughput_images]
    best = {"plain": np.inf, "ray": np.inf}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain = extract_descriptors(RetrievalNet(spec).eval(), sub, max_size=args.max_size, progress=False)
        best["plain"] = min(best["plain"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        pooled = embed_images(spec.to_dict(), sub, max_size=args.max_size, workers=2, progress=False)
        best["ray"] = min(best["ray"], time.perf_counter() - t0)
        np.testing.assert_allclose(pooled.descriptors, plain, atol=1e-4)
    np.testing.assert_allclose(X[: len(sub)], plain, atol=1e-4)  # the stage embedded the same way
    out["throughput"].append(
        f"| {name} | embed | plain PyTorch loop (torch threads={torch.get_num_threads()}), model build incl. | "
        f"{len(sub)} images | {len(sub) / best['plain']:.2f} img/s | 1.00 |"
    )
    out["throughput"].append(
        f"| {name} | embed | Ray pool, 2 actors, actor start + model load incl. | {len(sub)} images | "
        f"{len(sub) / best['ray']:.2f} img/s | {best['plain'] / best['ray']:.2f} |"
    )
    out["throughput"].append(
        f"| {name} | embed | (inside `clean`: Ray pool, 2 actors, whole collection, once) | {n} images | "
        f"{n / tm['embed_s']:.2f} img/s | |"
    )

    # verification throughput on the same candidate pairs (a locality-ordered run of them)
    _, nbrs = knn_graph(X, min(args.k, n - 1))
    pairs = locality_order([(ids[i], ids[j]) for i, j in candidate_pairs(nbrs)])
    pairs = pairs[: args.throughput_pairs] if args.throughput_pairs else pairs
    paths = dict(zip(ids, bench.images))
    rates: dict[int, tuple[float, int, float, float]] = {}
    for _ in range(args.repeats):
        for workers in (0, 1, 2):
            res = verify_pairs(pairs, paths, run / f".throughput-{workers}.parquet", verify_cfg, workers=workers,
                               progress=False)
            if workers not in rates or res.pairs_per_second > rates[workers][0]:
                rates[workers] = (res.pairs_per_second, res.extracted, res.steady_pairs_per_second,
                                  res.first_result_s)
            os.unlink(run / f".throughput-{workers}.parquet")
    base, steady_base = rates[0][0], rates[0][2]
    n_img = len({x for p in pairs for x in p})
    labels = {0: "in-process loop (no Ray)", 1: "Ray pool, 1 actor, actor start incl.",
              2: "Ray pool, 2 actors, actor start incl."}
    for workers, label in labels.items():
        rate, extracted, steady, first_s = rates[workers]
        out["throughput"].append(
            f"| {name} | verify | {label} | {len(pairs)} pairs over {n_img} images, "
            f"{extracted} feature extractions | {rate:.1f} pairs/s | {rate / base:.2f} |"
        )
        out["throughput"].append(
            f"| {name} | verify | {label.split(',')[0]}, after the first result ({first_s:.1f} s) | same | "
            f"{steady:.1f} pairs/s | {steady / steady_base:.2f} |"
        )
    out["throughput"].append(
        f"| {name} | verify | (inside `clean`: 2 actors, all pairs, once) | {record['counts']['candidate_pairs']} "
        f"pairs, {int(tm['feature_extractions'])} feature extractions | {tm['pairs_per_s']:.1f} pairs/s | |"
    )

    # tuples per method (labels from the clean stage at --min-inliers)
    methods = [
        ("sfm", dict(positive="inliers")),
        ("sfm", dict(positive="descriptor")),
        ("sfm", dict(positive="random", tau=args.min_inliers)),
        ("sfm", dict(positive="inliers", exclude_knn=0)),
        ("hardneg", dict(positive="inliers")),
        ("hardneg", dict(positive="descriptor")),
        ("hardneg", dict(positive="inliers", exclude_knn=0)),
        ("hardneg", dict(positive="inliers", exclude_knn=20)),
        ("manifold", dict()),
        ("manifold", dict(k=10, k_euclidean=20, k_manifold=20)),
        ("manifold", dict(k=5, k_euclidean=10, k_manifold=10)),
    ]
    for method, kw in methods:
        cfg = MineConfig(run_dir=str(run), method=method, tau=kw.pop("tau", args.min_inliers), num_negatives=5, **kw)
        q, p, neg = mine_indices(cfg, ids, X)
        t, pos_ok, neg_ok = tuple_scores(truth, q, p, neg)
        desc = (f"positive={cfg.positive}, exclude_knn={cfg.exclude_knn}" if method != "manifold"
                else f"k={cfg.k}, NN^e={cfg.k_euclidean}, NN^m={cfg.k_manifold}")
        out["tuples"].append(f"| {name} | {method} | {desc} | {t} | {f(pos_ok)} | {f(neg_ok)} |")
    # reference: Euclidean nearest neighbour as positive, 5 random other images as negatives
    sims = X @ X.T
    np.fill_diagonal(sims, -np.inf)
    q = np.arange(n)
    rng = np.random.default_rng(0)
    neg = np.stack([rng.choice(np.delete(np.arange(n), i), 5, replace=False) for i in range(n)])
    t, pos_ok, neg_ok = tuple_scores(truth, q, np.argmax(sims, axis=1), neg)
    out["tuples"].append(f"| {name} | (reference) | descriptor top-1 positive, random negatives | {t} | "
                         f"{f(pos_ok)} | {f(neg_ok)} |")
    print("\n".join(sum(out.values(), [])), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--demo-root", default="runs/data")
    parser.add_argument("--datasets", default="rparis6k-mini,ukbench-56,demo")
    parser.add_argument("--work", default="runs/bench-mining")
    parser.add_argument("--max-size", type=int, default=512, help="longer side for global descriptors")
    parser.add_argument("--max-features", type=int, default=1000, help="SIFT keypoints per image")
    parser.add_argument("--k", type=int, default=10, help="candidate neighbours per image")
    parser.add_argument("--min-inliers", type=int, default=15)
    parser.add_argument("--throughput-images", type=int, default=64, help="images of the embedding comparison")
    parser.add_argument("--throughput-pairs", type=int, default=1000, help="pairs of the verification comparison")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best is reported")
    parser.add_argument("--smoke-test", action="store_true", help="ukbench-56 only")
    parser.add_argument("--cleaning-only", action="store_true",
                        help="verified pairs and clusters only (no throughput, no tuples)")
    parser.add_argument("--out", default="benchmarks/mining.md")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.datasets, args.throughput_images, args.throughput_pairs, args.repeats = "ukbench-56", 16, 100, 1

    # Ray runs its workers at niceness 15 (the driver at 0): on a machine shared with other jobs
    # the actors would lose the CPU to them and the in-process loop would not. Same footing here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray(num_cpus=os.cpu_count())
    sections: dict[str, list[str]] = {"throughput": [], "pairs": [], "tuples": [], "facts": []}
    started = time.perf_counter()
    for name in args.datasets.split(","):
        if name == "demo":
            from raytrieval.evaluation.demo import generate_demo

            generate_demo(Path(args.demo_root))
        bench = load_benchmark(name, args.demo_root if name == "demo" else args.data_root)
        for key, rows in run_dataset(name, bench, Path(args.work), args).items():
            sections[key] += rows
    minutes = (time.perf_counter() - started) / 60

    lines = [
        "# Mining without labels: cleaning, hard negatives, manifolds",
        "",
        f"Measured {dt.date.today()} on {machine()}; the whole script took {minutes:.1f} min.",
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores); on a shared",
        "machine the throughputs are indicative, the ratios measured in the same run are the meaningful part.",
        f"Ray workers ran at niceness {os.environ.get('RAY_worker_niceness')} like the driver (Ray's default for workers is",
        "15: on a busy shared machine the actors then lose the CPU to every other job).",
        "",
        f"Command: `.venv/bin/python benchmarks/mining.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "Collection = the benchmark's database images (no queries). Global descriptors:",
        f"EfficientNet-Lite0 ImageNet, GeM p=3, longer side {args.max_size}. Candidate pairs: top-{args.k}",
        f"kNN graph, undirected. Verification: RootSIFT (up to {args.max_features} keypoints), Lowe ratio",
        "0.8, homography by MAGSAC++ (4 px). Ground truth only scores (see the module docstring).",
        "",
        "## Collections",
        "",
        "| dataset | images | candidate pairs | of them same landmark | same-landmark pairs in all | skipped |",
        "|---|---|---|---|---|---|",
        *sections["facts"],
        "",
        "## Verified pairs and clusters by inlier threshold",
        "",
        "Precision: share of verified pairs that are same-landmark. Recall (cand.): of the",
        "same-landmark candidate pairs; recall (all): of all same-landmark pairs of the collection.",
        "Clusters: connected components of the verified pairs, at least 2 images. Purity: share",
        "of clustered images with their cluster's majority landmark; ARI over all images",
        "(unclustered = singletons).",
        "",
        "| dataset | min inliers | verified | precision % | recall (cand.) % | recall (all) % | clusters | "
        "clustered images | purity % | ARI |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *sections["pairs"],
        "",
        f"## Mined tuples (clusters at min inliers {args.min_inliers}; 5 negatives per tuple)",
        "",
        "Positives %: tuples whose positive is the same landmark as the query. Negatives %: mined",
        "negatives that are not (true negatives). sfm = random negatives from other clusters,",
        "hardneg = hardest by descriptor from other clusters (one per cluster), manifold = Iscen",
        "et al. 2018 (anchors = local maxima of the random-walk stationary distribution).",
        "",
        "| dataset | method | setting | tuples | positives % | negatives % |",
        "|---|---|---|---|---|---|",
        *sections["tuples"],
        "",
        "## Throughput (same run)",
        "",
        f"Best of {args.repeats} interleaved repeats. Embedding: the first {args.throughput_images} images of",
        f"each collection. Verification: the first {args.throughput_pairs or 'all'} candidate pairs in locality order",
        "(a contiguous run, as the pool cuts them); the rate includes starting the actors and computing",
        "the local features (every actor describes the images it meets: the extraction count shows how",
        "many images were described more than once). 'After the first result' excludes the time to",
        "the first task's result (actor start, imports, first images), i.e. warm actors. The rows",
        "marked 'inside clean' are single measurements of the whole collection during the stage.",
        "",
        "| dataset | step | path | work | rate | ratio to plain loop |",
        "|---|---|---|---|---|---|",
        *sections["throughput"],
        "",
    ]
    if args.cleaning_only:
        lines = lines[:next(i for i, line in enumerate(lines) if line.startswith("## Mined tuples"))]
    return write_markdown(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
