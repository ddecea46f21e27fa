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
from raytrieval.retrieval.cssr import box_iou  # noqa: E402
from raytrieval.retrieval.model import ModelSpec  # noqa: E402
from raytrieval.retrieval.region import RegionSet  # noqa: E402

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
    """The off-the-shelf models (one per global pooling), then the dataset's fine-tuned checkpoint if given."""
    out = []
    for i, pooling in enumerate(args.poolings.split(",")):
        spec = ModelSpec(pooling=pooling, max_size=args.max_size)
        out.append(Model(f"off-the-shelf {pooling}", EvalConfig(dataset=name, data_root=root, model=spec, workers=0),
                         "off-the-shelf", region_row=i == 0))
    checkpoint = args.checkpoints.get(name)
    if checkpoint:
        cfg = EvalConfig(dataset=name, data_root=root, checkpoint=checkpoint, workers=0)
        out.append(Model("fine-tuned gem", cfg, checkpoint, region_row=True))
    return out


def proposal_access(cache: dict, model: Model, bench: Benchmark, pool: str, regions: str | None) -> ImageAccess:
    """The cached query-box / proposal access of a backbone, pooling and proposal source."""
    key = (model.backbone_key, pool, regions)
    if key not in cache:
        cache[key] = benchmark_access(bench, model.cfg.source, regions, pool)
    return cache[key]


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of (n, 4) boxes a and b (the diagonal of `raytrieval.retrieval.cssr.box_iou`)."""
    return box_iou(a, b).diagonal() if len(a) else np.zeros(0)


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
    iou = paired_iou(np.array(found).reshape(-1, 4), np.array(true).reshape(-1, 4))
    ref = paired_iou(np.array(whole).reshape(-1, 4), np.array(true).reshape(-1, 4))
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
                if name in args.cleans:
                    classifier = box_classifier(args, model, name, pool, kind, path)
                    for steps, label in ((("cssr",), "CS-SR"), (("cssr", "aqe"), "CS-SR + QE")):
                        rc = RerankConfig(steps=steps, casr_top=args.casr_top, casr_pool=pool, box_classifier=classifier)
                        runs.append((label, f"{kind}, RPA-{pool}", rc, both))
        for label, proposals, rc, acc in runs:
            t = time.perf_counter()
            res = rerank(rc, q, x, acc)
            wall = time.perf_counter() - t
            m = bench.evaluate(res.ranks)
            cells = " | ".join(f"{100 * m[p]['map']:.1f}" for p in PROTOCOLS)
            fell = res.counts.get("cssr_fallback")
            shown = label if fell is None else f"{label} ({fell} of {len(q)} queries fell back to CA-SR)"
            rows.append(f"| {name} | {model.label} | {shown} | {proposals} | {cells} | {1000 * wall / len(q):.0f} |")
            scores[(model.label, f"{label} {proposals}".strip())] = 100 * m["medium"]["map"]
            print(rows[-1], flush=True)
            if truth is None or not (res.boxes and any(res.boxes)):
                continue
            spatial = "casr" in rc.steps or "cssr" in rc.steps
            top = rc.casr_top if spatial else rc.region_top
            located = [("similarity map", res)] if spatial else [("best grid region", res)]
            if spatial:  # the same ranking, boxed by its best proposal instead
                located.append(("best proposal", rerank(rc, q, x, best_proposal_boxes(acc))))
            for box, r in located:
                loc = localisation(bench, r, truth, top)
                loc_rows.append(
                    f"| {model.label} | {label} | {proposals} | {box} | {loc['n']} | {100 * loc['share']:.1f} | "
                    f"{loc['median']:.2f} | {100 * loc['whole_share']:.1f} | {loc['whole_median']:.2f} |")
                scores[(model.label, f"loc {label} {proposals} {box}")] = 100 * loc["share"]
                print(loc_rows[-1], flush=True)
        if model.region_row and name in regions and name in args.rpns:  # depends on the backbone only
            qr, xr = learned_rmac_descriptors(cache, model, bench, regions[name], args.rpns[name])
            for label, rc in (("filtering only", RerankConfig()), ("QE", RerankConfig(steps=("aqe",)))):
                res = rerank(rc, qr, xr)
                m = bench.evaluate(res.ranks)
                cells = " | ".join(f"{100 * m[p]['map']:.1f}" for p in PROTOCOLS)
                rows.append(f"| {name} | {model.label} | {label} | R-MAC over learned RPN regions | {cells} | 0 |")
                print(rows[-1], flush=True)
    return rows, loc_rows, scores


def box_classifier(args: argparse.Namespace, model: Model, name: str, pool: str, kind: str, regions: str | None) -> str:
    """CS-SR's box classifier for a model, pooling and proposal source, trained label-free on the
    dataset's clean stage (`--clean`: its verified clusters and boxes), written under runs/bench/regions."""
    from raytrieval.retrieval.cssr import BoxClassifierConfig, train_from_run

    key = (name, model.backbone_key, pool, kind)  # the classifier reads region descriptors: the backbone's
    if key in args.classifiers:
        return args.classifiers[key]
    t = time.perf_counter()
    out = Path("runs/bench/regions") / f"{name}-{model.label}-{kind}-{pool}.pt".replace(" ", "_")
    out = train_from_run(args.cleans[name], model.cfg.source, regions, BoxClassifierConfig(pool=pool), out)
    print(f"{name} {model.label}: box classifier ({kind}, RPA-{pool}) trained in {time.perf_counter() - t:.0f} s", flush=True)
    args.classifiers[key] = str(out)
    return str(out)


