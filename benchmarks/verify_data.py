"""Spatial verification: the actor pool of `verify_pairs` vs the same verifier on Ray Data (issue 18).

    .venv/bin/python benchmarks/verify_data.py --run-dir runs/scale/run_10000 --pairs 8000 --out benchmarks/verify_data.md

Issue 18 keeps the actor pools for spatial verification only if a measured comparison says they
win. Both paths verify the same tasks (the first `--pairs` candidate pairs of a clean run, cut
into tasks of 16 pairs in locality order, as the clean stage does) with the same `PairVerifier`
on 2 actors of one CPU each, and must give every pair the same inliers. The pool gives each
actor a contiguous block of tasks (the window of images it caches) and lets an idle actor steal
from the end of the longest block; Ray Data's `map_batches` over an `ActorPoolStrategy` hands
out blocks of `--tasks-per-block` tasks as actors free up. Both are timed from the call, actor
start included, one after the other in this run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from benchmarks.baseline import machine, write_markdown  # noqa: E402
from raytrieval.cluster.runtime import init_ray  # noqa: E402
from raytrieval.mining.embed import quiet_ray_data  # noqa: E402
from raytrieval.mining.verify import PairVerifier, VerifyConfig, VerifyTask, make_tasks, verify_pairs  # noqa: E402

WORKERS = 2


class VerifyBatch:
    """Ray Data callable class: one PairVerifier per actor; a row is one task's pairs."""

    def __init__(self, config: dict[str, Any]):
        self.verifier = PairVerifier(config, threads=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a, b, inliers, extracted = [], [], [], []
        for t, ids_a, paths_a, ids_b, paths_b in zip(batch["task"], batch["a"], batch["path_a"], batch["b"],
                                                      batch["path_b"]):
            res = self.verifier.verify(VerifyTask(int(t), list(zip(ids_a, paths_a, ids_b, paths_b))))
            a += res["rows"]["a"]
            b += res["rows"]["b"]
            inliers += res["rows"]["inliers"]
            extracted += [res["extracted"]] * len(res["rows"]["a"])
        return {"a": np.array(a, object), "b": np.array(b, object), "inliers": np.array(inliers, np.int64),
                "extracted": np.array(extracted, np.int64), "worker": np.array([self.verifier.token] * len(a), object)}


def on_ray_data(tasks: list[VerifyTask], config: dict[str, Any], tasks_per_block: int) -> tuple[dict, int]:
    """{(a, b): inliers} and the features extracted, through Ray Data."""
    items = [{"task": t.index, "a": [p[0] for p in t.pairs], "path_a": [p[1] for p in t.pairs],
              "b": [p[2] for p in t.pairs], "path_b": [p[3] for p in t.pairs]} for t in tasks]
    out: dict[tuple[str, str], int] = {}
    extracted: dict[str, int] = {}
    with quiet_ray_data():
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // tasks_per_block))).map_batches(
            VerifyBatch, fn_constructor_args=(config,), batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=WORKERS), num_cpus=1)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for a, b, n, e, w in zip(batch["a"], batch["b"], batch["inliers"], batch["extracted"], batch["worker"]):
                out[(str(a), str(b))] = int(n)
                extracted[str(w)] = max(extracted.get(str(w), 0), int(e))
    return out, sum(extracted.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/scale/run_10000"),
                        help="a clean run (matches.parquet, images.parquet): benchmarks/scale.py makes one")
    parser.add_argument("--pairs", type=int, default=8000)
    parser.add_argument("--tasks-per-block", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/verify_data.md")
    args = parser.parse_args(argv)
    matches = pq.read_table(args.run_dir / "matches.parquet", columns=["a", "b"]).slice(0, args.pairs).to_pydict()
    manifest = pq.read_table(args.run_dir / "images.parquet", columns=["image_id", "uri"]).to_pydict()
    paths = dict(zip(manifest["image_id"], manifest["uri"]))
    pairs = list(zip(matches["a"], matches["b"]))
    config = asdict(VerifyConfig())
    tasks = make_tasks(pairs, paths, 16, "locality")
    load_start, started = os.getloadavg(), dt.datetime.now(dt.timezone.utc)
    init_ray(log_file=Path(tempfile.gettempdir()) / "verify_data_driver.log")

    rows = []
    load0, t = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = verify_pairs(pairs, paths, Path(tmp) / "m.parquet", workers=WORKERS, progress=False)
        pool_out = pq.read_table(Path(tmp) / "m.parquet", columns=["a", "b", "inliers"]).to_pydict()
    pool = {(a, b): n for a, b, n in zip(pool_out["a"], pool_out["b"], pool_out["inliers"])}
    rows.append(("actor pool (verify_pairs: block affinity, work stealing)", time.perf_counter() - t, res.extracted,
                 load0, os.getloadavg()[0]))
    load0, t = os.getloadavg()[0], time.perf_counter()
    data, extracted = on_ray_data(tasks, config, args.tasks_per_block)
    rows.append((f"Ray Data (map_batches, ActorPoolStrategy, {args.tasks_per_block} tasks per block)",
                 time.perf_counter() - t, extracted, load0, os.getloadavg()[0]))
    if data.keys() != pool.keys():
        raise RuntimeError(f"the two paths verified different pairs: {len(data.keys() ^ pool.keys())} differ")
    differ = sum(data[k] != pool[k] for k in pool)
    images = len({x for p in pairs for x in p})
    for name, seconds, feats, l0, l1 in rows:
        print(f"{name}: {len(pairs) / seconds:.0f} pairs/s, {feats} feature extractions (load {l0:.1f} -> {l1:.1f})")
    base = len(pairs) / rows[0][1]
    winner = "the actor pool" if rows[0][1] <= rows[1][1] else "Ray Data"
    load_end = os.getloadavg()
    lines = [
        "# Spatial verification: actor pool vs Ray Data",
        "",
        f"- Machine: {machine()}.",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; 1/5/15-minute load average {load_start[0]:.1f}/{load_start[1]:.1f}/"
        f"{load_start[2]:.1f} at the start, {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at the end "
        f"({os.cpu_count()} cores: a load above {os.cpu_count()} means other jobs took cores).",
        f"- Command: `.venv/bin/python benchmarks/verify_data.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Pairs: the first {len(pairs)} candidate pairs of `{args.run_dir}` ({images} images), {len(tasks)} tasks "
        "of 16 pairs in locality order, RootSIFT + MAGSAC homography, 2 actors of one CPU, timed from the call.",
        f"- Both paths gave every pair the same inliers: {differ} of {len(pool)} differ.",
        "",
        "| path | seconds | pairs/s | ratio | feature extractions | load average during |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {s:.1f} | {len(pairs) / s:.0f} | {len(pairs) / s / base:.2f} | {feats} | {l0:.1f} -> {l1:.1f} |"
          for name, s, feats, l0, l1 in rows],
        "",
        f"- Faster here: **{winner}**. Feature extractions count the images each actor decoded and described "
        "(an image whose features an actor no longer caches is done again).",
        "",
    ]
    return write_markdown(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
