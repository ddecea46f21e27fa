"""Does self-mAP rank configurations like the true mAP? Kendall tau and regret per collection.

For each collection (rparis6k-mini, ukbench-56, the demo), one run:
1. the clean stage on the benchmark's database images (used unlabeled) and the split stage
   (defaults: whole clusters, at most 30 % of the clustered images held out, seed 0);
2. every setting of the label-free re-ranking grid (`raytrieval.evaluation.selfval.rerank_grid`:
   none, alpha-QE k x alpha, diffusion k x kq) scored twice on the same off-the-shelf
   descriptors: self-mAP (pseudo-queries of the validation clusters cropped to their verified
   boxes, leave-one-out) and the true score (Medium mAP with the benchmark's queries cropped to
   their boxes; the N-S score for UKBench);
3. Kendall tau between the two orderings, and the regret: the true score of the setting
   self-mAP chose minus the best true score;
4. two diagnoses, side by side in the same run: the same pseudo-queries uncropped (the rule
   of model decisions), and the same cropped pseudo-queries scored with the benchmark's labels instead of
   the verified clusters (what is left is the error of the pseudo ground truth).

5. fine-tuning (`--epochs`, 0 to skip): two trainings on the clean and split stages above, the
   pipeline's default settings (`raytrieval.cluster.pipeline.DEMO_TRAIN`: triplet) and the same
   with `CONTRASTIVE` (the earlier default); every epoch is one model configuration, scored by
   the trainer itself: whole-image self-mAP (what chooses models), cropped self-mAP, and their
   mean, against the true score of the benchmark (the trainer's `val_dataset`, which never
   chooses). Tau and regret per rule over the (loss, epoch) configurations, and what the
   serving gate would do.

Writes benchmarks/selfval.md.

    python benchmarks/selfval.py [--datasets rparis6k-mini,ukbench-56,demo] [--epochs 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path: put the repository root there.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

from benchmarks.baseline import machine, write_markdown  # noqa: E402
from raytrieval.evaluation.datasets import prepare_benchmark  # noqa: E402
from raytrieval.cluster.pipeline import DEMO_TRAIN, Pipeline, PipelineConfig  # noqa: E402
from raytrieval.cluster.runtime import init_ray  # noqa: E402
from raytrieval.evaluation.rerank import rerank  # noqa: E402
from raytrieval.evaluation.selfval import SelfValSet, describe, gate, rerank_grid, select_rerank  # noqa: E402
from raytrieval.mining.embed import embed_images  # noqa: E402
from raytrieval.mining.split import SplitConfig, read_split, split_stage  # noqa: E402
from raytrieval.mining.stages import CleanConfig, clean, read_descriptors  # noqa: E402
from raytrieval.retrieval.manifest import build_manifest, read_manifest, write_manifest  # noqa: E402
from raytrieval.retrieval.model import ModelSpec  # noqa: E402
from raytrieval.trainers.data import selfval_for  # noqa: E402
from raytrieval.trainers.fit import fit  # noqa: E402

CONTRASTIVE = {"loss": "contrastive", "margin": 0.7, "lr": 1.0e-5}  # the pipeline's default before this benchmark
LOSSES = {"triplet": {}, "contrastive": CONTRASTIVE}  # over the pipeline's default training (DEMO_TRAIN)
RULES = {  # label-free figures of a model configuration, from the trainer's history
    "whole-image self-mAP (chooses)": lambda h: h["self_map"],
    "self-mAP (cropped)": lambda h: h["self_map_crop"],
    "mean of both": lambda h: (h["self_map"] + h["self_map_crop"]) / 2,
}


def true_score(bench, cfg, Q: np.ndarray, X: np.ndarray) -> float:
    """Medium mAP (revisitop) or N-S score (grouped) of a re-ranking setting."""
    metrics = bench.evaluate(rerank(cfg, Q, X).ranks)
    return float(metrics["medium"]["map"]) if "medium" in metrics else float(metrics["ns_score"])


def true_labels(bench, order: np.ndarray, sv: SelfValSet) -> SelfValSet:
    """The pseudo-queries with the benchmark's ground truth (diagnosis only): positives are the
    images sharing a query's positive list (or group) with the pseudo-query, images in no
    positive list are junk; pseudo-queries in no positive list are dropped.

    Args:
        order: (N,) benchmark database index of each collection image.
    """
    n = order.size
    if bench.groups is not None:
        group = np.asarray(bench.groups)[order]
        same = [np.flatnonzero(group == group[q]) for q in sv.queries]
        unknown = np.zeros(n, bool)
    else:
        where = {int(b): i for i, b in enumerate(order)}
        pos = [np.array([where[int(j)] for j in np.r_[g["easy"], g["hard"]] if int(j) in where], np.int64) for g in bench.gnd]
        unknown = np.ones(n, bool)
        for p in pos:
            unknown[p] = False
        same = [np.unique(np.concatenate([p for p in pos if q in p] or [np.zeros(0, np.int64)])) for q in sv.queries]
    keep = [k for k, s in enumerate(same) if np.setdiff1d(s, [sv.queries[k]]).size]
    gnd = [{"ok": np.setdiff1d(same[k], [sv.queries[k]]),
            "junk": np.union1d(np.flatnonzero(unknown), [sv.queries[k]]).astype(np.int64)} for k in keep]
    return SelfValSet(sv.queries[keep], gnd, [sv.boxes[k] for k in keep])


def run_collection(name: str, data_root: str, run_root: Path, workers: int) -> dict:
    bench = prepare_benchmark(name, data_root)
    run = run_root / name
    run.mkdir(parents=True, exist_ok=True)
    write_manifest(build_manifest(bench.images, root=Path(bench.images[0]).parent, progress=False), run / "images.parquet")
    t0 = time.perf_counter()
    spec = ModelSpec()
    clean(CleanConfig(run_dir=str(run), model=spec, workers=workers, progress=False))
    split = split_stage(SplitConfig(run_dir=str(run)))
    ids, X, failures = read_descriptors(run / "descriptors.parquet")
    if failures:
        raise ValueError(f"{name}: {len(failures)} images failed to embed")
    sv = selfval_for(ids, str(run / "clusters.parquet"), str(run / "split.parquet"), str(run / "knn.parquet"))
    sizes = np.unique(read_split(run / "split.parquet").column("cluster_id").to_numpy(), return_counts=True)[1]
    grid = rerank_grid(len(ids), sizes)
    uri = dict(zip(*(read_manifest(run / "images.parquet").column(c).to_pylist() for c in ("image_id", "uri"))))
    Q = embed_images(spec.to_dict(), [uri[ids[q]] for q in sv.queries], sv.boxes, scales=spec.scales,
                     max_size=spec.max_size, workers=workers, progress=False).descriptors
    chosen, selfs = select_rerank(X, sv, grid, Q)
    whole = select_rerank(X, sv, grid)
    # the true score over the benchmark's own order of images; queries cropped to their box
    stem = {Path(p).stem: i for i, p in enumerate(bench.images)}
    order = np.array([stem[i.split("/")[-1]] for i in ids])
    oracle = true_labels(bench, order, sv)
    kept = np.isin(sv.queries, oracle.queries)
    labelled = select_rerank(X, oracle, grid, Q[kept])
    Xb = np.ascontiguousarray(X[np.argsort(order)])
    if bench.protocol == "grouped":
        Qb = Xb
    else:
        Qb = embed_images(spec.to_dict(), bench.queries, bench.qboxes, scales=spec.scales, max_size=spec.max_size,
                          workers=workers, progress=False).descriptors
    trues = [true_score(bench, cfg, Qb, Xb) for cfg in grid]
    tau = kendalltau(selfs, trues).statistic
    best = int(np.argmax(trues))
    diagnoses = {label: {"chosen": c, "self": s, "tau": float(kendalltau(s, trues).statistic)}
                 for label, (c, s) in (("whole-image pseudo-queries", whole), ("benchmark labels", labelled))}
    return {
        "name": name, "images": len(ids), "split": split, "pseudo_queries": sv.num_queries, "grid": grid,
        "self": selfs, "true": trues, "chosen": chosen, "best": best, "tau": float(tau), "diagnoses": diagnoses,
        "labelled_queries": oracle.num_queries,
        "seconds": time.perf_counter() - t0,
        "unit": "Medium mAP" if bench.protocol != "grouped" else "N-S score",
        "scale": 100.0 if bench.protocol != "grouped" else 1.0,  # mAP in points; N-S in images of 4
    }


def finetune_collection(name: str, data_root: str, run: Path, epochs: int) -> dict:
    """Train each of `LOSSES` for `epochs` on the collection's clean and split stages; the
    trainer's history per loss (self-mAP, whole-image self-mAP and the benchmark's score)."""
    t0 = time.perf_counter()
    histories = {}
    for loss, overrides in LOSSES.items():
        train = {**DEMO_TRAIN, **overrides, "epochs": epochs, "name": loss, "registered_model": None}
        cfg = Pipeline(PipelineConfig(run_dir=str(run), benchmark=name, data_root=data_root, train=train)).train_config()
        histories[loss] = fit(cfg, track=False).history
    return {"histories": histories, "seconds": time.perf_counter() - t0}


def true_of(h: dict) -> float:
    """The benchmark's score of an epoch: Medium mAP, or the N-S score for UKBench."""
    return float(h["val_map_medium"] if "val_map_medium" in h else h["val_ns_score"])


