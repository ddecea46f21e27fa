"""How cost grows with the collection (issue 18): ingest, embed, kNN, verification, cleaning
and mining at N = 1k, 10k and 50k synthetic images, and a paper model of 1M and 10M.

    .venv/bin/python benchmarks/scale.py --sizes 1000,10000,50000 --out benchmarks/scale.md

Collections come from `raytrieval.evaluation.synthetic` (the demo's generator, scaled up: a
scene per 8 views, 30% distractors, pictures at `--canvas-scale` of the demo's size). Each
stage runs in a fresh child process of this script (`--step`), the way the commands run it:
ingest (`build_manifest`), clean (`clean`: embed on 2 Ray actors, exact kNN, verification on 2
Ray actors, connected components) and mine (`mine`, 'hardneg' and 'manifold'). Seconds are
timed inside the child around the stage call (imports and Ray start excluded; actor start and
model loading included); peak memory is the child's process tree (driver, raylet, actors)
sampled every 0.2 s, as PSS (shared pages split between the processes sharing them).
The growth exponent of a step is the least-squares slope of log(seconds) on log(N).

A calibration run embeds and verifies `--calibration` images at the demo's full size (512 px
descriptors, 1024 px local features) to carry the per-image costs to real photos; the paper
model (1M and 10M images on G GPUs and W CPU nodes) is computed from those measured costs and
the assumptions listed in its section.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402

from benchmarks.baseline import machine, write_markdown  # noqa: E402
from benchmarks.pipeline import PeakSampler  # noqa: E402

MAX_EXPONENT = 1.15
EMBED_TARGET = 1.8
STEPS = ("ingest", "embed", "knn", "verify", "cluster", "mine_hardneg", "mine_manifold")
STEP_NAMES = {
    "ingest": "ingest (list, hash, decode-check; 2 threads)",
    "embed": "embed (2 Ray actors)",
    "knn": "kNN graph (exact, faiss flat)",
    "verify": "verification (2 Ray actors)",
    "cluster": "cleaning (components, boxes)",
    "mine_hardneg": "mining, hardneg",
    "mine_manifold": "mining, manifold",
}
STEP_CORES = {"ingest": 2, "embed": 2, "knn": 2, "verify": 2}  # cores a step used here (core-seconds)


# ---------------------------------------------------------------------------------------------
# the child: one stage, timed around the call


def _model(max_size: int) -> Any:
    from raytrieval.retrieval.model import ModelSpec

    return ModelSpec(max_size=max_size)


def _init_ray(run_dir: Path) -> None:
    from raytrieval.cluster.runtime import init_ray

    init_ray(log_file=run_dir / "ray_driver.log")


def run_step(step: str, run_dir: Path, images: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """Run one stage in this process; returns its seconds, counts and timings."""
    if step == "ingest":
        from raytrieval.retrieval.manifest import build_manifest, write_manifest

        t0 = time.perf_counter()
        write_manifest(build_manifest(images, progress=False), run_dir / "images.parquet")
        return {"seconds": time.perf_counter() - t0}
    if step == "clean":
        from raytrieval.mining.stages import CleanConfig, clean
        from raytrieval.mining.verify import VerifyConfig

        _init_ray(run_dir)
        cfg = CleanConfig(run_dir=str(run_dir), model=_model(opts["max_size"]), workers=2, k=opts["k"],
                          verify=VerifyConfig(max_size=opts["local_max_size"]), progress=False)
        record = clean(cfg)
        return {"timings": record["timings"], "counts": record["counts"]}
    if step.startswith("mine_"):
        from raytrieval.mining.stages import MineConfig, mine

        method = step.removeprefix("mine_")
        record = mine(MineConfig(run_dir=str(run_dir), method=method, workers=0,
                                 out=str(run_dir / f"tuples_{method}.parquet")))
        return {"seconds": record["timings"]["stage_s"], "counts": record["counts"]}
    if step in ("plain", "ray"):
        return embed_throughput(step, run_dir, images, opts)
    raise ValueError(f"step: unknown {step!r}")


def embed_throughput(path: str, run_dir: Path, images: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """Embed the first `opts['n']` images with a plain loop or `embed_images(workers=2)`;
    timed from the call (model building, actor start included). Saves the descriptors."""
    import torch

    from raytrieval.mining.embed import embed_images
    from raytrieval.retrieval.extract import extract_descriptors
    from raytrieval.retrieval.model import RetrievalNet

    files = sorted(str(p) for p in images.glob("*.jpg"))[: opts["n"]]
    spec = _model(opts["max_size"])
    if path == "ray":
        _init_ray(run_dir)
    t0 = time.perf_counter()
    if path == "plain":
        torch.set_num_threads(2)
        X = extract_descriptors(RetrievalNet(spec).eval(), files, max_size=spec.max_size, progress=False)
    else:
        X = embed_images(spec.to_dict(), files, max_size=spec.max_size, workers=2, progress=False).descriptors
    seconds = time.perf_counter() - t0
    np.save(run_dir / f"throughput_{path}_{len(files)}.npy", X)
    return {"seconds": seconds, "n": len(files)}


def spawn(step: str, run_dir: Path, images: Path, opts: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run `step` in a child process; its result plus the peak PSS/RSS of its process tree."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--run-dir", str(run_dir),
           "--images", str(images), "--opts", json.dumps(opts)]
    load0 = os.getloadavg()[0]
    with log.open("a") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=sink, text=True)
        sampler = PeakSampler(proc.pid, every=0.2)
        sampler.start()
        out, _ = proc.communicate()
        sampler.stopped.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} at {run_dir} failed (exit {proc.returncode}); see {log}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "pss": sampler.peak_pss, "rss": sampler.peak, "load": (load0, os.getloadavg()[0])}


# ---------------------------------------------------------------------------------------------
# the parent: collections, stages, fits


def fresh_run_dir(run_dir: Path) -> Path:
    """`run_dir` without the stages' artifacts, so that every stage does its work again."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("images.parquet", "descriptors.parquet", "knn.parquet", "matches.parquet", "clusters.parquet"):
        (run_dir / name).unlink(missing_ok=True)
    return run_dir


