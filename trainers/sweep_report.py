"""The results of a sweep as people read them: a table of trials and two plots.

- `trials.md` / `trials.json`: one row per trial (searched params, status, epochs run, last and
  best validation metric, training time), the best first;
- `plots/map_vs_margin.png`: best metric against margin (or the first numeric searched
  field), one series per pooling (or per loss);
- `plots/map_per_epoch.png`: the metric per epoch of every trial (early-stopped trials end early).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from raytrieval.trainers.sweep_config import SweepConfig

HISTORY_KEYS = ("epoch", "loss", "self_map", "val_map_easy", "val_map_medium", "val_map_hard", "val_map", "val_ns_score",
                "checkpoint_path", "time_total_s")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def _params_file(trial_dir: Path) -> dict[str, Any]:
    path = trial_dir / "params.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def trial_rows(grid, cfg: SweepConfig) -> list[dict[str, Any]]:
    """One dict per trial of a Tune `ResultGrid`: params, status, history, best epoch."""
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        history = []
        if frame is not None and len(frame):
            cols = [c for c in dict.fromkeys((*HISTORY_KEYS, cfg.metric)) if c in frame.columns]
            history = [{k: _clean(v) for k, v in rec.items() if _clean(v) is not None}
                       for rec in frame[cols].to_dict("records")]
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        config = result.config or _params_file(Path(result.path))  # an errored trial may have none
        searched = {k: v for k, v in config.items() if k in cfg.search_space}
        last_epoch = history[-1]["epoch"] if history else None
        if result.error:
            status = "ERROR"
        elif last_epoch is not None and last_epoch >= cfg.trial_epochs(searched):
            status = "FINISHED"
        else:
            status = "STOPPED"
        scored = [h for h in history if cfg.metric in h]
        pick = max if cfg.mode == "max" else min
        best = pick(scored, key=lambda h: h[cfg.metric]) if scored else None
        rows.append({
            "trial_id": trial_id, "params": searched, "status": status, "last_epoch": last_epoch,
            "last": scored[-1][cfg.metric] if scored else None,
            "best": best[cfg.metric] if best else None, "best_epoch": best["epoch"] if best else None,
            "checkpoint_path": best.get("checkpoint_path") if best else None,
            "train_s": history[-1].get("time_total_s") if history else None,
            "history": [{k: v for k, v in h.items() if k != "checkpoint_path"} for h in history],
            "error": str(result.error).splitlines()[-1][:300] if result.error else None,
        })
    sign = -1 if cfg.mode == "max" else 1
    rows.sort(key=lambda r: (r["best"] is None, sign * (r["best"] or 0.0)))
    return rows


def best_trial(rows: list[dict[str, Any]], cfg: SweepConfig) -> dict[str, Any] | None:
    """The row with the best validation metric at any epoch (None if none reported it)."""
    scored = [r for r in rows if r["best"] is not None and r["checkpoint_path"]]
    if not scored:
        return None
    pick = max if cfg.mode == "max" else min
    best = dict(pick(scored, key=lambda r: r["best"]))
    best["metrics"] = {k: v for k, v in best["history"][[h["epoch"] for h in best["history"]].index(best["best_epoch"])].items()
                       if k.startswith("val_")}
    return best


def default_row(rows: list[dict[str, Any]], cfg: SweepConfig) -> dict[str, Any] | None:
    """The trial that ran the base configuration (`include_default`), if any."""
    point = cfg.default_point()
    if point is None:
        return None
    return next((r for r in rows if r["params"] == point), None)


def _fmt(value: Any, none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], cfg: SweepConfig) -> str:
    """The trials as a Markdown table, best first (metric in %)."""
    keys = list(cfg.search_space)
    head = ["trial", *keys, "status", "epochs", f"best {cfg.metric}", "at epoch", "last", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    for r in rows:
        lines.append("| " + " | ".join([
            r["trial_id"], *(_fmt(r["params"].get(k, "-"), none="null") for k in keys),
            r["status"] + (f" ({r['error']})" if r["error"] else ""),
            _fmt(r["last_epoch"]), pct(r["best"]), _fmt(r["best_epoch"]), pct(r["last"]),
            "-" if r["train_s"] is None else f"{r['train_s']:.0f}",
        ]) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], cfg: SweepConfig, out: Path) -> list[Path]:
    """`map_vs_margin.png` and `map_per_epoch.png` under `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out.mkdir(parents=True, exist_ok=True)
    scored = [r for r in rows if r["best"] is not None]
    numeric = [k for k in cfg.search_space if any(isinstance(r["params"].get(k), (int, float))
                                                   and not isinstance(r["params"].get(k), bool) for r in scored)]
    x_key = "margin" if "margin" in numeric else (numeric[0] if numeric else None)
    group_key = next((k for k in ("pooling", "loss") if k in cfg.search_space), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    if x_key:
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in scored:
            if r["params"].get(x_key) is not None:
                groups.setdefault(str(r["params"].get(group_key, "all")), []).append((r["params"][x_key], 100 * r["best"]))
        for name, points in sorted(groups.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        if x_key == "lr":
            ax.set_xscale("log")
        ax.legend(title=group_key or "")
    ax.set(xlabel=x_key or "-", ylabel=f"best {cfg.metric} (%)", title=f"{cfg.metric} vs {x_key}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    vs = out / "map_vs_margin.png"
    fig.savefig(vs, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        hist = [h for h in r["history"] if cfg.metric in h]
        if hist:
            style = "-" if r["status"] == "FINISHED" else "--"
            ax.plot([h["epoch"] for h in hist], [100 * h[cfg.metric] for h in hist], style, marker="o",
                    label=f"{r['trial_id']} ({r['status'].lower()})")
    ax.set(xlabel="epoch", ylabel=f"{cfg.metric} (%)", title="validation per epoch (dashed: stopped early)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7)
    fig.tight_layout()
    per_epoch = out / "map_per_epoch.png"
    fig.savefig(per_epoch, dpi=100)
    plt.close(fig)
    return [vs, per_epoch]


def write_report(rows: list[dict[str, Any]], best: dict[str, Any] | None, cfg: SweepConfig, wall_s: float) -> Path:
    """`trials.json`, `trials.md` and `plots/` in the sweep directory; returns `trials.md`."""
    from raytrieval.retrieval.artifacts import atomic_write_bytes, atomic_write_json

    atomic_write_json(cfg.sweep_dir / "trials.json", rows)
    plots = plot_sweep(rows, cfg, cfg.sweep_dir / "plots")
    train_s = sum(r["train_s"] or 0.0 for r in rows)
    default = default_row(rows, cfg)
    lines = [f"# Sweep {cfg.name}", "",
             f"- searcher {cfg.searcher}, scheduler {cfg.scheduler}, metric {cfg.metric} ({cfg.mode})",
             f"- trials: {len(rows)} ({sum(r['status'] == 'FINISHED' for r in rows)} finished, "
             f"{sum(r['status'] == 'STOPPED' for r in rows)} stopped early, {sum(r['status'] == 'ERROR' for r in rows)} errored)",
             f"- wall time {wall_s:.0f} s; sum of trial training times {train_s:.0f} s "
             f"(packing {train_s / wall_s if wall_s else 0:.2f} trials at a time on average)"]
    if best:
        lines.append(f"- best: {best['trial_id']} {json.dumps(best['params'])}: {100 * best['best']:.1f} at epoch {best['best_epoch']}")
    if best and default and default["best"] is not None:
        lines.append(f"- default configuration ({default['trial_id']}): {100 * default['best']:.1f}; "
                     f"gain {100 * (best['best'] - default['best']):+.1f}")
    lines += ["", markdown_table(rows, cfg), ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = cfg.sweep_dir / "trials.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
