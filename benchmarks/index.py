"""Index benchmark: the faiss index family at 100k and 1M realistic descriptors, rparis6k-mini among
a million distractors, and `kind: auto` under a memory budget; written to benchmarks/index.md.

    .venv/bin/python benchmarks/index.py --data-root ../shared/data --out benchmarks/index.md

Descriptors: the default model (EfficientNet-Lite0 GeM, 1280-d) embeds rparis6k-mini and random
crops / flips / colour changes of the photos shipped in the installed wheels (the demo's
sources); PCA learned on the crops (no labels) reduces everything to `--dim`. Distractors are
drawn in local PCA subspaces of the crop descriptors (a random crop, its nearest crops, their
mean and top principal directions, Gaussian coefficients with their variances, a little
isotropic noise). Nearest-neighbour similarity histograms compare them with the real ones.
Recall is against exact search on held-out generated queries; mAP is scored on the 19 real
queries over rparis6k-mini's 397 images plus the distractors, from the top `--map-k` results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.baseline import machine, write_markdown  # noqa: E402
from raytrieval.cluster.runtime import apply_offline_env  # noqa: E402

apply_offline_env()

from raytrieval.evaluation.datasets import load_benchmark  # noqa: E402
from raytrieval.retrieval.faiss_index import build_index  # noqa: E402
from raytrieval.retrieval.index_select import recall_at_k, select_index  # noqa: E402
from raytrieval.retrieval.knn import search as exact_search  # noqa: E402
from raytrieval.serving.index import IndexConfig, spec_for  # noqa: E402

# (row name, IndexConfig fields); nprobe / ef / k_factor are fixed, not tuned on the benchmark
KINDS = [
    ("flat (exact)", {"kind": "flat"}),
    ("LSH 1024 bits + re-rank fp16", {"kind": "lsh", "lsh_bits": 1024, "refine": "fp16", "k_factor": 16}),
    ("PQ32", {"kind": "pq", "pq_m": 32}),
    ("IVF-Flat", {"kind": "ivfflat", "nprobe": 16}),
    ("IVF-PQ32 (IVFADC)", {"kind": "ivfpq", "pq_m": 32, "nprobe": 32}),
    ("IVF-PQ64 (IVFADC)", {"kind": "ivfpq", "pq_m": 64, "nprobe": 32}),
    ("IMI2x10-PQ32", {"kind": "imi", "pq_m": 32, "nprobe": 2048}),
    ("OPQ64 + IVF-PQ64", {"kind": "opq", "pq_m": 64, "nprobe": 32}),
    ("OPQ16 + IVF-PQ16 + re-rank SQ8", {"kind": "opq", "pq_m": 16, "nprobe": 32, "refine": "sq8", "k_factor": 8}),
    ("HNSW32", {"kind": "hnsw", "ef_search": 64}),
    ("IVF-RaBitQ4", {"kind": "rabitq", "nprobe": 32}),
    ("IVF-RaBitQ5", {"kind": "rabitq", "rabitq_bits": 5, "nprobe": 32}),
]


def photo_crops(n: int, seed: int) -> list:
    """`n` random crops, flips and colour changes of the wheel photos, as PIL images."""
    from PIL import Image, ImageEnhance

    from raytrieval.evaluation.demo import load_sources

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)) for a in load_sources().values()
              if a.ndim == 3]
    out = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        w, h = img.size
        f = rng.uniform(0.25, 1.0)
        cw, ch = max(32, int(w * f * rng.uniform(0.7, 1.0))), max(32, int(h * f * rng.uniform(0.7, 1.0)))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.5, 1.5))
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
        out.append(crop.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR))
    return out


def pca(X: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), projection (D, dim)) of X."""
    mean = X.mean(axis=0)
    _, _, vt = np.linalg.svd(X - mean, full_matrices=False)
    return mean, vt[:dim].T