def growth_row(n: int, work: Path, opts: dict[str, Any], log: Path) -> dict[str, Any]:
    """Generate a collection of n images and run every stage on it; seconds and memory per step."""
    from raytrieval.evaluation.synthetic import generate_collection

    t0 = time.perf_counter()
    folder = generate_collection(work / f"collection_{n}", n, canvas_scale=opts["canvas_scale"], workers=2)
    generated = time.perf_counter() - t0
    run_dir = fresh_run_dir(work / f"run_{n}")
    images = folder / "jpg"
    steps: dict[str, dict[str, Any]] = {}
    ingest = spawn("ingest", run_dir, images, opts, log)
    steps["ingest"] = {"s": ingest["seconds"], "pss": ingest["pss"]}
    clean = spawn("clean", run_dir, images, opts, log)
    t = clean["timings"]
    for step, key in (("embed", "embed_s"), ("knn", "knn_s"), ("verify", "verify_s"), ("cluster", "cluster_s")):
        steps[step] = {"s": t[key], "pss": clean["pss"]}
    for method in ("hardneg", "manifold"):
        mined = spawn(f"mine_{method}", run_dir, images, opts, log)
        steps[f"mine_{method}"] = {"s": mined["seconds"], "pss": mined["pss"], "tuples": mined["counts"]["tuples"]}
    row = {"n": n, "generate_s": generated, "steps": steps, "counts": clean["counts"],
           "pairs_per_s": t.get("pairs_per_s", 0.0), "load": (ingest["load"][0], os.getloadavg()[0])}
    print(f"N={n}: " + ", ".join(f"{k} {v['s']:.1f} s" for k, v in steps.items())
          + f"; clean peak PSS {clean['pss'] / 2**20:.0f} MiB", flush=True)
    return row


