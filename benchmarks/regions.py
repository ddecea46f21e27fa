"""Region-wise re-ranking: CA-SR (Salvador et al. 2016) against filtering, QE and the fixed grid,
and how well CA-SR's boxes localise the query object (demo ground-truth boxes).

    .venv/bin/python benchmarks/regions.py --data-root ../shared/data --out benchmarks/regions.md

Everything goes through the product's `raytrieval eval` path: `embed_benchmark` (descriptors),
`benchmark_access` (query-box and proposal descriptors, R-MAC grid regions, cached per image) and
`rerank` (the `casr`, `aqe` and `region` steps). Each model's descriptors are computed once per
dataset; every row re-ranks them. Proposal descriptors depend on the backbone only, so the GeM
and SPoC rows of the off-the-shelf model share them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path: put the repository root there
# instead, so that `benchmarks.*` resolves.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.baseline import machine, write_markdown  # noqa: E402
from raytrieval.cluster.eval_stage import EvalConfig, embed_benchmark  # noqa: E402
from raytrieval.evaluation.datasets import prepare_benchmark  # noqa: E402
from raytrieval.evaluation.image_access import benchmark_access  # noqa: E402
from raytrieval.evaluation.datasets import Benchmark  # noqa: E402
from raytrieval.evaluation.rerank import ImageAccess, RerankConfig, RerankResult, rerank  # noqa: E402
from raytrieval.retrieval.model import ModelSpec  # noqa: E402

PROTOCOLS = ("medium", "hard")
LOC_TOP = 10  # localisation is scored on the true positives of each query's top 10
LOC_IOU = 0.5


@dataclasses.dataclass
class Model:
    """One evaluated model: a label and its `EvalConfig` (off-the-shelf spec or checkpoint)."""

    label: str
    cfg: EvalConfig
    backbone_key: str  # models with the same key share proposal descriptors
    region_row: bool  # also run the fixed-grid `region` step (one more pass over the images)


def models(args: argparse.Namespace, name: str, root: str) -> list[Model]:
    out = []
    for i, pooling in enumerate(args.poolings.split(",")):
        spec = ModelSpec(pooling=pooling, max_size=args.max_size)
        out.append(Model(f"off-the-shelf {pooling}", EvalConfig(dataset=name, data_root=root, model=spec, workers=0),
                         "off-the-shelf", region_row=i == 0))
    if args.checkpoint:
        cfg = EvalConfig(dataset=name, data_root=root, checkpoint=args.checkpoint, workers=0)
        out.append(Model(f"fine-tuned {Path(args.checkpoint).name}", cfg, args.checkpoint, region_row=True))
    return out


def proposal_access(cache: dict, model: Model, bench: Benchmark, pool: str, regions: str | None) -> ImageAccess:
    """The cached query-box / proposal access of a backbone, pooling and proposal source."""
    key = (model.backbone_key, pool, regions)
    if key not in cache:
        cache[key] = benchmark_access(bench, model.cfg.source, regions, pool)
    return cache[key]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of (n, 4) boxes a and b (torchvision.ops.box_iou, diagonal)."""
    from torchvision.ops import box_iou as tv_box_iou

    if len(a) == 0:
        return np.zeros(0, np.float32)
    return tv_box_iou(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).diagonal().numpy()


def localisation(bench: Benchmark, res: RerankResult, truth: dict[str, dict], top: int) -> dict[str, float]:
    """IoU of the returned box against the object's true box, over each query's top-10 true positives.

    Only the leading `top` images of a ranking were re-ranked and have a box (`top` < 10 in a
    smoke run). Also the IoU a whole-image box would get on the same images (the reference
    that no localisation gives).
    """
    found, true, whole = [], [], []
    for q, g in enumerate(bench.gnd):
        positives = set(np.concatenate([g["easy"], g["hard"]]).tolist())
        for idx in res.ranks[q, : min(LOC_TOP, top)]:
            if int(idx) not in positives:
                continue
            rec = truth[Path(bench.images[idx]).stem]
            if int(idx) not in res.boxes[q]:
                raise ValueError(f"localisation: no box for database image {idx} of query {q}")
            found.append(res.boxes[q][int(idx)])
            true.append(rec["bbx"])
            whole.append((0, 0, rec["width"], rec["height"]))
    iou = box_iou(np.array(found).reshape(-1, 4), np.array(true).reshape(-1, 4))
    ref = box_iou(np.array(whole).reshape(-1, 4), np.array(true).reshape(-1, 4))
    return {"n": len(iou), "share": float((iou >= LOC_IOU).mean()) if len(iou) else float("nan"),
            "median": float(np.median(iou)) if len(iou) else float("nan"),
            "whole_share": float((ref >= LOC_IOU).mean()) if len(ref) else float("nan"),
            "whole_median": float(np.median(ref)) if len(ref) else float("nan")}


def demo_truth(root: str) -> dict[str, dict]:
    """Demo image name -> its record in demo.json (width, height, bbx of the visible object)."""
    return json.loads((Path(root) / "demo" / "demo.json").read_text(encoding="utf-8"))["images"]


