"""Serving benchmark: HTTP latency/throughput of the Ray Serve app on 127.0.0.1 vs model + faiss
called directly in one process, and recall / speed / memory of the approximate index kinds.

    .venv/bin/python benchmarks/serving.py --data-root ../shared/data --out benchmarks/serving.md
    .venv/bin/python benchmarks/serving.py --smoke-test          # a small, quick pass

The database vectors are synthetic (clustered, L2-normalised, `--dim` wide); the queries are real
photos embedded by the real model (EfficientNet-Lite0 + GeM + a linear projection to `--dim`,
saved as a checkpoint so the server and the direct path use the very same weights). Every search
embeds one uploaded image and searches the index for the top 10.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raytrieval.cluster.runtime import apply_offline_env  # noqa: E402

apply_offline_env()


def clustered(n: int, dim: int, seed: int, centers: int = 1000, chunk: int = 200_000) -> np.ndarray:
    """(n, dim) float32 unit vectors around `centers` random centres (built in chunks)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = c[rng.integers(0, centers, m)] + 0.7 * rng.standard_normal((m, dim)).astype(np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def percentiles(lat_s: list[float]) -> tuple[float, float]:
    ms = np.array(lat_s) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def load(fn: Callable[[bytes], None], payloads: list[bytes], clients: int, per_client: int) -> tuple[list[float], float]:
    """Run `clients` threads, each calling fn `per_client` times: (latencies in s, wall time in s)."""
    lat: list[float] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        mine = []
        for i in range(per_client):
            t0 = time.perf_counter()
            fn(payloads[(w * per_client + i) % len(payloads)])
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return lat, time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[bytes], None]], payloads: list[bytes], clients: int, requests: int,
                rounds: int) -> dict[str, dict]:
    """Alternate the paths in `rounds` rounds, so that load from other jobs hits them alike."""
    per = max(1, requests // (clients * rounds))
    lat: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, float] = {name: 0.0 for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            got, seconds = load(fn, payloads, clients, per)
            lat[name] += got
            wall[name] += seconds
    out = {}
    for name in fns:
        p50, p99 = percentiles(lat[name])
        out[name] = {"n": len(lat[name]), "p50": p50, "p99": p99, "rps": len(lat[name]) / wall[name]}
    return out


def query_images(data_root: Path) -> list[bytes]:
    folder = data_root / "rparis6k-mini" / "jpg"
    if folder.is_dir():
        from raytrieval.evaluation.datasets import load_benchmark

        return [open(p, "rb").read() for p in load_benchmark("rparis6k-mini", data_root).queries]
    import io

    import skimage.data
    from PIL import Image

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def make_checkpoint(out: Path, dim: int, max_size: int) -> tuple[Path, object]:
    import torch

    from raytrieval.retrieval.checkpoint import save_checkpoint
    from raytrieval.retrieval.model import ModelSpec, RetrievalNet

    torch.manual_seed(0)
    model = RetrievalNet(ModelSpec(max_size=max_size, whiten_dim=dim)).eval()
    return save_checkpoint(model, out / "checkpoint"), model


def direct_fn(model, index) -> Callable[[bytes], None]:
    """One process: decode + embed (one model, serialised like one embedder replica) + faiss."""
    from raytrieval.serving.engine import SearchOptions, embed_arrays, prepare_query, search_images

    lock = threading.Lock()
    options = SearchOptions(k=10)

    def run(data: bytes) -> None:
        prepared = prepare_query(data, None, model.spec.max_size)
        with lock:
            vec = embed_arrays(model, [prepared.pixels], model.spec.scales, model.spec.max_size)[0]
        search_images(index, vec, options)

    return run


def served_fn(base: str, stages: list[dict] | None = None) -> Callable[[bytes], None]:
    """POST /search over HTTP; the ingress's own stage timings are appended to `stages`."""
    import requests

    local = threading.local()

    def run(data: bytes) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        r = local.session.post(f"{base}/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "10"},
                               timeout=120)
        if r.status_code != 200:
            raise RuntimeError(f"search answered {r.status_code}: {r.text[:200]}")
        if stages is not None:
            stages.append(r.json()["timings_ms"])

    return run


def wait_healthy(base: str, timeout: float = 600) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=5).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base} did not become healthy")


