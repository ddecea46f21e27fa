"""Descriptor heads side by side: GeM, CroW, SPoC, neural codes, regional attention (off the
shelf and trained on the clean stage's pseudo-landmarks), mAP on rparis6k-mini, N-S on ukbench-56.

    .venv/bin/python benchmarks/heads.py --data-root ../shared/data --clean-root /tmp/svb --out benchmarks/heads.md

1. The clean stage of each benchmark's database images, used unlabeled: `<clean-root>/<dataset>`
   with images.parquet and clusters.parquet (run here with the recognition benchmark's settings
   when absent: off-the-shelf GeM p=3, top-10 kNN, RootSIFT + homography, 15 inliers).
2. The attention head trained on those clusters with the backbone frozen, through the product
   path (`raytrieval.trainers.attention.train_attention`, defaults: at most 30 epochs, AdamW
   1e-3, cosine classifier scale 16), saved as a checkpoint and loaded back. The reported row
   trains on the split stage's training clusters and keeps the epoch of best self-mAP on its
   validation clusters (`split.parquet`, written here with the split stage's defaults when
   absent); the row for information is the trainer's fallback without a split: every cluster,
   all epochs, unvalidated.
3. One ImageNet EfficientNet-Lite0 pass per image (longer side 512, single scale; queries
   cropped to their boxes); every head is applied to the same conv maps (the heads are exactly
   `RetrievalNet.head`, checked against `extract_descriptors` of the trained checkpoint).
   Neural codes: 512-d, seeded random orthogonal fc + ReLU on SPoC (not trained here: it is
   learned by `raytrieval train`, which this benchmark does not run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.baseline import machine, score, write_markdown  # noqa: E402
from raytrieval.evaluation.datasets import Benchmark, prepare_benchmark  # noqa: E402
from raytrieval.retrieval.checkpoint import load_checkpoint  # noqa: E402
from raytrieval.retrieval.extract import extract_descriptors, prepare_image, scale_features  # noqa: E402
from raytrieval.retrieval.model import ModelSpec, RetrievalNet  # noqa: E402
from raytrieval.retrieval.pooling import l2n  # noqa: E402
from raytrieval.trainers.attention import AttentionConfig, train_attention  # noqa: E402

HEADS = {  # row name -> off-the-shelf spec
    "GeM (p=3)": ModelSpec(pooling="gem", pooling_kwargs={"p": 3.0}),
    "CroW": ModelSpec(pooling="crow"),
    "SPoC": ModelSpec(pooling="spoc"),
    "neural codes (512-d, off the shelf)": ModelSpec(pooling="neural_codes", pooling_kwargs={"dim": 512}),
    "attention (off the shelf = SPoC)": ModelSpec(pooling="attention"),
}
TRAINED = "attention (trained, epoch by self-mAP)"
UNVALIDATED = "attention (trained, every cluster, all epochs; for information)"


def ensure_split(run: Path) -> None:
    """The split stage's `split.parquet` in `run` (its defaults), written when missing."""
    from raytrieval.mining.split import SPLIT_FILE, SplitConfig, split_stage

    if not (run / SPLIT_FILE).is_file():
        split_stage(SplitConfig(run_dir=str(run)))


def unvalidated_run(run: Path, work: Path) -> Path:
    """A run directory with `run`'s manifest and clusters but no split (the trainer's fallback)."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("images.parquet", "clusters.parquet"):
        (work / name).unlink(missing_ok=True)
        (work / name).symlink_to((run / name).resolve())
    return work


def ensure_clean(bench: Benchmark, run: Path) -> dict | None:
    """The clean stage's outputs in `run`; run the stage there when clusters.parquet is missing."""
    if (run / "clusters.parquet").is_file() and (run / "images.parquet").is_file():
        return None
    from raytrieval.mining.stages import CleanConfig, clean
    from raytrieval.mining.verify import VerifyConfig
    from raytrieval.retrieval.manifest import build_manifest, write_manifest

    run.mkdir(parents=True, exist_ok=True)
    ids = [Path(x).stem for x in bench.images]
    write_manifest(build_manifest(dict(zip(ids, bench.images)), progress=False), run / "images.parquet")
    return clean(CleanConfig(run_dir=str(run), model=ModelSpec(max_size=512, pooling_kwargs={"p": 3.0}), workers=0,
                             k=10, verify=VerifyConfig(max_features=1000), min_inliers=15, progress=False))


def descriptors(models: dict[str, RetrievalNet], images: list[str], boxes: list, max_size: int) -> dict[str, np.ndarray]:
    """{head: (N, D)} with one backbone pass per image."""
    trunk = next(iter(models.values()))
    out: dict[str, list[np.ndarray]] = {name: [] for name in models}
    for path, box in zip(images, boxes):
        (f,) = scale_features(trunk, prepare_image(path, box, max_size)[None], (1.0,))
        with torch.no_grad():
            for name, model in models.items():
                out[name].append(l2n(model.head(f))[0].numpy())
    return {k: np.ascontiguousarray(np.stack(v), dtype=np.float32) for k, v in out.items()}


