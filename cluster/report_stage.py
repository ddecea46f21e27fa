"""The pipeline's HTML report, built from the run's artifacts alone (stage records under
`<run dir>/stages/`, `selection.json`, the evaluate stage's descriptors): what the label-free
decisions saw (self-mAP, the gate, the re-ranking) and, with a benchmark, its true mAP beside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raytrieval.evaluation.html_report import GridResult, QueryGrid, ReportData, render_report
from raytrieval.evaluation.metrics import precision_recall_curve, revisitop_protocols
from raytrieval.evaluation.rerank import RerankConfig, rerank
from raytrieval.retrieval.knn import rank_all
from raytrieval.retrieval.whiten import learn_pca_whitening

DIMS = (16, 32, 64, 128, 256)


def _status(gnd: dict, idx: int) -> str:
    for key in ("easy", "hard", "junk"):
        if idx in set(np.asarray(gnd.get(key, [])).tolist()):
            return key
    return "negative"


def _records(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "stages").glob("*.json"))}


def _medium(metrics: dict) -> float | None:
    """The Medium mAP of a metrics record (the mAP of a benchmark without protocols)."""
    if "medium" in metrics:
        return metrics["medium"]["map"]
    return metrics.get("map")


def build_report(run_dir: str | Path, benchmark: str | None = None, data_root: str = "runs/data",
                 n_queries: int = 3, top: int = 8) -> Path:
    """Write `<run dir>/report/index.html` from the run's artifacts; returns its path.

    Args:
        run_dir: the pipeline's run directory.
        benchmark: the benchmark the evaluate stage scored (None: label-free figures only).
        data_root: folder holding the benchmark.
        n_queries: benchmark queries shown with precision-recall curves and result grids.
        top: results per grid.
    """
    run_dir = Path(run_dir)
    records = _records(run_dir)
    selection = json.loads((run_dir / "selection.json").read_text())
    data = ReportData(title=f"raytrieval pipeline: {run_dir.name}" + (f" (scored on {benchmark})" if benchmark else ""))
    data.stage_seconds = {name: r["seconds"] for name, r in records.items() if name != "report"}
    data.history = records.get("train", {}).get("summary", {}).get("history", [])
    data.summary = {**{f"clean: {k}": v for k, v in records.get("clean", {}).get("summary", {}).items()},
                    **{f"split: {k}": v for k, v in records.get("split", {}).get("summary", {}).items()},
                    **{f"mine: {k}": v for k, v in records.get("mine", {}).get("summary", {}).items()}}
    data.decisions = {
        "split": selection["split"]["message"],
        "serving gate": selection["gate"]["why"],
        "re-ranking": f"{selection['rerank_setting']} ({selection['rerank_why']})",
        "pseudo-queries": selection["pseudo_queries"],
    }
    evaluated = records.get("evaluate", {}).get("summary", {}) if benchmark else {}
    data.metrics = [(label, m) for label, m in evaluated.items() if "medium" in m]
    own = selection["self_map"]
    rows = [("off-the-shelf", own["off-the-shelf"]), ("fine-tuned", own["fine-tuned"]),
            (f"served ({'fine-tuned' if selection['gate']['serve_fine_tuned'] else 'off-the-shelf'} + "
             f"{selection['rerank_setting']})", selection["served_self_map"])]
    true = {label.split(" (")[0]: _medium(m) for label, m in evaluated.items()}
    data.self_vs_true = [(label, s, true.get(label.split(" (")[0])) for label, s in rows if s is not None]
    if benchmark and data.metrics:
        _benchmark_parts(data, run_dir, benchmark, data_root, selection, n_queries, top)
    path = render_report(data, run_dir / "report")
    _add_cluster_mosaics(run_dir, path)
    (run_dir / "report" / "data.json").write_text(json.dumps(
        {"metrics": data.metrics, "stages": data.stage_seconds, "selection": selection}, default=float, indent=1))
    return path


def _benchmark_parts(data: ReportData, run_dir: Path, benchmark: str, data_root: str, selection: dict,
                     n_queries: int, top: int) -> None:
    """PCA dimension curves, precision-recall curves and result grids of the benchmark."""
    from raytrieval.evaluation.datasets import prepare_benchmark
    from raytrieval.evaluation.image_access import benchmark_access
    from raytrieval.retrieval.source import ModelSource

    bench = prepare_benchmark(benchmark, data_root)
    medium = revisitop_protocols(bench.gnd)["medium"]
    labels = [label for label, _ in data.metrics if label != "served"]
    for label in labels:
        folder = run_dir / "eval" / label.replace(" ", "")
        q, x = np.load(folder / "queries.npy"), np.load(folder / "database.npy")
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
    # result grids of the served model, spatially verified for the localisation boxes
    served = selection["model"]
    source = ModelSource.from_dict(served)
    folder = run_dir / "eval" / "served"
    q, x = np.load(folder / "queries.npy"), np.load(folder / "database.npy")
    picked = list(range(min(n_queries, bench.num_queries)))
    res = rerank(RerankConfig(steps=("sv",), sv_top=top), q[picked], x, benchmark_access(_subset(bench, picked), source))
    for row, qi in enumerate(picked):
        results = [GridResult(bench.images[i], float(q[qi] @ x[i]), _status(bench.gnd[qi], int(i)),
                              res.boxes[row].get(int(i))) for i in res.ranks[row, :top]]
        data.grids.append(QueryGrid(bench.queries[qi], bench.qboxes[qi], results))


def _add_cluster_mosaics(run_dir: Path, page: Path) -> None:
    """The cleaning stage as pictures: a mosaic per cluster, put at the end of the report page."""
    from raytrieval.evaluation.mosaic import cluster_mosaics, mosaic_html
    from raytrieval.mining.cleaning import read_clusters
    from raytrieval.retrieval.manifest import read_manifest

    mosaics = cluster_mosaics(read_clusters(run_dir / "clusters.parquet"),
                              read_manifest(run_dir / "images.parquet"), page.parent / "clusters")
    text = page.read_text(encoding="utf-8")
    cut = text.rfind("</body>")
    cut = len(text) if cut < 0 else cut
    page.write_text(text[:cut] + mosaic_html(mosaics, page.parent) + text[cut:], encoding="utf-8")


def _subset(bench, picked: list[int]):
    """The benchmark restricted to some queries (database unchanged)."""
    from dataclasses import replace

    return replace(bench, queries=[bench.queries[i] for i in picked], qboxes=[bench.qboxes[i] for i in picked],
                   gnd=[bench.gnd[i] for i in picked])