def ann_table(X: np.ndarray, queries: np.ndarray, work: Path, hnsw_limit: int, nprobes: list[int]) -> list[dict]:
    """Recall@10 vs exact, query time (one query at a time, 1 thread), memory per vector."""
    import faiss

    from raytrieval.serving.index import ImageIndex, IndexConfig

    faiss.omp_set_num_threads(1)
    rows = []

    def measure(name: str, n: int, idx: ImageIndex, build_s: float, exact: np.ndarray | None) -> dict:
        t0 = time.perf_counter()
        labels = np.stack([idx.search(q[None], 10)[1][0] for q in queries])
        per_query = (time.perf_counter() - t0) / len(queries) * 1e3
        recall = 1.0 if exact is None else float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, exact)]))
        size = (work / name / idx.meta["snapshot"]["index"]).stat().st_size
        return {"index": name, "n": n, "recall": recall, "ms": per_query, "bytes": size / n, "build_s": build_s,
                "labels": labels}

    ids = [str(i) for i in range(X.shape[0])]
    for n in sorted({X.shape[0], min(hnsw_limit, X.shape[0])}):
        sub = X[:n]
        t0 = time.perf_counter()
        flat = ImageIndex.create(work / f"flat-{n}", sub, ids[:n], config=IndexConfig(kind="flat"))
        flat_row = measure(f"flat-{n}", n, flat, time.perf_counter() - t0, None)
        exact = flat_row["labels"]
        rows.append(flat_row)
        del flat
        if n <= hnsw_limit:
            t0 = time.perf_counter()
            h = ImageIndex.create(work / f"hnsw-{n}", sub, ids[:n], config=IndexConfig(kind="hnsw"))
            rows.append(measure(f"hnsw-{n}", n, h, time.perf_counter() - t0, exact))
            del h
        t0 = time.perf_counter()
        iv = ImageIndex.create(work / f"ivfpq-{n}", sub, ids[:n], config=IndexConfig(kind="ivfpq"))
        build = time.perf_counter() - t0
        for nprobe in nprobes:
            iv.config.nprobe = nprobe
            row = measure(f"ivfpq-{n}", n, iv, build, exact)
            row["index"] = f"ivfpq-{n} nprobe={nprobe}"
            rows.append(row)
        del iv
        for r in rows:
            if r["n"] == n:
                r["speedup"] = flat_row["ms"] / r["ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--sizes", default="10000,1000000", help="index sizes served")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--max-size", type=int, default=224, help="query image longer side")
    p.add_argument("--requests", type=int, default=200, help="requests per measurement")
    p.add_argument("--rounds", type=int, default=4, help="direct and served alternate in this many rounds")
    p.add_argument("--hnsw-limit", type=int, default=100_000, help="largest HNSW built for the recall table")
    p.add_argument("--ann-queries", type=int, default=200)
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.sizes, args.requests, args.hnsw_limit, args.ann_queries, args.rounds = "3000", 16, 3000, 50, 2
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="rt-bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)

    import faiss
    import ray
    import torch
    from ray import serve

    from raytrieval.cluster.runtime import init_ray
    from raytrieval.serving.app import AppArgs, run_server
    from raytrieval.serving.engine import model_record
    from raytrieval.serving.index import ImageIndex, IndexConfig

    torch.set_num_threads(2)
    load_before = os.getloadavg()
    payloads = query_images(Path(args.data_root))
    ckpt, model = make_checkpoint(work, args.dim, args.max_size)
    record = model_record(model, {"checkpoint": str(ckpt)})
    lines: list[str] = []
    serving_rows = []
    init_ray(num_cpus=2)
    for n in sizes:
        t0 = time.perf_counter()
        X = clustered(n, args.dim, seed=n)
        kind = "flat" if n <= 100_000 else "ivfpq"
        idx_dir = work / f"index-{n}"
        index = ImageIndex.create(idx_dir, X, [f"s{i}" for i in range(n)], config=IndexConfig(kind=kind),
                                  model=record)
        build_s = time.perf_counter() - t0
        del X
        print(f"[{n}] {kind} index built in {build_s:.0f} s", flush=True)
        base = f"http://127.0.0.1:{args.port}"
        run_server(AppArgs(index=str(idx_dir), embedder_cpus=1.0, searcher_cpus=1.0, embedder_threads=2),
                   host="127.0.0.1", port=args.port)
        wait_healthy(base)
        stages: list[dict] = []
        fns = {"direct": direct_fn(model, index), "served": served_fn(base, stages)}
        for fn in fns.values():  # warm up both paths
            for data in payloads[:5]:
                fn(data)
        results: dict = {}
        for clients in (1, 8):
            stages.clear()
            for name, r in interleaved(fns, payloads, clients, args.requests, args.rounds).items():
                results[(name, clients)] = r
                print(f"[{n}] {name} x{clients}: {r}", flush=True)
            if clients == 1:
                results["stages"] = {key: float(np.median([st[key] for st in stages])) for key in stages[0]}
        serve.shutdown()
        del index, fns
        serving_rows.append((n, kind, build_s, results))

    ray.shutdown()
    X = clustered(max(sizes), args.dim, seed=max(sizes))
    rng = np.random.default_rng(1)
    Q = clustered(args.ann_queries, args.dim, seed=max(sizes))  # same centres as the database
    Q = np.ascontiguousarray(Q[rng.permutation(len(Q))], np.float32)
    ann = ann_table(X, Q, work / "ann", args.hnsw_limit, [8, 16, 32])

    # ------------------------------------------------------------------ report
    cpu = platform.processor() or platform.machine()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    cmd = "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    lines += [
        "# Serving benchmark",
        "",
        f"- Date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- Machine: {os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU; "
        f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
        f"faiss {faiss.__version__}. Other jobs shared the cores during the run (load average "
        f"{load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), so absolute numbers are noisy.",
        f"- Command: `{cmd}`",
        f"- Model: EfficientNet-Lite0 + GeM + linear projection to {args.dim}-d (a checkpoint; query images "
        f"resized to {args.max_size} px longer side). Database: synthetic clustered unit vectors, "
        f"{args.dim}-d (1M x 1280-d float32 would be 5 GiB and too slow to build here, so D={args.dim}).",
        f"- Queries: the {len(payloads)} rparis6k-mini query photos, uploaded as JPEG multipart; top 10.",
        "- Served: Ray Serve on 127.0.0.1 (Ingress -> Embedder with `@serve.batch` -> Searcher), one replica each, "
        "embedder with 2 torch threads. Direct: the same checkpoint and the same `ImageIndex` in one process "
        "(decode + embed + faiss, one model shared by the client threads), measured in the same run with the "
        f"server up: the two paths alternate in {args.rounds} rounds so that load from other jobs hits both alike.",
        "",
        "## Latency and throughput",
        "",
        "| index | path | clients | requests | p50 ms | p99 ms | req/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for n, kind, _, results in serving_rows:
        for path in ("direct", "served"):
            for clients in (1, 8):
                r = results[(path, clients)]
                lines.append(f"| {n:,} x {args.dim} {kind} | {path} | {clients} | {r['n']} | {r['p50']:.1f} | "
                             f"{r['p99']:.1f} | {r['rps']:.1f} |")
    lines += ["", "Overhead of serving (served / direct):", "",
              "| index | p50 ratio, 1 client | throughput ratio, 8 clients | added p50 ms, 1 client |",
              "|---|---:|---:|---:|"]
    for n, kind, build_s, results in serving_rows:
        d1, s1 = results[("direct", 1)], results[("served", 1)]
        d8, s8 = results[("direct", 8)], results[("served", 8)]
        lines.append(f"| {n:,} {kind} (built in {build_s:.0f} s) | {s1['p50'] / d1['p50']:.2f} | "
                     f"{s8['rps'] / d8['rps']:.2f} | {s1['p50'] - d1['p50']:.1f} |")
    lines += ["", "Where a served request spends its time (1 client, medians of the ingress's `timings_ms`; "
              "embed and search are deployment-handle round trips; the rest is the HTTP proxy and the client):", "",
              "| index | read body | decode | embed | search | ingress total | end to end p50 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for n, kind, _, results in serving_rows:
        st = results["stages"]
        lines.append(f"| {n:,} {kind} | {st['read']:.1f} | {st['decode']:.1f} | {st['embed']:.1f} | "
                     f"{st['search']:.1f} | {st['total']:.1f} | {results[('served', 1)]['p50']:.1f} |")
    lines += [
        "",
        "## Approximate indexes vs exact",
        "",
        f"{args.ann_queries} synthetic queries from the same clusters, top 10, one query at a time on 1 thread "
        "(`ImageIndex.search`, as the searcher replica calls it). Memory = size of the serialised faiss index / N. "
        f"HNSW is built only up to {args.hnsw_limit:,} vectors here (its build took minutes per 100k on these "
        "2 shared cores).",
        "",
        "| index | N | recall@10 | ms/query | speed-up vs flat | bytes/vector | build s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ann:
        lines.append(f"| {r['index']} | {r['n']:,} | {r['recall']:.3f} | {r['ms']:.2f} | {r['speedup']:.1f} | "
                     f"{r['bytes']:.0f} | {r['build_s']:.0f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