def learned_rmac_descriptors(cache: dict, model: Model, bench: Benchmark, regions: str, rpn: str
                             ) -> tuple[np.ndarray, np.ndarray]:
    """(queries, database) descriptors of R-MAC over learned regions (Gordo et al. 2016): the
    database over its `regions.parquet` proposals, each query over the proposals the same RPN
    head gives its crop, plus the whole crop. The head proposes on the backbone it was trained
    on (the off-the-shelf one, `trainers.rpn.RpnConfig`'s default); `model` pools the regions."""
    from raytrieval.retrieval.imageio import crop_box, load_image
    from raytrieval.retrieval.region import learned_rmac, proposal_descriptors
    from raytrieval.retrieval.rpn import load_proposal_net, propose
    from raytrieval.retrieval.source import load_model

    access = proposal_access(cache, model, bench, "max", regions)
    x = np.stack([learned_rmac(access.db_proposals(i)) for i in range(len(bench.images))])
    net, backbone = load_proposal_net(rpn), load_model(model.cfg.source)
    proposer = load_model(ModelSpec().to_dict())
    _, max_size = model.cfg.source.preprocessing()
    q = []
    for path, box in zip(bench.queries, bench.qboxes):
        img = load_image(path)
        crop = crop_box(img, box) if box is not None else img
        boxes = np.r_[np.array([[0, 0, *crop.size]], np.float32), propose(proposer, net, [crop])[0][0]]
        q.append(learned_rmac(proposal_descriptors(backbone, crop, boxes, max_size, pool="max")))
    return np.stack(q), x


def best_proposal_boxes(access: ImageAccess) -> ImageAccess:
    """`access` whose proposals carry no conv cells, so CA-SR boxes an image by its best proposal."""
    def proposals(i: int) -> RegionSet:
        rs = access.db_proposals(i)
        return RegionSet(rs.descriptors, rs.boxes)

    return dataclasses.replace(access, db_proposals=proposals)


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
            got = d.get(("off-the-shelf gem", f"loc CA-SR grid, RPA-{pool} similarity map"))
            if got is not None:
                verdict = "met" if got >= 70 else "missed"
                lines.append(f"- Localisation IoU >= {LOC_IOU} for >= 70% of the top-{LOC_TOP} true positives on the demo "
                             f"(GeM filtering, CA-SR grid, RPA-{pool}, similarity-map box): {got:.1f}%: **{verdict}**.")
    return lines or ["- Not evaluated in this run (rparis6k-mini / demo with GeM not among the datasets)."]


def parse_paths(items: list[str], flag: str, what: str) -> dict[str, str]:
    """{dataset: path} from DATASET=PATH arguments, each path existing."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).exists():
            raise ValueError(f"{flag}: expected DATASET=PATH to an existing {what}, got {item!r}")
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
    p.add_argument("--checkpoint", action="append", default=[], metavar="DATASET=PATH",
                   help="a dataset's fine-tuned checkpoint directory (trained label-free on that collection)")
    p.add_argument("--regions", action="append", default=[], metavar="DATASET=PATH",
                   help="learned proposals (regions.parquet keyed by image name) for a dataset's CA-SR rows")
    p.add_argument("--rpn", action="append", default=[], metavar="DATASET=DIR",
                   help="the proposal head behind a dataset's --regions (R-MAC over learned regions: its query proposals)")
    p.add_argument("--clean", action="append", default=[], metavar="DATASET=DIR",
                   help="a dataset's clean-stage run directory: CS-SR's box classifier is trained on its clusters")
    p.add_argument("--out", default="benchmarks/regions.md")
    args = p.parse_args(argv)
    regions = parse_paths(args.regions, "--regions", "regions.parquet")
    args.checkpoints = parse_paths(args.checkpoint, "--checkpoint", "checkpoint directory")
    args.rpns = parse_paths(args.rpn, "--rpn", "proposal head directory (rpn.json)")
    args.cleans = parse_paths(args.clean, "--clean", "clean-stage run directory (clusters.parquet)")
    args.classifiers = {}

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
    fine = (f"fine-tuned GeM checkpoints (label-free, on each collection's own clean stage) "
            f"{', '.join(f'{k}: `{v}`' for k, v in args.checkpoints.items())}" if args.checkpoints else
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
        "R-MAC over learned RPN regions (Gordo et al. 2016; `--rpn`): a global descriptor, the normalised sum of the "
        "RPA-max descriptors of an image's learned proposals (the database: regions.parquet; a query: the same head's "
        "proposals on its crop, plus the whole crop), searched exhaustively like GeM, without and with QE.",
        ("CS-SR (class-specific spatial re-ranking, `raytrieval.retrieval.cssr`): a linear box classifier over the "
         "pseudo-landmark classes (the verified clusters of the dataset's own clean stage, `--clean`; background: "
         "proposals far from the verified boxes) on the same region descriptors, trained label-free per model, "
         "pooling and proposal source; each of the top N scored by the probability of the query's class for its "
         "best proposal, queries whose class is below the confidence rule fall back to CA-SR; + QE as for CA-SR."
         if args.cleans else "CS-SR: **not run** (no `--clean` run directory given)."),
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
        "Box: 'similarity map' is what CA-SR returns (`similarity_box`: the query's cosine similarity to each "
        "conv cell of the image, Otsu's threshold, the connected cells around the peak); 'best proposal' is the "
        "box of the proposal that scored the image, on the same ranking (Salvador et al.'s localisation).",
        "",
        f"| model | re-ranking | proposals | box | true positives | IoU >= {LOC_IOU} (%) | median IoU | "
        f"whole image: IoU >= {LOC_IOU} (%) | whole image: median IoU |",
        "|---|---|---|---|---|---|---|---|---|",
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