def project(X: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    Y = (X - mean) @ proj
    return np.ascontiguousarray(Y / np.linalg.norm(Y, axis=1, keepdims=True), dtype=np.float32)


def local_pca_sampler(seeds: np.ndarray, n: int, rng: np.random.Generator, neighbours: int = 12, rank: int = 8,
                      noise: float = 0.25, chunk: int = 100_000) -> np.ndarray:
    """(n, D) unit vectors sampled in the local PCA subspaces of `seeds` (see the module docstring)."""
    sims = seeds @ seeds.T
    nn = np.argsort(-sims, axis=1)[:, :neighbours]  # (S, m), self first
    means, bases, sds, iso = [], [], [], []
    for row in nn:
        local = seeds[row]
        mu = local.mean(axis=0)
        _, s, vt = np.linalg.svd(local - mu, full_matrices=False)
        means.append(mu)
        bases.append(vt[:rank])
        sds.append(s[:rank] / np.sqrt(neighbours - 1))
        iso.append(noise * (s[rank:] ** 2).sum() ** 0.5 / np.sqrt(neighbours * seeds.shape[1]) + 1e-3)
    means, bases, sds, iso = np.stack(means), np.stack(bases), np.stack(sds), np.array(iso)
    out = np.empty((n, seeds.shape[1]), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        pick = rng.integers(0, len(seeds), m)
        z = rng.standard_normal((m, rank)).astype(np.float32) * sds[pick]
        x = means[pick] + np.einsum("mr,mrd->md", z, bases[pick]) + rng.standard_normal((m, seeds.shape[1])).astype(
            np.float32) * iso[pick, None]
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def nn_similarity(X: np.ndarray) -> np.ndarray:
    """Each row's largest cosine with another row."""
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    return S.max(axis=1)


def plot_histograms(series: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 51)
    for name, values in series.items():
        ax.hist(values, bins=bins, histtype="step", density=True, linewidth=1.5, label=name)
    ax.set_xlabel("cosine similarity to the nearest neighbour (within the set)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timed_search(index, Q: np.ndarray, k: int, one_by_one: int) -> tuple[np.ndarray, float, float]:
    """(labels of the batched search, ms/query one query at a time on 1 thread, ms/query batched)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    start = time.perf_counter()
    for q in Q[:one_by_one]:
        index.search(q[None], k)
    single = (time.perf_counter() - start) * 1e3 / one_by_one
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    _, labels = index.search(Q, k)
    batched = (time.perf_counter() - start) * 1e3 / len(Q)
    return labels, single, batched


def map_rows(bench, qvec: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(Medium, Hard) mAP in % of a truncated ranking (labels >= Ndb are distractors)."""
    res = bench.evaluate(labels)
    return 100 * res["medium"]["map"], 100 * res["hard"]["map"]


def measure_kind(X, labels, ispec, cfg, gen_queries, qv, bench, gt, flat_ms, args):
    """Build one index and measure it: (labels, ms 1-thread, r@1, r@10, ms batched, bytes, build s, mAPs)."""
    t0 = time.perf_counter()
    index = build_index(X, labels, ispec, train_size=cfg.train_size, ef_construction=cfg.ef_construction)
    build_s = time.perf_counter() - t0
    index.configure(nprobe=cfg.nprobe, ef_search=cfg.ef_search, k_factor=cfg.k_factor, use_gpu=False)
    found, single, batched = timed_search(index, gen_queries, 10, args.one_by_one)
    r1 = float(np.mean(found[:, 0] == gt[:, 0])) if gt is not None else 1.0
    r10 = recall_at_k(found, gt) if gt is not None else 1.0
    bpv = index.bytes_per_vector()
    _, ranked = index.search(qv, args.map_k)
    med, hard = map_rows(bench, qv, ranked)
    return found, single, r1, r10, batched, bpv, build_s, med, hard


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(_HERE.parent.parent / "shared" / "data"))
    p.add_argument("--out", default=str(_HERE / "index.md"))
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--crops", type=int, default=600)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--skip-1m", default="HNSW32,IVF-Flat", help="rows left out at the largest size (build time)")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--one-by-one", type=int, default=100)
    p.add_argument("--map-k", type=int, default=100)
    p.add_argument("--budget", type=float, default=100.0, help="auto: bytes per vector")
    p.add_argument("--recall-target", type=float, default=0.95)
    p.add_argument("--auto-sizes", default="10000,100000,1000000", help="'' for no auto section")
    p.add_argument("--kinds", default=None, help="only these rows (comma-separated names; flat always runs first)")
    p.add_argument("--max-size", type=int, default=None, help="extraction max side (default: the model's)")
    p.add_argument("--train-size", type=int, default=50_000, help="vectors that train the quantizers")
    args = p.parse_args(argv)
    t_all = time.perf_counter()
    load = os.getloadavg()
    sizes = [int(s) for s in args.sizes.split(",")]
    skip_big = set(args.skip_1m.split(",")) if args.skip_1m else set()
    auto_sizes = [int(s) for s in args.auto_sizes.split(",") if s]
    rows = [(name, f) for name, f in KINDS if args.kinds is None or f["kind"] == "flat" or name in args.kinds.split(",")]

    from raytrieval.retrieval.extract import extract_descriptors
    from raytrieval.retrieval.model import ModelSpec, RetrievalNet

    spec = ModelSpec() if args.max_size is None else ModelSpec(max_size=args.max_size)
    model = RetrievalNet(spec).eval()
    bench = load_benchmark("rparis6k-mini", args.data_root)
    t0 = time.perf_counter()
    db_full = extract_descriptors(model, bench.images, max_size=spec.max_size, progress=False)
    q_full = extract_descriptors(model, bench.queries, bench.qboxes, max_size=spec.max_size, progress=False)
    crops_full = extract_descriptors(model, photo_crops(args.crops, seed=0), max_size=min(256, spec.max_size),
                                     progress=False)
    embed_s = time.perf_counter() - t0
    mean, proj = pca(crops_full, args.dim)
    db, qv, seeds = project(db_full, mean, proj), project(q_full, mean, proj), project(crops_full, mean, proj)
    rng = np.random.default_rng(1)
    n_max = max(sizes + auto_sizes)
    t0 = time.perf_counter()
    distractors = local_pca_sampler(seeds, n_max + args.queries, rng)
    gen_s = time.perf_counter() - t0
    gen_queries, distractors = distractors[: args.queries], distractors[args.queries :]

    # similarity of the generated descriptors to the real ones
    hist = {"rparis6k-mini database (real, 397)": nn_similarity(db),
            f"photo crops (real, {len(seeds)})": nn_similarity(seeds),
            "distractors (generated, 397 drawn)": nn_similarity(distractors[rng.choice(n_max, 397, replace=False)]),
            "distractors (generated, 600 drawn)": nn_similarity(distractors[rng.choice(n_max, 600, replace=False)])}
    png = Path(args.out).with_name(Path(args.out).stem + "_nn_similarity.png")
    plot_histograms(hist, png)
    cross = (qv @ distractors[:100_000].T).max(axis=1)  # real queries vs generated: no near-duplicates?
    real_top = (qv @ db.T).max(axis=1)

    mapk = args.map_k
    lines_kind: list[str] = []
    lines_map: list[str] = []
    exact_map: dict[int, tuple[float, float]] = {}
    targets: list[str] = []
    for n in sizes:
        X = np.concatenate([db, distractors[:n]])  # labels < 397: rparis6k-mini; the rest distractors
        labels = np.arange(len(X), dtype=np.int64)
        flat_ms = None
        gt = None
        for name, fields in rows:
            if n == max(sizes) and name in skip_big:
                continue
            cfg = IndexConfig(**{"nlist": int(np.sqrt(len(X))), "train_size": args.train_size, **fields})
            ispec = spec_for(cfg.kind, len(X), args.dim, cfg)
            try:
                row = measure_kind(X, labels, ispec, cfg, gen_queries, qv, bench, gt, flat_ms, args)
            except Exception as exc:  # noqa: BLE001 - a failing row is reported, the others still run
                lines_kind.append(f"| {n:,} | {name} | `{ispec.full_factory}` | failed: {exc} |  |  |  |  |  |  |")
                continue
            found, single, r1, r10, batched, bpv, build_s, med, hard = row
            if gt is None:  # the first row is exact search
                gt, flat_ms = found, single
                r1, r10 = 1.0, 1.0
            if cfg.kind == "flat":
                exact_map[n] = (med, hard)
            speed = flat_ms / single
            lines_kind.append(f"| {n:,} | {name} | `{ispec.full_factory}` | {r1:.3f} | {r10:.3f} | {single:.2f} | "
                              f"{batched:.3f} | {speed:.0f}x | {bpv:.0f} | {build_s:.1f} |")
            lines_map.append(f"| +{n:,} | {name} | {med:.1f} | {hard:.1f} | {med - exact_map.get(n, (np.nan,))[0]:+.1f} |")
            if n == max(sizes) and r10 >= 0.95 and speed >= 20 and bpv <= 100:
                targets.append(f"{name} ({r10:.3f}, {speed:.0f}x, {bpv:.0f} B)")
            print(lines_kind[-1], f"[{(time.perf_counter() - t_all) / 60:.1f} min]", flush=True)

    full = {}
    for n in sizes:  # exact mAP over the full ranking, for reference
        X = np.concatenate([db, distractors[:n]])
        full[n] = map_rows(bench, qv, np.argsort(-(qv @ X.T), axis=1)[:, :5000])
    alone = map_rows(bench, qv, np.argsort(-(qv @ db.T), axis=1))

    lines_auto = []
    for n in auto_sizes:
        X = distractors[:n]
        t0 = time.perf_counter()
        try:
            choice = select_index(X, np.arange(n, dtype=np.int64), max_bytes_per_vector=args.budget,
                                  recall_target=args.recall_target, train_size=args.train_size,
                                  factory_kwargs={"nlist": int(np.sqrt(n))})
        except Exception as exc:  # noqa: BLE001
            lines_auto.append(f"| {n:,} | failed: {exc} |  |  |  |  |  |  |  |")
            continue
        auto_s = time.perf_counter() - t0
        index = choice.index
        _, gt = exact_search(X, gen_queries, 10)
        _, found = index.search(gen_queries, 10)
        r10 = recall_at_k(found, gt)
        bpv = index.bytes_per_vector()
        ok = r10 >= args.recall_target and bpv <= args.budget
        rep = choice.report
        lines_auto.append(f"| {n:,} | `{rep['chosen']}` | {rep['search']} | {rep['recall']:.3f} | {r10:.3f} | "
                          f"{bpv:.0f} | {'yes' if ok else 'no'} | {len(rep['tried'])} | {auto_s:.0f} |")
        lines_auto.append(f"|  | *{rep['reason']}* |  |  |  |  |  |  |  |")
        print(lines_auto[-2], f"[{(time.perf_counter() - t_all) / 60:.1f} min]", flush=True)
        del index, choice

    total_min = (time.perf_counter() - t_all) / 60
    cmd = "python benchmarks/index.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Index benchmark: the faiss family at 100k and 1M, rparis6k-mini + 1M distractors, auto",
        "",
        f"- Machine: {machine()}; shared with other agents.",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; load average at start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, at the end {os.getloadavg()[0]:.2f} (2 cores: timings "
        f"are noisy; the ratios within one table are measured side by side).",
        f"- Command: `{cmd}`; whole run {total_min:.1f} min (embedding {embed_s:.0f} s, distractors {gen_s:.0f} s).",
        f"- Descriptors: default model `{spec.backbone}` {spec.pooling}, {db_full.shape[1]}-d, PCA to {args.dim}-d "
        f"learned on {len(seeds)} random crops of the wheel photos (no labels); rparis6k-mini at max side "
        f"{spec.max_size}, crops at 256.",
        f"- Recall: {args.queries} held-out generated queries against exact search (the flat row); recall@1 = "
        f"top-1 agrees, recall@10 = share of the exact top 10 returned in the top 10. ms/query: one query a call "
        f"on 1 thread ({args.one_by_one} queries), and all {args.queries} in one call on {faiss.omp_get_max_threads()} "
        f"threads. Speed = flat 1-thread ms / this row's. Bytes/vector: the serialized index (codes, labels, "
        f"direct map, re-ranking store) / N. Search parameters are fixed per row (not tuned on this benchmark); "
        f"IVF lists = sqrt(N) (the default is 4 sqrt(N)) and {args.train_size:,} training vectors, to bound "
        f"k-means time on the shared machine; auto gets the same.",
        "",
        "## Every kind",
        "",
        (f"Rows: only those named by `--kinds`, beside exact search; the other kinds are in "
         f"benchmarks/index.md." if args.kinds else
         f"Rows left out at {max(sizes):,}: {', '.join(sorted(skip_big)) or 'none'} (build time on 2 shared cores; "
         "their 100k rows show them)."),
        "",
        "| N | kind | factory | recall@1 | recall@10 | ms/query 1 thread | ms/query batched | speed vs flat | bytes/vector | build s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *lines_kind,
        "",
        f"Target at {max(sizes):,} (recall@10 >= 0.95, >= 20x flat, <= 100 bytes/vector): "
        f"{'met by ' + '; '.join(targets) if targets else 'not met by any row'}.",
        "",
        f"## rparis6k-mini + distractors: Medium / Hard mAP (19 real queries, top {mapk})",
        "",
        f"Without distractors, exact, full ranking: Medium {alone[0]:.1f}, Hard {alone[1]:.1f} ({args.dim}-d PCA). "
        + " ".join(f"Exact over +{n:,}, top 5000: Medium {m:.1f}, Hard {h:.1f}." for n, (m, h) in full.items()),
        "",
        "| database | kind | Medium | Hard | Medium vs exact |",
        "|---|---|---:|---:|---:|",
        *lines_map,
        "",
        *([f"## auto: budget {args.budget:.0f} bytes/vector, recall@10 target {args.recall_target}",
           "",
           "Verified by `select_index` on 200 sampled database vectors; the last recall is measured independently on "
           "the held-out queries.",
           "",
           "| N | chosen | search | recall (auto's sample) | recall@10 (held-out) | bytes/vector | meets both | candidates built | seconds |",
           "|---:|---|---|---:|---:|---:|---|---:|---:|",
           *lines_auto,
           ""] if auto_sizes else []),
        "## How the generated distractors compare with real descriptors",
        "",
        f"![nearest-neighbour similarity]({png.name})",
        "",
        "| set | NN similarity p10 | median | p90 |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {np.percentile(v, 10):.3f} | {np.median(v):.3f} | {np.percentile(v, 90):.3f} |"
          for name, v in hist.items()],
        "",
        f"Real queries: best similarity to the real database median {np.median(real_top):.3f}; to the first "
        f"100k distractors median {np.median(cross):.3f} (max {cross.max():.3f}).",
        "",
    ]
    return write_markdown(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
