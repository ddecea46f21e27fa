"""Embedding throughput: a plain in-process loop vs `embed_images` on Ray Data (issue 18).

    .venv/bin/python benchmarks/embed_data.py --data-root ../shared/data --out benchmarks/embed_data.md

The two paths embed the same images one after the other in one run and must agree (1e-4).
Images are the rparis6k-mini database images (397), cycled when more are asked for. The Ray
Data path is timed from the call, so it includes starting its actors and loading the model;
the plain loop includes building the model. The issue's target: Ray Data >= 1.8x the plain
loop on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Callable

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.baseline import machine, write_markdown  # noqa: E402
from raytrieval.evaluation.datasets import prepare_benchmark  # noqa: E402
from raytrieval.cluster.runtime import init_ray  # noqa: E402
from raytrieval.mining.embed import embed_images  # noqa: E402
from raytrieval.retrieval.extract import extract_descriptors  # noqa: E402
from raytrieval.retrieval.model import ModelSpec, RetrievalNet  # noqa: E402

TARGET = 1.8


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float, float, float]:
    """(result, seconds, 1-minute load average before, after)."""
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, load0, os.getloadavg()[0]


def compare(images: list[str], max_size: int, workers: int, threads: int) -> list[dict]:
    """One row per path: images/s and the load average around it; results checked equal."""
    spec = ModelSpec(max_size=max_size)

    def plain() -> np.ndarray:
        torch.set_num_threads(threads)
        return extract_descriptors(RetrievalNet(spec).eval(), images, max_size=max_size, progress=False)

    paths = [
        (f"plain loop, extract_descriptors, {threads} torch threads", plain),
        (f"Ray Data, embed_images, {workers} actors",
         lambda: embed_images(spec.to_dict(), images, max_size=max_size, workers=workers, progress=False).descriptors),
    ]
    rows, reference = [], None
    for name, fn in paths:
        desc, seconds, load0, load1 = timed(fn)
        if reference is None:
            reference = desc
        np.testing.assert_allclose(desc, reference, atol=1e-4, err_msg=name)
        rows.append({"path": name, "n": len(images), "rate": len(images) / seconds, "s": seconds,
                     "load": (load0, load1)})
        print(f"{name}: {len(images)} images in {seconds:.1f} s = {rows[-1]['rate']:.2f} img/s "
              f"(load {load0:.1f} -> {load1:.1f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--sizes", default="300", help="comma-separated image counts (cycled past 397)")
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop")
    parser.add_argument("--out", default="benchmarks/embed_data.md")
    parser.add_argument("--smoke-test", action="store_true", help="8 images at 128 px, no Markdown")
    args = parser.parse_args(argv)
    sizes = [8] if args.smoke_test else [int(s) for s in args.sizes.split(",")]
    max_size = 128 if args.smoke_test else args.max_size

    pool = [str(p) for p in prepare_benchmark("rparis6k-mini", args.data_root).images]
    load_start = os.getloadavg()
    started = dt.datetime.now(dt.timezone.utc)
    init_ray(log_file=Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "embed_data_driver.log")
    rows = []
    for n in sizes:
        rows += compare([pool[i % len(pool)] for i in range(n)], max_size, args.workers, args.threads)
    if args.smoke_test:
        return 0

    table = []
    for n in sizes:
        group = [r for r in rows if r["n"] == n]
        base = group[0]["rate"]
        for r in group:
            table.append(f"| {n} | {r['path']} | {r['s']:.1f} | {r['rate']:.2f} | {r['rate'] / base:.2f} | "
                         f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} |")
    ratios = {n: [r for r in rows if r["n"] == n] for n in sizes}
    verdicts = [f"{n} images: Ray Data {g[1]['rate'] / g[0]['rate']:.2f}x the plain loop: target {TARGET}x "
                f"{'met' if g[1]['rate'] / g[0]['rate'] >= TARGET else 'NOT met'}" for n, g in ratios.items()]
    load_end = os.getloadavg()
    cycled = [n for n in sizes if n > len(pool)]
    lines = [
        "# Embedding throughput: plain loop vs Ray Data (embed_images)",
        "",
        f"- Machine: {machine()}.",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; 1/5/15-minute load average {load_start[0]:.1f}/{load_start[1]:.1f}/"
        f"{load_start[2]:.1f} at the start, {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at the end "
        f"({os.cpu_count()} cores, shared with other jobs: a load above {os.cpu_count()} means fewer free cores).",
        f"- Command: `.venv/bin/python benchmarks/embed_data.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Images: rparis6k-mini database images, longer side {max_size}, EfficientNet-Lite0 GeM, single scale"
        + (f"; the {len(pool)} images are cycled for {', '.join(map(str, cycled))} (repeats)." if cycled else "."),
        "- The Ray Data path is timed from the call: actor start and model loading included; the plain",
        "  loop includes building the model. Both results agree to 1e-4.",
        "",
        "| images | path | seconds | images/s | ratio to plain loop | load average during |",
        "|---|---|---|---|---|---|",
        *table,
        "",
        *[f"- {v}." for v in verdicts],
        "",
    ]
    return write_markdown(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
