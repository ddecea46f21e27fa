"""A self-contained HTML report of a run: mAP tables, stage times, plots and result grids.

Plots are PNG files written next to `index.html` (so the folder can be logged to MLflow as
is); result grids are JPEG thumbnails with the ground-truth status as a coloured frame and the
localisation box drawn in.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from raytrieval.evaluation.report import PROTOCOLS, metric_columns  # noqa: E402
from raytrieval.retrieval.imageio import crop_box, load_image  # noqa: E402

STATUS_COLOURS = {"easy": (46, 160, 67), "hard": (31, 111, 235), "junk": (150, 150, 150), "negative": (207, 34, 46)}
Box = tuple[float, float, float, float]


@dataclass
class GridResult:
    """One retrieved image: path, score, ground-truth status and an optional localisation box."""

    path: str
    score: float
    status: str
    box: Box | None = None


@dataclass
class QueryGrid:
    """A query (with its box) and its top results."""

    query: str
    qbox: Box | None
    results: list[GridResult]


@dataclass
class ReportData:
    """Everything the report shows; empty parts are left out.

    Args:
        title: page title.
        metrics: (label, metrics from `Benchmark.evaluate`) rows, e.g. off-the-shelf, fine-tuned.
        stage_seconds: wall time per pipeline stage.
        history: per-epoch dicts with 'epoch' and any of 'loss', 'val_map_medium'.
        dims: label -> [(dimension, Medium mAP %)].
        pr_curves: (label, recall, precision) for a few queries.
        grids: result grids for a few queries.
        summary: free key -> value facts (cleaning: clusters, verified pairs, ...).
        decisions: the label-free decisions and why (serving gate, re-ranking, split rule).
        self_vs_true: (label, self-mAP, true Medium mAP or None without a benchmark) rows, in
            [0, 1]: what the decisions saw beside what a benchmark measures.
    """

    title: str
    metrics: list[tuple[str, dict]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    dims: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    pr_curves: list[tuple[str, Sequence[float], Sequence[float]]] = field(default_factory=list)
    grids: list[QueryGrid] = field(default_factory=list)
    summary: dict[str, object] = field(default_factory=dict)
    decisions: dict[str, object] = field(default_factory=dict)
    self_vs_true: list[tuple[str, float, float | None]] = field(default_factory=list)


def _self_table(rows: list[tuple[str, float, float | None]]) -> str:
    if not rows:
        return ""

    def pct(v: float | None) -> str:
        return "-" if v is None or v != v else f"{100 * v:.1f}"

    body = "".join(f"<tr><td>{html.escape(label)}</td><td>{pct(s)}</td><td>{pct(t)}</td></tr>" for label, s, t in rows)
    return ("<h2>Label-free self-mAP beside true mAP</h2><table><tr><th>model</th><th>self-mAP</th>"
            f"<th>true mAP (Medium protocol where it has one)</th></tr>{body}</table>")


def _metrics_table(rows: list[tuple[str, dict]]) -> str:
    if not rows:
        return ""
    cols = metric_columns(rows[0][1]["medium"])
    head = "".join(f"<th>{p} {c}</th>" for p in PROTOCOLS for c in cols)
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{100 * m[p][c]:.1f}</td>" for p in PROTOCOLS for c in cols) + "</tr>"
        for label, m in rows
    )
    return f"<h2>Mean average precision (%)</h2><table><tr><th>model</th>{head}</tr>{body}</table>"


def _kv_table(title: str, items: dict[str, object], fmt: str = "{}") -> str:
    if not items:
        return ""
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(fmt.format(v))}</td></tr>" for k, v in items.items())
    return f"<h2>{title}</h2><table>{body}</table>"


def _plot_history(history: list[dict], path: Path) -> bool:
    if not history:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    epochs = [h["epoch"] for h in history]
    if any("loss" in h for h in history):
        ax.plot(epochs, [h.get("loss") for h in history], "o-", color="tab:red", label="training loss")
        ax.set_ylabel("loss")
    ax.set_xlabel("epoch")
    lines = [(k, c, lab) for k, c, lab in (("self_map", "tab:green", "self-mAP (label-free, chooses)"),
                                           ("self_map_crop", "tab:olive", "self-mAP, cropped queries"),
                                           ("val_map_medium", "tab:blue", "benchmark Medium mAP"))
             if any(h.get(k) is not None for h in history)]
    if lines:
        ax2 = ax.twinx()
        for key, colour, label in lines:
            ax2.plot(epochs, [100 * (h.get(key) if h.get(key) is not None else float("nan")) for h in history], "s-",
                     color=colour, label=label)
        ax2.set_ylabel("mAP (%)")
        fig.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_lines(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, path: Path, logx: bool) -> bool:
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) < 20 else "-", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _thumbnail(path: str, box: Box | None, frame: tuple[int, int, int] | None, crop: Box | None, size: int = 180) -> Image.Image:
    img = load_image(path)
    if crop is not None:
        img = crop_box(img, crop)
    scale = size / max(img.size)
    thumb = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))))
    draw = ImageDraw.Draw(thumb)
    if box is not None:
        draw.rectangle([v * scale for v in box], outline=(255, 215, 0), width=3)
    if frame is not None:
        draw.rectangle([0, 0, thumb.size[0] - 1, thumb.size[1] - 1], outline=frame, width=6)
    return thumb


def _grid_html(grids: list[QueryGrid], out: Path) -> str:
    if not grids:
        return ""
    parts = ["<h2>Results for a few queries</h2><p>Frame: "
             + ", ".join(f"<span style='color:rgb{c}'>{s}</span>" for s, c in STATUS_COLOURS.items())
             + "; yellow box: localisation of the query object.</p>"]
    for qi, grid in enumerate(grids):
        name = f"grid_q{qi}_query.jpg"
        _thumbnail(grid.query, None, None, grid.qbox).save(out / name, quality=85)
        cells = [f"<figure><img src='{name}'><figcaption>query</figcaption></figure>"]
        for ri, r in enumerate(grid.results):
            rname = f"grid_q{qi}_r{ri}.jpg"
            _thumbnail(r.path, r.box, STATUS_COLOURS.get(r.status), None).save(out / rname, quality=85)
            cells.append(f"<figure><img src='{rname}'><figcaption>{ri + 1}. {r.score:.3f} {r.status}</figcaption></figure>")
        parts.append(f"<div class='grid'>{''.join(cells)}</div>")
    return "".join(parts)


def render_report(data: ReportData, out_dir: str | Path) -> Path:
    """Write `index.html` and its images into `out_dir`; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if _plot_history(data.history, out / "training.png"):
        figures.append(("training.png", "Loss and validation mAP per epoch"))
    if _plot_lines(data.dims, "descriptor dimension", "Medium mAP (%)", out / "dims.png", logx=True):
        figures.append(("dims.png", "mAP vs descriptor dimension"))
    pr = {label: list(zip(r, p)) for label, r, p in data.pr_curves}
    if _plot_lines(pr, "recall", "precision", out / "pr.png", logx=False):
        figures.append(("pr.png", "Precision-recall (Medium protocol)"))
    fig_html = "".join(f"<figure><img src='{f}'><figcaption>{c}</figcaption></figure>" for f, c in figures)
    body = "".join([
        _kv_table("Decisions (label-free)", data.decisions),
        _self_table(data.self_vs_true),
        _metrics_table(data.metrics),
        _kv_table("Time per stage (s)", data.stage_seconds, "{:.1f}"),
        _kv_table("Summary", data.summary),
        f"<h2>Plots</h2><div class='grid'>{fig_html}</div>" if figures else "",
        _grid_html(data.grids, out),
    ])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(data.title)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}}
.grid{{display:flex;flex-wrap:wrap;gap:8px}} figure{{margin:0;text-align:center;font-size:12px}}</style></head>
<body><h1>{html.escape(data.title)}</h1>{body}</body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