def exponent(ns: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(n): value ~ n^slope."""
    return float(np.polyfit(np.log(ns), np.log(np.maximum(values, 1e-9)), 1)[0])


def model_flops(max_size: int, files: list[str]) -> float:
    """FLOPs of one forward pass per image, counted by torch's FlopCounterMode at the images'
    own sizes (the mean over `files`; a multiply-add counts 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from raytrieval.retrieval.imageio import load_image, resize_max
    from raytrieval.retrieval.model import RetrievalNet

    net = RetrievalNet(_model(max_size)).eval()
    counts = []
    for f in files:
        w, h = resize_max(load_image(f), max_size).size
        x = torch.zeros(1, 3, h, w)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x)
        counts.append(counter.get_total_flops())
    return float(np.mean(counts))


def cpu_peak_flops(threads: int = 2) -> float:
    """FLOP/s of a float32 2048^3 matrix product with `threads` torch threads (best of 5): the
    practical compute ceiling of this CPU."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


def throughput_rows(sizes: list[int], work: Path, opts: dict[str, Any], log: Path) -> list[dict[str, Any]]:
    """Plain loop vs embed_images(workers=2) on the first n images of the largest collection."""
    folder = work / f"collection_{max(opts['sizes'])}" / "jpg"
    rows = []
    for n in sizes:
        run_dir = work / f"throughput_{n}"
        run_dir.mkdir(parents=True, exist_ok=True)
        res = {p: spawn(p, run_dir, folder, {**opts, "n": n}, log) for p in ("plain", "ray")}
        a = np.load(run_dir / f"throughput_plain_{n}.npy")
        b = np.load(run_dir / f"throughput_ray_{n}.npy")
        np.testing.assert_allclose(b, a, atol=1e-4, err_msg=f"embeddings differ at n={n}")
        rows.append({"n": n, **{p: {"rate": r["n"] / r["seconds"], "s": r["seconds"], "load": r["load"]}
                                for p, r in res.items()}})
        print(f"throughput n={n}: plain {rows[-1]['plain']['rate']:.1f} img/s, "
              f"Ray {rows[-1]['ray']['rate']:.1f} img/s", flush=True)
    return rows


def calibration(n: int, work: Path, opts: dict[str, Any], log: Path) -> dict[str, Any]:
    """Embed and verify n images at the demo's full size: per-image and per-pair costs of
    real-sized photos, for the paper model."""
    from raytrieval.evaluation.synthetic import generate_collection

    folder = generate_collection(work / f"calibration_{n}", n, canvas_scale=1.0, workers=2)
    run_dir = fresh_run_dir(work / f"calibration_run_{n}")
    full = {**opts, "max_size": 512, "local_max_size": 1024}
    ingest = spawn("ingest", run_dir, folder / "jpg", full, log)
    clean = spawn("clean", run_dir, folder / "jpg", full, log)
    t, c = clean["timings"], clean["counts"]
    return {"n": n, "ingest_s_per_image": ingest["seconds"] / n, "embed_s_per_image": t["embed_s"] / c["images"],
            "verify_s_per_pair": t["verify_s"] / c["candidate_pairs"], "pss": clean["pss"]}


# ---------------------------------------------------------------------------------------------
# the report


def mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def growth_table(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, float]]:
    ns = [r["n"] for r in rows]
    lines = ["| step | " + " | ".join(f"N={n}: s (ms/image)" for n in ns) + " | growth exponent | peak PSS MiB at "
             + ", ".join(f"{n}" for n in ns) + " |",
             "|---|" + "---|" * len(ns) + "---|---|"]
    exps = {}
    for step in STEPS:
        secs = [r["steps"][step]["s"] for r in rows]
        exps[step] = exponent(ns, secs) if len(ns) > 1 else float("nan")
        cells = " | ".join(f"{s:.1f} ({1000 * s / n:.2f})" for s, n in zip(secs, ns))
        mem = ", ".join(mib(r["steps"][step]["pss"]) for r in rows)
        lines.append(f"| {STEP_NAMES[step]} | {cells} | {exps[step]:.2f} | {mem} |")
    return lines, exps


def paper_model(rows: list[dict[str, Any]], cal: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Time per stage and memory per node at 1M and 10M images, from the measured costs."""
    big = rows[-1]
    n0, s0 = big["n"], big["steps"]
    counts = big["counts"]
    pairs_per_image = counts["candidate_pairs"] / counts["images"]
    small_embed = s0["embed"]["s"] / n0 * STEP_CORES["embed"]  # core-s per image at the small size
    small_pair = s0["verify"]["s"] / counts["candidate_pairs"] * STEP_CORES["verify"]
    embed_core_s = cal["embed_s_per_image"] * STEP_CORES["embed"]  # real-sized photos
    pair_core_s = cal["verify_s_per_pair"] * STEP_CORES["verify"]
    ingest_core_s = cal["ingest_s_per_image"] * STEP_CORES["ingest"]
    knn_flops_rate = (n0 * n0 * args.dim * 2) / max(s0["knn"]["s"], 1e-9)  # FLOP/s of exact kNN here
    G, W, C = args.gpus, args.nodes, args.cores
    lines = [
        f"Cluster: **{G} GPUs** and **{W} CPU nodes of {C} cores**. Per-image costs in core-seconds "
        f"(seconds on this machine times the cores the step used) are carried from this run's "
        f"largest collection (N={n0}) and the calibration run at full size:",
        "",
        f"- embedding: {embed_core_s * 1000:.0f} core-ms per full-size photo on CPU (calibration; "
        f"{small_embed * 1000:.0f} at the growth runs' size). A GPU embeds at `--gpu-images-per-s` = "
        f"{args.gpu_images_per_s:.0f} images/s (an assumption, never measured here: no GPU was lent), "
        f"fed by JPEG decoding on the node's CPUs;",
        f"- verification: {pairs_per_image:.2f} candidate pairs per image at k={args.k} (measured), "
        f"{pair_core_s * 1000:.0f} core-ms per pair at full size (calibration; {small_pair * 1000:.1f} at the "
        f"growth size), spread over all W x C cores;",
        f"- exact kNN: {knn_flops_rate / 1e9:.0f} GFLOP/s on this machine's 2 cores for 2 N^2 d FLOPs (d={args.dim}); "
        f"on GPUs at `--gpu-tflops` = {args.gpu_tflops:.0f} effective TFLOP/s each (assumed);",
        f"- ingest: {ingest_core_s * 1000:.1f} core-ms per full-size photo (calibration), over all W x C cores;",
        "- cleaning and mining: per-image costs of the growth run, scaled linearly (their exponents "
        "above), on one node (the driver).",
        "",
        "| stage | 1M images | 10M images | memory per node (10M) | what changes |",
        "|---|---|---|---|---|",
    ]

    def hours(core_s: float, parallel: float) -> str:
        h = core_s / parallel / 3600
        return "< 1 min" if h < 1 / 60 else f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"

    desc_bytes = args.dim * 4
    for stage in ("ingest", "embed", "knn", "verify", "cluster", "mine"):
        cells = []
        for n in (1e6, 1e7):
            if stage == "ingest":
                cells.append(hours(n * ingest_core_s, W * C))
            elif stage == "embed":
                gpu_s = n / (G * args.gpu_images_per_s)
                cpu_s = n * embed_core_s / (W * C)
                cells.append(f"{hours(gpu_s, 1)} on GPUs ({hours(cpu_s, 1)} CPU-only)")
            elif stage == "knn":
                flops = 2 * n * n * args.dim
                cells.append(f"{hours(flops / (G * args.gpu_tflops * 1e12), 1)} exact on GPUs; "
                             f"{hours(flops / knn_flops_rate * STEP_CORES['knn'], W * C)} exact on CPUs")
            elif stage == "verify":
                cells.append(hours(n * pairs_per_image * pair_core_s, W * C))
            elif stage == "cluster":
                cells.append(hours(n * pairs_per_image * s0["cluster"]["s"] / counts["candidate_pairs"], 1))
            else:
                per = sum(s0[m]["s"] for m in ("mine_hardneg", "mine_manifold")) / n0
                cells.append(hours(n * per, 1))
        memory = {
            "ingest": "one row per image in the manifest (~0.2 KB): 2 GB on the driver",
            "embed": f"the model per actor; descriptors {1e7 * desc_bytes / 2**30:.0f} GiB in all, "
                     f"{1e7 * desc_bytes / W / 2**30:.1f} GiB per node when sharded",
            "knn": f"flat index {1e7 * desc_bytes / 2**30:.0f} GiB: shard by node, or PCA to 256-d + IVF-PQ "
                   f"({1e7 * 64 / 2**30:.1f} GiB at 64 B/vector)",
            "verify": f"features cache per actor ({256 * 0.5:.0f} MB at 256 images x 1000 features)",
            "cluster": f"pairs {1e7 * pairs_per_image * 3 * 8 / 2**30:.1f} GiB (a, b, inliers)",
            "mine": "descriptors of the tuples' pools only",
        }[stage]
        change = {
            "ingest": ("read in parallel on every node (Ray Data `read_images` or actors); "
                       "today a thread pool in one process"),
            "embed": "unchanged: Ray Data map_batches over GPU actors; decoding on the CPUs beside them",
            "knn": "the N^2 exact graph stops being affordable on CPUs: sharded GPU search "
                   "(faiss GPU flat per shard, merge top-k) or IVF with nprobe tuned on a sample",
            "verify": "a verification budget per image (k, or a similarity floor) keeps pairs linear in N",
            "cluster": "union-find over pairs stays linear; the pairs file is streamed",
            "mine": "hard negatives from the sharded kNN, not from a full similarity matrix",
        }[stage]
        lines.append(f"| {stage} | {cells[0]} | {cells[1]} | {memory} | {change} |")
    return lines


def write_generated(path: Path, name: str, lines: list[str]) -> None:
    """Replace the block between `<!-- name: begin -->` and `<!-- name: end -->` in `path`."""
    text = path.read_text(encoding="utf-8")
    begin, end = f"<!-- {name}: begin (written by benchmarks/scale.py) -->", f"<!-- {name}: end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{path}: no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    path.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")