def dataset_rows(args: argparse.Namespace, name: str, root: str, regions: dict[str, str]
                 ) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(mAP rows, localisation rows, scores) of one dataset.

    scores: {(model, configuration): Medium mAP} and {(model, "loc " + configuration): % of
    localisations with IoU >= 0.5}, in percent, for `targets`.
    """
    bench = prepare_benchmark(name, root)
    truth = demo_truth(root) if name == "demo" else None
    pools = args.casr_pools.split(",")
    cache: dict = {}
    rows, loc_rows, scores = [], [], {}
    for model in models(args, name, root):
        t = time.perf_counter()
        q, x, _ = embed_benchmark(model.cfg, bench)
        print(f"{name} {model.label}: embedded in {time.perf_counter() - t:.0f} s", flush=True)
        access = benchmark_access(bench, model.cfg.source)
        runs: list[tuple[str, str, RerankConfig, ImageAccess]] = [
            ("filtering only", "", RerankConfig(), access),
            ("QE", "", RerankConfig(steps=("aqe",)), access),
        ]
        if model.region_row:
            rc = RerankConfig(steps=("region",), region_top=args.region_top)
            runs.append(("fixed-grid region", "R-MAC grid L=3", rc, access))
        sources = [("grid", None)] + ([("learned RPN", regions[name])] if name in regions else [])
        for pool in pools:
            for kind, path in sources:
                pa = proposal_access(cache, model, bench, pool, path)
                both = dataclasses.replace(access, query_region=pa.query_region, db_proposals=pa.db_proposals)
                for steps, label in ((("casr",), "CA-SR"), (("casr", "aqe"), "CA-SR + QE")):
                    rc = RerankConfig(steps=steps, casr_top=args.casr_top, casr_pool=pool)
                    runs.append((label, f"{kind}, RPA-{pool}", rc, both))
        for label, proposals, rc, acc in runs:
            t = time.perf_counter()
            res = rerank(rc, q, x, acc)
            wall = time.perf_counter() - t
            m = bench.evaluate(res.ranks)
            cells = " | ".join(f"{100 * m[p]['map']:.1f}" for p in PROTOCOLS)
            rows.append(f"| {name} | {model.label} | {label} | {proposals} | {cells} | {1000 * wall / len(q):.0f} |")
            scores[(model.label, f"{label} {proposals}".strip())] = 100 * m["medium"]["map"]
            print(rows[-1], flush=True)
            if truth is not None and res.boxes and any(res.boxes):
                loc = localisation(bench, res, truth, rc.casr_top if "casr" in rc.steps else rc.region_top)
                loc_rows.append(
                    f"| {model.label} | {label} | {proposals} | {loc['n']} | {100 * loc['share']:.1f} | "
                    f"{loc['median']:.2f} | {100 * loc['whole_share']:.1f} | {loc['whole_median']:.2f} |")
                scores[(model.label, f"loc {label} {proposals}")] = 100 * loc["share"]
                print(loc_rows[-1], flush=True)
    return rows, loc_rows, scores


def targets(results: dict[str, dict], pools: list[str]) -> list[str]:
    """Met / missed lines for the issue's two targets, from this run's numbers."""
    lines = []
    r = results.get("rparis6k-mini")
    if r is not None and ("off-the-shelf gem", "filtering only") in r:
        base = r[("off-the-shelf gem", "filtering only")]
        for pool in pools:
            got = r.get(("off-the-shelf gem", f"CA-SR + QE grid, RPA-{pool}"))
            if got is not None:
                verdict = "met" if got - base >= 6 else "missed"
                lines.append(f"- CA-SR + QE (grid, RPA-{pool}) at least +6 Medium over plain GeM on rparis6k-mini: "
                             f"{got:.1f} vs {base:.1f} ({got - base:+.1f}): **{verdict}**.")
    d = results.get("demo")
    if d is not None:
        for pool in pools:
            got = d.get(("off-the-shelf gem", f"loc CA-SR grid, RPA-{pool}"))
            if got is not None:
                verdict = "met" if got >= 70 else "missed"
                lines.append(f"- Localisation IoU >= {LOC_IOU} for >= 70% of the top-{LOC_TOP} true positives on the demo "
                             f"(GeM filtering, CA-SR grid, RPA-{pool}): {got:.1f}%: **{verdict}**.")
    return lines or ["- Not evaluated in this run (rparis6k-mini / demo with GeM not among the datasets)."]


def parse_regions(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise ValueError(f"--regions: expected DATASET=PATH to an existing regions.parquet, got {item!r}")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--demo-root", default="runs/data")
    p.add_argument("--datasets", default="rparis6k-mini,demo")
    p.add_argument("--poolings", default="gem,spoc", help="global descriptors of the off-the-shelf model (first: + region row)")
    p.add_argument("--casr-top", type=int, default=RerankConfig.casr_top)
    p.add_argument("--casr-pools", default="sum,max", help="proposal pooling(s): sum (RPA-sum), max (RPA-max)")
    p.add_argument("--region-top", type=int, default=RerankConfig.region_top)
    p.add_argument("--max-size", type=int, default=ModelSpec.max_size)
    p.add_argument("--checkpoint", default=None, help="fine-tuned checkpoint directory to evaluate as well")
    p.add_argument("--regions", action="append", default=[], metavar="DATASET=PATH",
                   help="learned proposals (regions.parquet keyed by image name) for a dataset's CA-SR rows")
    p.add_argument("--out", default="benchmarks/regions.md")
    args = p.parse_args(argv)
    regions = parse_regions(args.regions)

    load_start, t0 = os.getloadavg(), time.perf_counter()
    rows, loc_rows, results = [], [], {}
    names = args.datasets.split(",")
    for done, name in enumerate(names, 1):
        r, lr, res = dataset_rows(args, name, args.demo_root if name == "demo" else args.data_root, regions)
        rows += r
        loc_rows += lr
        results[name] = res
        # written after every dataset, so that a run stopped early still leaves its numbers
        partial = "" if done == len(names) else f" (partial: {', '.join(names[:done])} done of {', '.join(names)})"
        code = write_markdown(args.out, render(args, argv, regions, load_start, t0, rows, loc_rows, results, partial))
    return code


def render(args: argparse.Namespace, argv: list[str] | None, regions: dict[str, str], load_start: tuple,
           t0: float, rows: list[str], loc_rows: list[str], results: dict, partial: str) -> list[str]:
    """The Markdown of the rows measured so far."""
    minutes = (time.perf_counter() - t0) / 60
    load_end = os.getloadavg()
    pools = args.casr_pools.split(",")
    command = " ".join(sys.argv[1:] if argv is None else argv)
    learned = (f"learned RPN proposals from {', '.join(f'{k}: `{v}`' for k, v in regions.items())}" if regions else
               "**learned RPN proposals: not run** (no `regions.parquet` was given with `--regions`; producing one "
               "needs the clean stage on the collection, then `trainers/rpn.py` and `collection_regions`, which did "
               "not fit this run's time budget)")
    fine = (f"fine-tuned checkpoint `{args.checkpoint}`" if args.checkpoint else
            "**fine-tuned model: not run** (no `--checkpoint` given); all rows are the off-the-shelf model")
    lines = [
        "# Region-wise re-ranking (CA-SR) and localisation",
        "",
        f"Measured {dt.date.today()} on {machine()}; load average (1/5/15 min) "
        f"{' / '.join(f'{v:.2f}' for v in load_start)} at the start, "
        f"{' / '.join(f'{v:.2f}' for v in load_end)} at the end; the run took {minutes:.1f} min{partial}.",
        "",
        f"Command: `.venv/bin/python benchmarks/regions.py {command}`".rstrip(),
        "",
        f"Model: EfficientNet-Lite0 (ImageNet), single scale, longer side {args.max_size}, queries cropped to "
        f"their box, no whitening; {fine}.",
        f"Filtering: global GeM (p=3) or SPoC (sum pooling) descriptors, exhaustive search. QE: average query "
        f"expansion, k={RerankConfig.qe_k}.",
        f"CA-SR: the top {args.casr_top} re-ranked by each image's proposal most similar to the query box "
        f"(both RoIAlign 7x7 on the last conv map, then RPA-sum or RPA-max, L2); proposals: the label-free "
        f"`grid_proposals` (R-MAC grid L=3 + sliding boxes of 0.3-1.0 of the map side); {learned}.",
        f"CA-SR + QE: average QE (k={RerankConfig.qe_k}) with the best proposals of the re-ranked list, then the "
        f"top {args.casr_top} scored again (Salvador et al.). Fixed-grid region: the top {args.region_top} re-ranked "
        f"by their best R-MAC grid region pooled by the model's head (GeM), shown for the first pooling only.",
        "CS-SR (class-specific spatial re-ranking, Salvador et al.'s fine-tuned detector): **not built** in the "
        "project yet, so no row.",
        "ms per query: wall time of the `rerank` call divided by the queries; the first row that needs proposal "
        "or region descriptors also pays for extracting them (one backbone pass per image, then cached).",
        "",
        "| dataset | model | re-ranking | proposals | mAP Medium | Hard | ms per query |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Localisation on the demo collection",
        "",
        f"For each query, the true positives (easy or hard) among its top {LOC_TOP} after re-ranking; IoU of the "
        f"box returned for each against the true box of the object in that image (`bbx` of the visible part, "
        f"recorded by the generator in `demo.json`). 'whole image' is the IoU a box covering the whole image "
        f"would get on the same images (what no localisation gives).",
        "",
        f"| model | re-ranking | proposals | true positives | IoU >= {LOC_IOU} (%) | median IoU | "
        f"whole image: IoU >= {LOC_IOU} (%) | whole image: median IoU |",
        "|---|---|---|---|---|---|---|---|",
        *loc_rows,
        "",
        "## Targets",
        "",
        *targets(results, pools),
        "",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
