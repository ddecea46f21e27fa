"""The pipeline's HTML report: gathers the stage records and evaluation artifacts of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raytrieval.evaluation.html_report import GridResult, QueryGrid, ReportData, render_report
from raytrieval.evaluation.metrics import precision_recall_curve, revisitop_protocols
from raytrieval.evaluation.rerank import RerankConfig, rerank
from raytrieval.retrieval.knn import rank_all
from raytrieval.retrieval.whiten import learn_pca_whitening

if TYPE_CHECKING:
    from raytrieval.cluster.pipeline import Pipeline

DIMS = (16, 32, 64, 128, 256)


def _status(gnd: dict, idx: int) -> str:
    for key in ("easy", "hard", "junk"):
        if idx in set(np.asarray(gnd[key]).tolist()):
            return key
    return "negative"


def build_report(pipeline: "Pipeline", n_queries: int = 3, top: int = 8) -> Path:
    """Write `<run dir>/report/index.html`; returns its path."""
    from raytrieval.cluster.eval_stage import EvalConfig, image_access, prepare_benchmark

    cfg, records = pipeline.cfg, pipeline.records
    bench = prepare_benchmark(cfg.benchmark, cfg.data_root)
    evaluated = records["evaluate"]["summary"]
    eval_dirs = {label: pipeline.path("eval", label.replace(" ", "")) for label in evaluated}
    data = ReportData(title=f"raytrieval pipeline: {pipeline.run_dir.name} on {bench.name}")
    data.metrics = list(evaluated.items())
    data.stage_seconds = {name: r["seconds"] for name, r in records.items() if name != "report"}
    data.history = records.get("train", {}).get("summary", {}).get("history", [])
    data.summary = {**{f"clean: {k}": v for k, v in records.get("clean", {}).get("summary", {}).items()},
                    **{f"mine: {k}": v for k, v in records.get("mine", {}).get("summary", {}).items()}}
    medium = revisitop_protocols(bench.gnd)["medium"]
    for label in ("off-the-shelf", "fine-tuned"):
        q, x = np.load(eval_dirs[label] / "queries.npy"), np.load(eval_dirs[label] / "database.npy")
        curve = []
        for d in DIMS:
            if d < min(x.shape):
                w = learn_pca_whitening(x, dim=d)
                curve.append((d, 100 * bench.evaluate(rank_all(w.apply(q), w.apply(x)))["medium"]["map"]))
        data.dims[f"{label}, PCA-whitened"] = curve
        ranks = rank_all(q, x)
        for qi in range(min(n_queries, bench.num_queries)):
            r, p = precision_recall_curve(ranks[qi], medium[qi]["ok"], medium[qi]["junk"])
            data.pr_curves.append((f"{label} q{qi}", r, p))
    # result grids of the fine-tuned model, spatially verified for the localisation boxes
    ecfg = EvalConfig(dataset=cfg.benchmark, data_root=cfg.data_root, checkpoint=str(pipeline.final_checkpoint))
    q, x = np.load(eval_dirs["fine-tuned"] / "queries.npy"), np.load(eval_dirs["fine-tuned"] / "database.npy")
    picked = list(range(min(n_queries, bench.num_queries)))
    res = rerank(RerankConfig(steps=("sv",), sv_top=top), q[picked], x, image_access(ecfg, _subset(bench, picked)))
    for row, qi in enumerate(picked):
        results = [GridResult(bench.images[i], float(q[qi] @ x[i]), _status(bench.gnd[qi], int(i)),
                              res.boxes[row].get(int(i))) for i in res.ranks[row, :top]]
        data.grids.append(QueryGrid(bench.queries[qi], bench.qboxes[qi], results))
    path = render_report(data, pipeline.path("report"))
    _add_cluster_mosaics(pipeline, path)
    (pipeline.path("report") / "data.json").write_text(json.dumps({"metrics": data.metrics, "stages": data.stage_seconds},
                                                                  default=float, indent=1))
    return path


def _add_cluster_mosaics(pipeline: "Pipeline", page: Path) -> None:
    """The cleaning stage as pictures: a mosaic per cluster, put at the end of the report page."""
    from raytrieval.evaluation.mosaic import cluster_mosaics, mosaic_html
    from raytrieval.mining.cleaning import read_clusters
    from raytrieval.retrieval.manifest import read_manifest

    mosaics = cluster_mosaics(read_clusters(pipeline.path("clusters.parquet")),
                              read_manifest(pipeline.path("images.parquet")), page.parent / "clusters")
    text = page.read_text(encoding="utf-8")
    cut = text.rfind("</body>")
    cut = len(text) if cut < 0 else cut
    page.write_text(text[:cut] + mosaic_html(mosaics, page.parent) + text[cut:], encoding="utf-8")


def _subset(bench, picked: list[int]):
    """The benchmark restricted to some queries (database unchanged)."""
    from dataclasses import replace

    return replace(bench, queries=[bench.queries[i] for i in picked], qboxes=[bench.qboxes[i] for i in picked],
                   gnd=[bench.gnd[i] for i in picked])