def run_dataset(name: str, args: argparse.Namespace) -> tuple[list[str], str]:
    bench = prepare_benchmark(name, args.data_root)
    run = Path(args.clean_root) / name
    t0 = time.perf_counter()
    cleaned = ensure_clean(bench, run)
    clean_note = f"clean stage run here ({time.perf_counter() - t0:.0f} s)" if cleaned else f"existing clean stage `{run}`"

    models = {row: RetrievalNet(ModelSpec(**{**spec.to_dict(), "max_size": args.max_size})).eval()
              for row, spec in HEADS.items()}
    trunk = models["GeM (p=3)"].backbone.state_dict()
    ensure_split(run)
    trained = {}  # row -> (facts, seconds)
    work = Path(args.work) / name
    for row, run_dir, out in ((TRAINED, run, "attention"),
                              (UNVALIDATED, unvalidated_run(run, work / "no-split"), "attention-no-split")):
        t0 = time.perf_counter()
        facts = train_attention(AttentionConfig(run_dir=str(run_dir), out=str(work / out), max_size=args.max_size,
                                                epochs=args.epochs))
        trained[row] = facts, time.perf_counter() - t0
        models[row] = load_checkpoint(facts["checkpoint"])
        for k, v in models[row].backbone.state_dict().items():  # the backbone stayed frozen
            assert torch.equal(trunk[k], v), k

    t0 = time.perf_counter()
    db = descriptors(models, bench.images, [None] * bench.num_images, args.max_size)
    grouped = bench.protocol == "grouped"  # queries are the database images
    q = db if grouped else descriptors(models, bench.queries, bench.qboxes, args.max_size)
    embed_s = time.perf_counter() - t0
    check = extract_descriptors(models[TRAINED], bench.images[:2], max_size=args.max_size, progress=False)
    np.testing.assert_allclose(db[TRAINED][:2], check, atol=1e-4)  # the head path is the product's path

    rows, maps = [], {}
    for row in models:
        m = maps[row] = score(bench, q[row], db[row])
        dim = db[row].shape[1]
        if grouped:
            rows.append(f"| {name} | {row} | {dim} | {m['ns_score']:.2f} | {100 * m['map']:.1f} | | |")
        else:
            cells = " | ".join(f"{100 * m[p]['map']:.1f}" for p in ("easy", "medium", "hard"))
            rows.append(f"| {name} | {row} | {dim} | | {cells} |")
        print(rows[-1], flush=True)
    facts = trained[UNVALIDATED][0]  # trained on every cluster
    notes = [f"- {name}: {clean_note}; {facts['classes']} pseudo-landmark classes (clusters of >= 2 images), "
             f"{facts['images']} images. Embedding {bench.num_images} database images"
             + ("" if grouped else f" + {len(bench.queries)} queries") + f", all heads: {embed_s:.0f} s."]
    if not grouped:  # the learned heads against SPoC, the pooling they start from
        for row in [r for r in models if r.startswith(("neural", "attention ("))]:
            delta = ", ".join(f"{p[0].upper()} {100 * (maps[row][p]['map'] - maps['SPoC'][p]['map']):+.1f}"
                              for p in ("easy", "medium", "hard"))
            notes.append(f"  - {row} against SPoC: mAP {delta} points.")
    for row, (facts, train_s) in trained.items():
        kept = (f"epoch {facts['best_epoch']} kept of {facts['epochs_trained']} trained (self-mAP by epoch, 0 = "
                f"untrained: {', '.join(f'{100 * v:.1f}' for v in facts['self_map_by_epoch'])})"
                if "best_epoch" in facts else f"{facts['epochs_trained']} epochs")
        notes.append(
            f"  - {row}: {facts['classes']} training classes, {facts['images']} images, "
            f"{facts['validation_images']} validation images; {kept}; rule: {facts['stopping']}.")
        notes.append(
            f"    {train_s:.0f} s (conv maps {facts['maps_s']:.0f} s, fit "
            f"{facts['fit_s']:.0f} s); classifier accuracy on its training images {100 * facts['accuracy']:.1f}% "
            f"(loss {facts['loss']:.3f}); leave-one-out nearest-cluster-mean accuracy of the pooled descriptors "
            f"{100 * facts['nearest_mean_accuracy_before']:.1f}% (SPoC) -> {100 * facts['nearest_mean_accuracy_after']:.1f}%.")
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--datasets", default="rparis6k-mini,ukbench-56")
    p.add_argument("--clean-root", default="runs/bench-recognition",
                   help="folder of clean-stage run directories, one per dataset (<clean-root>/<dataset>)")
    p.add_argument("--work", default="runs/bench-heads", help="where the trained attention checkpoints go")
    p.add_argument("--max-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=AttentionConfig.epochs,
                   help="most attention training epochs (default: the trainer's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: two threads on 2 cores shared with another job ran 20x slower)")
    p.add_argument("--out", default="benchmarks/heads.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    rows, notes = [], []
    for name in args.datasets.split(","):
        r, n = run_dataset(name, args)
        rows += r
        notes += n
    load_end = os.getloadavg()
    lines = [
        "# Descriptor heads: neural codes and regional attention against GeM, CroW and SPoC",
        "",
        f"Measured {dt.date.today()} on {machine()}; the whole script took "
        f"{(time.perf_counter() - started) / 60:.1f} min. 1/5/15-minute load average "
        f"{load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f} at the start, "
        f"{load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at the end (2 cores shared with other jobs; "
        f"torch threads={torch.get_num_threads()}).",
        "",
        f"Command: `.venv/bin/python benchmarks/heads.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip(),
        "",
        "ImageNet EfficientNet-Lite0, longer side 512, single scale, no whitening or re-ranking; queries cropped to",
        "their boxes. The trained attention head saw only the clean stage's clusters of the database images (no",
        "labels); its backbone is frozen and identical to the other rows'. See the script's docstring.",
        "",
        "| dataset | head | dim | N-S | mAP E | mAP M | mAP H |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "mAP E/M/H: revisited protocol (Easy, Medium, Hard) for rparis6k-mini; ukbench-56: N-S score (of 4) and mAP.",
        "",
        "## Training and timings",
        "",
        *notes,
        "",
    ]
    return write_markdown(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