def finetune_lines(results: list[dict]) -> list[str]:
    """The fine-tuning section: per collection, every (loss, epoch) and each rule's choice."""
    if not results:
        return []
    margin = PipelineConfig().gate_margin
    lines = ["", "## Fine-tuning epochs of two losses: which label-free figure picks the model?", "",
             f"Each collection trains twice on its clean and split stages: the pipeline's default settings "
             f"({DEMO_TRAIN['loss']}, margin {DEMO_TRAIN['margin']}, lr {DEMO_TRAIN['lr']:g}) and contrastive (margin "
             f"{CONTRASTIVE['margin']}, lr {CONTRASTIVE['lr']:g}); the other settings are the pipeline's "
             f"({DEMO_TRAIN['num_queries']} tuples per epoch, {DEMO_TRAIN['image_size']} px). The configurations are "
             "epoch 0 (off-the-shelf) and every later epoch of each loss. A rule chooses the configuration with its "
             f"highest figure; the gate serves it if it beats epoch 0 by more than {100 * margin:.1f} points, else "
             "off-the-shelf. Served gain: true score served minus true score off-the-shelf.", "",
             "| collection | rule | Kendall tau | chosen | gate serves | served gain | best (true) | regret |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        k = r["scale"]
        digits = 1 if k == 100 else 3
        configs = [("off-the-shelf", r["finetune"]["histories"]["triplet"][0])]
        configs += [(f"{loss} epoch {h['epoch']}", h) for loss, hs in r["finetune"]["histories"].items() for h in hs[1:]]
        trues = [true_of(h) for _, h in configs]
        best = int(np.argmax(trues))
        for rule, figure in RULES.items():
            scores = [figure(h) for _, h in configs]
            chosen = int(np.argmax(scores))
            serve, _ = gate(scores[chosen], scores[0], margin)
            served = chosen if serve else 0
            tau = kendalltau(scores, trues).statistic
            lines.append(f"| {r['name']} | {rule} | {'n/a (all equal)' if tau != tau else f'{tau:.2f}'} | {configs[chosen][0]} | "
                         f"{configs[served][0]} | {k * (trues[served] - trues[0]):+.{digits}f} | "
                         f"{configs[best][0]} ({k * trues[best]:.{digits}f}) | {k * (trues[best] - trues[served]):.{digits}f} |")
    for r in results:
        k = r["scale"]
        digits = 1 if k == 100 else 3
        lines += ["", f"### {r['name']}: every epoch ({r['finetune']['seconds']:.0f} s of training and validation)", "",
                  f"| loss | epoch | loss value | whole-image self-mAP | self-mAP (cropped) | mean | true {r['unit']} |",
                  "|---|---|---|---|---|---|---|"]
        for loss, hs in r["finetune"]["histories"].items():
            for h in hs:
                value = f"{h['loss']:.4f}" if isinstance(h.get("loss"), float) else "-"
                lines.append(f"| {loss} | {h['epoch']} | {value} | {100 * h['self_map']:.1f} | {100 * h['self_map_crop']:.1f} | "
                             f"{50 * (h['self_map'] + h['self_map_crop']):.1f} | {k * true_of(h):.{digits}f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--demo-root", default="runs/data")
    parser.add_argument("--datasets", default="rparis6k-mini,ukbench-56,demo")
    parser.add_argument("--runs", default="runs/bench-selfval")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per loss (0: no fine-tuning section)")
    parser.add_argument("--out", default="benchmarks/selfval.md")
    args = parser.parse_args(argv)
    init_ray(None)
    load0 = os.getloadavg()[0]
    results = []
    for d in args.datasets.split(","):
        root = args.demo_root if d == "demo" else args.data_root
        results.append(run_collection(d, root, Path(args.runs), args.workers))
        if args.epochs:
            results[-1]["finetune"] = finetune_collection(d, root, Path(args.runs) / d, args.epochs)
    load1 = os.getloadavg()[0]
    lines = [
        "# Self-mAP against the true score: does the label-free metric choose well?",
        "",
        f"- machine: {machine()}",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; load average {load0:.1f} at the start, "
        f"{load1:.1f} at the end (the machine is shared)",
        "- command: `" + " ".join(["python benchmarks/selfval.py", *(argv if argv is not None else sys.argv[1:])]) + "`",
        "- model: EfficientNet-Lite0 ImageNet, GeM p=3, 512 px, off-the-shelf (the re-ranking grid; fine-tuned models "
        "in the last section); clean stage "
        "defaults (k=10, 15 inliers); split stage defaults (whole verified clusters held out, at most 30 % of the clustered images, seed 0).",
        "- configurations: the label-free re-ranking grid (none, alpha-QE, diffusion). Self-mAP: pseudo-queries of "
        "the validation clusters cropped to their verified boxes, left out of the database, cluster mates positive, "
        "kNN-linked unclustered images junk. True score: the benchmark's queries (cropped to their box) and ground truth.",
        "- targets of issue 14: tau >= 0.6 and regret <= 1.5 points on each collection.",
        "",
        "| collection | images | verified clusters (val) | pseudo-queries | Kendall tau | chosen | its true score | "
        "best true score | regret (points) | no re-ranking | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, k, t = r["split"]["counts"], r["scale"], r["true"]
        digits = 1 if k == 100 else 3
        lines.append(
            f"| {r['name']} ({r['unit']}) | {r['images']} | {c['clusters']} ({c['val_clusters']}) | {r['pseudo_queries']} | "
            f"{r['tau']:.2f} | {describe(r['grid'][r['chosen']])} | {k * t[r['chosen']]:.{digits}f} | "
            f"{k * t[r['best']]:.{digits}f} ({describe(r['grid'][r['best']])}) | {k * (t[r['best']] - t[r['chosen']]):.{digits}f} | "
            f"{k * t[0]:.{digits}f} | {r['seconds']:.0f} |")
    lines += ["", "Regret is in the collection's unit: mAP points, or images of 4 for the N-S score.", "",
              "## Where the error is: the same run, two other pseudo ground truths", "",
              "Whole-image: the pseudo-queries not cropped (the rule of model decisions, see the last section). Benchmark labels: the same "
              "cropped pseudo-queries, positives and junk from the benchmark's ground truth instead of the verified "
              "clusters (pseudo-queries no benchmark query lists as a positive are dropped): what it gains over "
              "self-mAP is the error of the pseudo ground truth, what it still misses is the error of the pseudo-queries.",
              "", "| collection | rule | pseudo-queries | Kendall tau | chosen | regret (points) |", "|---|---|---|---|---|---|"]
    for r in results:
        k, t = r["scale"], r["true"]
        digits = 1 if k == 100 else 3
        rows = [("self-mAP (cropped, verified clusters)", r["pseudo_queries"], r["tau"], r["chosen"])]
        rows += [(label, r["labelled_queries"] if label == "benchmark labels" else r["pseudo_queries"], d["tau"], d["chosen"])
                 for label, d in r["diagnoses"].items()]
        lines += [f"| {r['name']} | {label} | {nq} | {tau:.2f} | {describe(r['grid'][c])} | {k * (t[r['best']] - t[c]):.{digits}f} |"
                  for label, nq, tau, c in rows]
    for r in results:
        k = r["scale"]
        whole, labelled = (r["diagnoses"][d]["self"] for d in ("whole-image pseudo-queries", "benchmark labels"))
        lines += ["", f"## {r['name']}: every setting", "",
                  f"| setting | self-mAP | whole-image self-mAP | with benchmark labels | true {r['unit']} |", "|---|---|---|---|---|"]
        lines += [f"| {describe(g)} | {100 * s:.1f} | {100 * w:.1f} | {100 * b:.1f} | {k * t:.{1 if k == 100 else 3}f} |"
                  for g, s, w, b, t in zip(r["grid"], r["self"], whole, labelled, r["true"])]
    lines += finetune_lines([r for r in results if "finetune" in r])
    return write_markdown(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
