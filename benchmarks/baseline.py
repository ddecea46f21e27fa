"""Off-the-shelf baseline: mAP of every pooling, single- and multi-scale, on each benchmark,
and extraction throughput through Ray Data (embed_images) vs a plain PyTorch loop.

    .venv/bin/python benchmarks/baseline.py --data-root ../shared/data --out benchmarks/baseline.md

The backbone runs once per image and scale; every pooling head is applied to the same feature
maps (the heads are exactly `RetrievalNet.head`, checked against `extract_descriptors`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path: put the repository root there
# instead, so that `benchmarks.*` resolves.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np
import torch
from tqdm.auto import tqdm

from raytrieval.evaluation.datasets import prepare_benchmark
from raytrieval.evaluation.datasets import Benchmark
from raytrieval.evaluation.report import headline
from raytrieval.retrieval.extract import extract_descriptors, power_mean, prepare_image, scale_features
from raytrieval.retrieval.model import ModelSpec, RetrievalNet
from raytrieval.retrieval.pooling import l2n

POOLINGS = ("mac", "spoc", "gem", "rmac", "crow")
MULTI = (1.0, 2**-0.5, 0.5)


def all_poolings(images: list[str], boxes: list, max_size: int) -> dict[tuple[str, str], np.ndarray]:
    """{(pooling, 'single'|'multi'): (N, D)} with one backbone pass per image and scale."""
    models = {name: RetrievalNet(ModelSpec(pooling=name, max_size=max_size)).eval() for name in POOLINGS}
    trunk = models["gem"]
    out = {(name, mode): [] for name in POOLINGS for mode in ("single", "multi")}
    for path, box in tqdm(list(zip(images, boxes)), desc="features", unit="img"):
        feats = scale_features(trunk, prepare_image(path, box, max_size)[None], MULTI)
        for name, model in models.items():
            with torch.no_grad():
                vecs = [l2n(model.head(f)) for f in feats]
            out[(name, "single")].append(vecs[0][0].numpy())
            out[(name, "multi")].append(power_mean(vecs, model.multiscale_power)[0].numpy())
    # the shared-trunk heads are the product's extraction path
    check = extract_descriptors(models["rmac"], images[:2], boxes[:2], scales=MULTI, max_size=max_size, progress=False)
    np.testing.assert_allclose(np.stack(out[("rmac", "multi")][:2]), check, atol=1e-4)
    return {k: np.ascontiguousarray(np.stack(v), dtype=np.float32) for k, v in out.items()}


def score(bench: Benchmark, q: np.ndarray, db: np.ndarray) -> dict:
    return bench.evaluate(np.argsort(-(q @ db.T), axis=1, kind="stable"))


def map_rows(bench: Benchmark, max_size: int) -> list[str]:
    qboxes = bench.qboxes
    db = all_poolings(bench.images, [None] * bench.num_images, max_size)
    grouped = bench.protocol == "grouped"  # queries are the database images
    q = db if grouped else all_poolings(bench.queries, qboxes, max_size)
    rows = []
    for name in POOLINGS:
        for mode in ("single", "multi"):
            m = score(bench, q[(name, mode)], db[(name, mode)])
            if grouped:
                rows.append(f"| {bench.name} | {name} | {mode} | {m['ns_score']:.2f} | {100 * m['map']:.1f} | | |")
            else:
                cells = " | ".join(f"{100 * m[p]['map']:.1f}" for p in ("easy", "medium", "hard"))
                rows.append(f"| {bench.name} | {name} | {mode} | | {cells} |")
            print(bench.name, name, mode, headline(m), flush=True)
    return rows


def throughput(bench: Benchmark, n: int, max_size: int) -> list[str]:
    """Images/s: a plain in-process loop vs embed_images on Ray Data with 1 and 2 actors, same images."""
    from raytrieval.cluster.runtime import init_ray
    from raytrieval.mining.embed import embed_images

    images = bench.images[:n]
    spec = ModelSpec(max_size=max_size)
    init_ray()
    rows = []
    t = time.perf_counter()
    plain = extract_descriptors(RetrievalNet(spec).eval(), images, max_size=max_size, progress=False)
    base = n / (time.perf_counter() - t)
    rows.append(f"| plain PyTorch loop (torch threads={torch.get_num_threads()}) | {base:.2f} | 1.00 |")
    for workers in (1, 2):
        t = time.perf_counter()
        res = embed_images(spec.to_dict(), images, max_size=max_size, workers=workers, progress=False)
        rate = n / (time.perf_counter() - t)
        assert np.allclose(res.descriptors, plain, atol=1e-4)
        rows.append(f"| embed_images on Ray Data, {workers} actor(s) (incl. actor start) | {rate:.2f} | {rate / base:.2f} |")
    return rows


def write_markdown(path: str, lines: list[str]) -> int:
    """Write a benchmark's Markdown, echo it, and return the script's exit code."""
    Path(path).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--demo-root", default="runs/data")
    parser.add_argument("--datasets", default="rparis6k-mini,ukbench-56,demo")
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--throughput-images", type=int, default=96)
    parser.add_argument("--out", default="benchmarks/baseline.md")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    rows = []
    for name in args.datasets.split(","):
        root = args.demo_root if name == "demo" else args.data_root
        rows += map_rows(prepare_benchmark(name, root), args.max_size)
    tp = throughput(prepare_benchmark("rparis6k-mini", args.data_root), args.throughput_images, args.max_size)

    lines = [
        "# Off-the-shelf baseline",
        "",
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}; load average (1 min) "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"Command: `{' '.join(['.venv/bin/python benchmarks/baseline.py', *sys.argv[1:]])}`",
        "",
        "EfficientNet-Lite0 with its bundled ImageNet weights, TensorFlow 'SAME' padding, longer",
        f"side {args.max_size}, queries cropped to their box, no whitening, no re-ranking.",
        "Multi-scale = scales 1, 1/sqrt2, 1/2 averaged with power p (GeM p=3, else 1).",
        "UKBench: every image is a query; N-S = mean relevant images in the top 4 (4 is perfect).",
        "",
        "| dataset | pooling | scales | N-S | mAP Easy (UKBench: mAP) | Medium | Hard |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"## Extraction throughput ({args.throughput_images} rparis6k-mini images, same run)",
        "",
        "| path | images/s | ratio to plain loop |",
        "|---|---|---|",
        *tp,
        "",
    ]
    return write_markdown(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
