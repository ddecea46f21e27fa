"""Human-readable tables of evaluation metrics."""

from __future__ import annotations

from typing import Any

PROTOCOLS = ("easy", "medium", "hard")


def metric_columns(summary: dict[str, Any]) -> list[str]:
    """The scalar metric names of one protocol summary, mAP first then mP@k by k."""
    keys = [k for k in summary if k.startswith("mp@")]
    return ["map"] + sorted(keys, key=lambda k: int(k[3:]))


def format_table(metrics: dict[str, Any], title: str = "") -> str:
    """A fixed-width table (percentages) for revisitop or grouped metrics.

    Args:
        metrics: output of `Benchmark.evaluate`.
        title: a first line.
    """
    lines = [title] if title else []
    if "ns_score" in metrics:  # grouped benchmark (UKBench)
        cols = metric_columns(metrics)
        lines.append("N-S score  " + "  ".join(f"{c:>6}" for c in cols))
        lines.append(f"{metrics['ns_score']:9.3f}  " + "  ".join(f"{100 * metrics[c]:6.1f}" for c in cols))
        return "\n".join(lines)
    cols = metric_columns(metrics["medium"])
    lines.append("protocol  " + "  ".join(f"{c:>6}" for c in cols))
    for name in PROTOCOLS:
        lines.append(f"{name:<8}  " + "  ".join(f"{100 * metrics[name][c]:6.1f}" for c in cols))
    return "\n".join(lines)


def headline(metrics: dict[str, Any]) -> str:
    """One line: 'E/M/H mAP 80.0 / 63.1 / 38.6' or 'N-S 3.21, mAP 85.0'."""
    if "ns_score" in metrics:
        return f"N-S {metrics['ns_score']:.2f}, mAP {100 * metrics['map']:.1f}"
    return "E/M/H mAP " + " / ".join(f"{100 * metrics[p]['map']:.1f}" for p in PROTOCOLS)
