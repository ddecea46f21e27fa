"""The `split` stage: verified clusters -> training / validation clusters, for label-free validation.

A user's collection has no ground truth; the clusters the clean stage verified geometrically
are the only labels there are. Whole clusters are held out (never single images: a validation
image whose cluster mates were trained on would be scored on what the model memorised), so a
validation cluster's images never appear in a training tuple as query, positive or negative.

    <run dir>/split.parquet   image_id, cluster_id, role ('train' or 'val')
    <run dir>/split.json      resolved config, counts, the rule applied and why

The rule, by the number C of verified clusters:

- C >= `min_clusters` (3): clusters are drawn in a seeded random order and held out while the
  held-out images stay within `fraction` of the clustered images (one large cluster must not
  take most of the training pairs); at least one cluster (the smallest, if none fits) and at
  most C - 2 (training keeps two clusters, so it has negatives).
- 1 <= C < `min_clusters`: too few to both train and validate. No fine-tuning (nothing could
  show that it helped); every cluster is validation, used only to choose re-ranking.
- C = 0: nothing to validate on. No fine-tuning and no re-ranking: the off-the-shelf model is
  served as it is.

The held-out clusters are not given back for a final fit on all clusters: such a model would
be unvalidated, and the serving gate could not judge it. Their cost is the training pairs they
hold (`fraction` of the clusters).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrieval.retrieval.artifacts import atomic_write_json, atomic_write_table

__all__ = ["ROLES", "SPLIT_SCHEMA", "SplitConfig", "read_split", "split_clusters", "split_stage", "validation_ids"]

ROLES = ("train", "val")
SPLIT_FILE = "split.parquet"
SPLIT_RECORD = "split.json"
SPLIT_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("cluster_id", pa.int64(), nullable=False),
    pa.field("role", pa.string(), nullable=False),
])


@dataclass
class SplitConfig:
    """Configuration of the split stage.

    Args:
        run_dir: the run directory (holds `clusters.parquet`).
        fraction: share of the clustered images held out for validation (whole clusters).
        seed: seed of the draw.
        min_clusters: fewest verified clusters that allow both fine-tuning and validation.
    """

    run_dir: str
    fraction: float = 0.3
    seed: int = 0
    min_clusters: int = 3

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction: must be in (0, 1), got {self.fraction}")
        if self.min_clusters < 3:
            raise ValueError(f"min_clusters: must be >= 3 (two to train on, one to validate), got {self.min_clusters}")


def split_clusters(cluster_ids: np.ndarray, fraction: float, seed: int, min_clusters: int = 3) -> tuple[np.ndarray, str, str]:
    """Roles of clustered images (see the module docstring for the rule).

    Args:
        cluster_ids: (N,) int cluster id of each clustered image.
        fraction: share of the clustered images held out (whole clusters).
        seed: seed of the draw.
        min_clusters: fewest clusters that allow training and validation.

    Returns:
        ((N,) bool mask of validation images, rule: 'split' | 'validate-only' | 'none',
        a one-line explanation).
    """
    cluster_ids = np.asarray(cluster_ids, np.int64)
    clusters = np.unique(cluster_ids)
    c = clusters.size
    if c == 0:
        return np.zeros(0, bool), "none", ("no verified clusters: nothing to validate on, so no fine-tuning and no "
                                           "re-ranking; the off-the-shelf model is served as it is")
    if c < min_clusters:
        return np.ones(cluster_ids.size, bool), "validate-only", (
            f"{c} verified cluster(s), fewer than {min_clusters}: too few to both train and validate; no "
            "fine-tuning, every cluster validates the re-ranking choice, the off-the-shelf model is served")
    sizes = dict(zip(*np.unique(cluster_ids, return_counts=True)))
    budget = fraction * cluster_ids.size
    held: list[int] = []
    taken = 0
    for cl in np.random.default_rng(seed).permutation(clusters):
        if len(held) == c - 2:
            break
        if taken + sizes[cl] <= budget:
            held.append(int(cl))
            taken += int(sizes[cl])
    if not held:
        held = [int(min(clusters, key=lambda cl: (sizes[cl], cl)))]
    val = np.isin(cluster_ids, held)
    return val, "split", (f"{len(held)} of {c} verified clusters ({int(val.sum())} of {cluster_ids.size} clustered "
                          "images) held out for validation")


def split_stage(cfg: SplitConfig) -> dict[str, Any]:
    """Write `split.parquet` and `split.json` from `clusters.parquet`; returns the record."""
    from raytrieval.mining.cleaning import read_clusters

    run_dir = Path(cfg.run_dir)
    path = run_dir / "clusters.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the clean stage first")
    clusters = read_clusters(path)
    ids = clusters.column("image_id").to_pylist()
    cids = np.asarray(clusters.column("cluster_id").to_pylist(), np.int64)
    val, rule, message = split_clusters(cids, cfg.fraction, cfg.seed, cfg.min_clusters)
    roles = np.where(val, "val", "train")
    table = pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(cids, pa.int64()),
                                  pa.array(roles.tolist(), pa.string())], schema=SPLIT_SCHEMA)
    atomic_write_table(table, run_dir / SPLIT_FILE)
    record = {
        "stage": "split", "config": asdict(cfg), "rule": rule, "message": message,
        "fine_tune": rule == "split",
        "counts": {
            "clusters": int(np.unique(cids).size),
            "val_clusters": int(np.unique(cids[val]).size), "train_clusters": int(np.unique(cids[~val]).size),
            "val_images": int(val.sum()), "train_images": int((~val).sum()),
        },
    }
    atomic_write_json(run_dir / SPLIT_RECORD, record)
    return record


def read_split(path: str | os.PathLike) -> pa.Table:
    """Read and check `split.parquet`."""
    table = pq.read_table(path)
    missing = [n for n in SPLIT_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"split {path}: missing columns {missing}")
    table = table.select(SPLIT_SCHEMA.names).cast(SPLIT_SCHEMA)
    bad = set(table.column("role").to_pylist()) - set(ROLES)
    if bad:
        raise ValueError(f"split {path}: unknown roles {sorted(bad)}; expected {ROLES}")
    return table


def validation_ids(path: str | os.PathLike) -> set[str]:
    """Image ids of the validation clusters in `split.parquet`."""
    table = read_split(path)
    return {i for i, r in zip(table.column("image_id").to_pylist(), table.column("role").to_pylist()) if r == "val"}