def report(args: argparse.Namespace, run: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The Markdown of benchmarks/scale.md and the paper model's block of docs/scaling.md."""
    rows, through, cal = run["rows"], run["through"], run["cal"]
    started, load_start, load_end = dt.datetime.fromisoformat(run["started"]), run["load_start"], run["load_end"]
    table, exps = growth_table(rows)
    flops, peak, commit = run["flops"], run["peak_flops"], run["commit"]
    limit = peak / flops
    model = paper_model(rows, cal, args) + [
        "", f"(From `benchmarks/scale.py {run['command']}`, {started:%Y-%m-%d}, commit {commit}; "
        "the measured table is in benchmarks/scale.md.)"]
    verdicts = []
    for step, e in exps.items():
        if step == "knn":
            verdicts.append(f"kNN exponent {e:.2f}: exact search is 2 N^2 d FLOPs, so its exponent is bounded by 2 "
                            f"(below 2 while fixed costs still count); the paper model below says what replaces it")
        else:
            verdicts.append(f"{STEP_NAMES[step]}: exponent {e:.2f}, target <= {MAX_EXPONENT} "
                            f"{'met' if e <= MAX_EXPONENT else 'NOT met'}")
    through_lines = ["| images | plain loop, 2 torch threads: img/s | embed_images, 2 Ray workers: img/s | ratio | "
                     "ratio to the FLOP limit (plain, Ray) | load average |",
                     "|---|---|---|---|---|---|"]
    for r in through:
        ratio = r["ray"]["rate"] / r["plain"]["rate"]
        through_lines.append(
            f"| {r['n']} | {r['plain']['rate']:.1f} | {r['ray']['rate']:.1f} | {ratio:.2f} | "
            f"{r['plain']['rate'] / limit:.2f}, {r['ray']['rate'] / limit:.2f} | "
            f"{r['plain']['load'][0]:.1f} -> {r['ray']['load'][1]:.1f} |")
    emb_verdicts = [f"{r['n']} images: embed_images {r['ray']['rate'] / r['plain']['rate']:.2f}x the plain loop, "
                    f"target {EMBED_TARGET}x {'met' if r['ray']['rate'] / r['plain']['rate'] >= EMBED_TARGET else 'NOT met'}"
                    for r in through]
    count_lines = ["| N | scenes' views clustered | clusters | candidate pairs | verified pairs | pairs/s | "
                   "hardneg tuples | manifold tuples | generation s | load average |",
                   "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["counts"]
        count_lines.append(f"| {r['n']} | {c['clustered_images']} | {c['clusters']} | {c['candidate_pairs']} | "
                           f"{c['verified_pairs']} | {r['pairs_per_s']:.0f} | {r['steps']['mine_hardneg']['tuples']} | "
                           f"{r['steps']['mine_manifold']['tuples']} | {r['generate_s']:.0f} | "
                           f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} |")
    return [
        "# How cost grows with the collection",
        "",
        f"- Machine: {machine()}; commit {commit}.",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; 1/5/15-minute load average {load_start[0]:.1f}/{load_start[1]:.1f}/"
        f"{load_start[2]:.1f} at the start, {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at the end "
        f"({os.cpu_count()} cores: a load above {os.cpu_count()} means other jobs took cores).",
        f"- Command: `.venv/bin/python benchmarks/scale.py {run['command']}`".rstrip(),
        f"- Collections: `raytrieval.evaluation.synthetic`, 8 views per scene, 30% distractors, pictures at "
        f"{args.canvas_scale} of the demo's size (longer side {round(480 * args.canvas_scale)}-{round(640 * args.canvas_scale)} px); "
        f"EfficientNet-Lite0 GeM at longer side {args.max_size}, k={args.k} neighbours verified per image, "
        f"RootSIFT at {args.local_max_size} px (never upscaled).",
        "- Each stage runs in a child process as the commands run it (embedding and verification on 2 Ray "
        "actors); seconds are timed around the stage call, memory is the peak PSS of the child's process "
        "tree (the clean stage's embed, kNN, verification and cleaning share one process tree, so one "
        "figure). Exponent: least-squares slope of log(seconds) on log(N).",
        "",
        "## Growth",
        "",
        *table,
        "",
        *[f"- {v}." for v in verdicts],
        "",
        *count_lines,
        "",
        "## Embedding throughput",
        "",
        f"The first N images of the largest collection, at longer side {args.max_size}; timed from the call "
        "(model building and actor start included); both results agree to 1e-4. FLOP limit: "
        f"{flops / 1e9:.3f} GFLOP per image (torch `FlopCounterMode` over one forward pass at the images' own "
        f"sizes, mean of 16) into {peak / 1e9:.0f} GFLOP/s (the best of 5 float32 2048^3 matrix products on "
        f"2 torch threads) = **{limit:.0f} images/s**. The actor pool that embedding used before Ray Data is "
        "compared in benchmarks/embed_data.md.",
        "",
        *through_lines,
        "",
        *[f"- {v}." for v in emb_verdicts],
        "",
        "## Calibration at full size",
        "",
        f"{cal['n']} images at the demo's size (longer side 480-640 px), descriptors at 512 px, local features "
        f"at 1024 px (never upscaled): **{cal['embed_s_per_image'] * 1000:.0f} ms per image** to embed on 2 "
        f"actors, **{cal['verify_s_per_pair'] * 1000:.1f} ms per candidate pair** to verify on 2 actors; "
        f"clean stage peak PSS {mib(cal['pss'])} MiB.",
        "",
        "## Paper model: 1M and 10M images",
        "",
        *model,
        "",
        "The node-loss behaviour at scale is tested on a simulated 3-node cluster (tests/test_multinode.py: "
        "cleaning, embedding, training, serving; docs/scaling.md section 4).",
        "",
    ], model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,50000", help="collection sizes of the growth table")
    parser.add_argument("--throughput-sizes", default="1000,10000", help="images of the embedding comparison")
    parser.add_argument("--calibration", type=int, default=300, help="full-size images of the calibration run")
    parser.add_argument("--canvas-scale", type=float, default=0.25)
    parser.add_argument("--max-size", type=int, default=256)
    parser.add_argument("--local-max-size", type=int, default=1024)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1280, help="descriptor dimension (EfficientNet-Lite0)")
    parser.add_argument("--gpus", type=int, default=8, help="paper model: GPUs")
    parser.add_argument("--nodes", type=int, default=8, help="paper model: CPU nodes")
    parser.add_argument("--cores", type=int, default=32, help="paper model: cores per CPU node")
    parser.add_argument("--gpu-images-per-s", type=float, default=1500.0, help="paper model: embedding rate per GPU (assumed)")
    parser.add_argument("--gpu-tflops", type=float, default=20.0, help="paper model: effective kNN TFLOP/s per GPU (assumed)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--out", default="benchmarks/scale.md")
    parser.add_argument("--smoke-test", action="store_true", help="sizes 120,240, no Markdown")
    parser.add_argument("--report-only", action="store_true", help="render the last run's results.json again")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--opts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.step:
        print(json.dumps(run_step(args.step, args.run_dir, args.images, json.loads(args.opts))), flush=True)
        return 0
    sizes = [120, 240] if args.smoke_test else [int(s) for s in args.sizes.split(",")]
    through_sizes = [60] if args.smoke_test else [int(s) for s in args.throughput_sizes.split(",")]
    opts = {"canvas_scale": args.canvas_scale, "max_size": args.max_size, "local_max_size": args.local_max_size,
            "k": args.k, "sizes": sizes}
    args.work.mkdir(parents=True, exist_ok=True)
    log, saved = args.work / "scale.log", args.work / "results.json"
    if args.report_only:  # the numbers of the last complete run, rendered again
        run = json.loads(saved.read_text())
    else:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        run = {"started": dt.datetime.now(dt.timezone.utc).isoformat(), "load_start": os.getloadavg(),
               "command": " ".join(sys.argv[1:]), "commit": commit.stdout.strip()}
        run["rows"] = [growth_row(n, args.work, opts, log) for n in sizes]
        run["through"] = throughput_rows(through_sizes, args.work, opts, log)
        first = sorted(str(p) for p in (args.work / f"collection_{sizes[0]}" / "jpg").glob("*.jpg"))[:16]
        run["flops"], run["peak_flops"] = model_flops(args.max_size, first), cpu_peak_flops()
        run["cal"] = calibration(40 if args.smoke_test else args.calibration, args.work, opts, log)
        run["load_end"] = os.getloadavg()
        saved.write_text(json.dumps(run, indent=1))
    lines, model = report(args, run)
    if args.smoke_test:
        print("\n".join(lines))
        return 0
    write_generated(ROOT / "docs" / "scaling.md", "paper-model", model)
    return write_markdown(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
