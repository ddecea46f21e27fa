"""`TrainConfig`: everything a fine-tuning run needs, as a stdlib dataclass.

Loaded from YAML (`TrainConfig.from_yaml`), overridden by CLI flags (`with_overrides`), sent to
the Ray Train workers as a plain dict (`to_dict`) and rebuilt there (`from_dict`), and logged
with every run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytrieval.mining.tuples import DEFAULT_EXCLUDE_KNN, TupleRules
from raytrieval.retrieval.configfile import read_yaml_mapping
from raytrieval.retrieval.model import ModelSpec
from raytrieval.trainers.losses import DEFAULT_MARGINS, LOSSES

PAIR_SOURCES = ("clusters", "tuples")
NEGATIVE_SOURCES = ("pool", "listed")
POSITIVE_METHODS = ("random", "descriptor")


def tracking_uri_for(out: str | os.PathLike, explicit: str | None) -> str:
    """The MLflow tracking URI of a run: explicit, else MLFLOW_TRACKING_URI (a shared server),
    else `sqlite:///<out>/mlflow.db` (absolute). Training, sweeps and the pipeline use this one rule."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


@dataclass
class TrainConfig:
    """Configuration of a fine-tuning run (siamese / triplet, negatives re-mined every epoch).

    Args:
        manifest: `images.parquet` of the unlabeled collection (image_id -> uri); only rows with
            status 'ok' are used.
        pairs: where (query, positive) pairs come from: 'clusters' (`clusters.parquet` of the
            cleaning stage; each epoch samples queries among clustered images and a positive
            in the same cluster) or 'tuples' (`tuples.parquet`, e.g. manifold mining).
        clusters: `clusters.parquet` (image_id, cluster_id, box). Required for
            pairs='clusters'; with pairs='tuples' it only labels images for negative mining.
        tuples: `tuples.parquet` (query, positive, negatives, source, epoch); required for
            pairs='tuples'.
        negatives: 'pool': every epoch the hardest negatives are mined from a random pool of
            the collection, at most one per cluster and never from the query's cluster;
            'listed': every epoch the negatives listed in `tuples.parquet` for the query are
            re-ranked with the current model and the hardest kept (for manifold tuples, whose
            negatives are "close in descriptor space but not on the query's manifold": a
            free pool would hand out true matches as negatives).
        unclustered_negatives: with negatives='pool' and clusters, also draw negatives among
            the images in no cluster (each its own cluster). Off by default: an unverified
            image may show the query's landmark.
        knn: `knn.parquet` of the clean stage (src, dst, rank): the off-the-shelf kNN graph
            (negative exclusion, and the junk of self-validation).
        exclude_knn: with knn, no negative from a cluster linked to the query's by the first
            `exclude_knn` neighbours of any member (a landmark split into several clusters
            is not its own negative); None: the mine stage's default
            (`raytrieval.mining.tuples.DEFAULT_EXCLUDE_KNN`) with knn, 0 without; 0:
            cirtorch's rule, any other cluster.
        split: `split.parquet` of the split stage: its validation clusters are kept out of
            training (never a query, positive or negative) and give the label-free
            validation metric `self_map` reported every epoch; the best epoch by it is the
            run's final model. None: no self-validation (the last epoch is final).
        positive: with pairs='clusters', the positive of a query: 'random' cluster mate
            (re-drawn every epoch) or 'descriptor' (the most similar mate under the current
            model).
        num_queries: tuples per epoch (queries drawn without replacement; all if fewer).
        pool_size: images in the negative pool of an epoch (cirtorch's poolsize).
        num_negatives: negatives per tuple.
        image_size: longer image side during training and mining.
        backbone: backbone registry name.
        pooling: pooling registry name.
        gem_p: initial GeM power (pooling='gem').
        pooling_kwargs: the other arguments of the pooling (e.g. {"levels": 2} for R-MAC); GeM's
            power is `gem_p`, not a key here.
        weights: backbone initialisation: 'imagenet', a local state-dict file, or None.
        init_checkpoint: start from this checkpoint directory instead (backbone, pooling and
            whitening are then taken from its meta.json).
        whiten_dim: add a learned linear whitening layer of this output dimension, initialised
            from the PCA whitening of the collection's descriptors; None for none.
        whiten_shrinkage: eigenvalue power of that PCA initialisation (0 rotation, 1 full).
        max_size: longer image side at extraction (validation, and saved in the checkpoint's
            meta for evaluation and serving).
        loss: 'contrastive' or 'triplet'.
        margin: loss margin; None takes 0.7 (contrastive) or 0.1 (triplet, squared distances).
        lr: Adam learning rate of the backbone (and whitening).
        gem_p_lr: learning rate of GeM's p; None takes 10 x lr (cirtorch).
        weight_decay: Adam weight decay (not applied to GeM's p).
        lr_decay: exponential decay factor of the learning rates per epoch.
        batch_size: tuples per optimizer step and worker.
        epochs: training epochs (epoch 0 is the initial model, validated and checkpointed).
        freeze_bn: BatchNorm layers in eval mode (running statistics frozen), as cirtorch.
        seed: seed of query/pool/positive sampling and of the initial weights.
        val_dataset: a benchmark scored after every epoch ('rparis6k-mini', 'demo', ...), only
            to score (its mAP never chooses anything); None (default) for none.
        val_data_root: folder holding the benchmark.
        val_max_queries: use only the first queries of the benchmark; None for all.
        val_every: validate every this many epochs (epoch 0 and the last epoch always).
        workers: Ray Train workers (DDP ranks).
        cpus_per_worker: CPUs Ray reserves per worker (may be fractional, e.g. 0.9 so that a
            sweep trial's own actor fits beside its workers); its torch threads are this
            rounded down, at least 1.
        use_gpu: one GPU per worker (NCCL, mixed precision if `amp`).
        amp: float16 autocast with gradient scaling, on GPU only.
        max_failures: worker-group restarts from the last checkpoint before the run fails.
        out: run directory: Ray storage (`<out>/<name>`), MLflow database, final checkpoint.
        name: run name; re-running a name resumes it from its last checkpoint.
        tracking_uri: MLflow tracking URI; None for `sqlite:///<out>/mlflow.db`.
        experiment: MLflow experiment name.
        registered_model: register the final model under this name; None to skip.
        model_alias: point this registry alias (e.g. 'champion', what `raytrieval serve
            --model-uri models:/<name>@champion` loads) at the new version; None to leave
            the aliases alone.
        address: Ray cluster address; None for RAY_ADDRESS or an embedded local Ray.
    """

    manifest: str = ""
    pairs: str = "clusters"
    clusters: str | None = None
    tuples: str | None = None
    negatives: str = "pool"
    unclustered_negatives: bool = False
    knn: str | None = None
    exclude_knn: int | None = None
    split: str | None = None
    positive: str = "random"
    num_queries: int = 200
    pool_size: int = 2000
    num_negatives: int = 5
    image_size: int = 362
    backbone: str = "efficientnet_lite0"
    pooling: str = "gem"
    gem_p: float = 3.0
    pooling_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = "imagenet"
    init_checkpoint: str | None = None
    whiten_dim: int | None = None
    whiten_shrinkage: float = 0.5
    max_size: int = 512
    loss: str = "contrastive"
    margin: float | None = None
    lr: float = 5e-6
    gem_p_lr: float | None = None
    weight_decay: float = 1e-6
    lr_decay: float = field(default_factory=lambda: math.exp(-0.01))
    batch_size: int = 5
    epochs: int = 10
    freeze_bn: bool = True
    seed: int = 0
    val_dataset: str | None = None
    val_data_root: str = "../shared/data"
    val_max_queries: int | None = None
    val_every: int = 1
    workers: int = 2
    cpus_per_worker: float = 1
    use_gpu: bool = False
    amp: bool = True
    max_failures: int = 1
    out: str = "runs/train"
    name: str = "finetune"
    tracking_uri: str | None = None
    experiment: str = "raytrieval-train"
    registered_model: str | None = "raytrieval"
    model_alias: str | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.manifest:
            raise ValueError("manifest: required (images.parquet of the collection)")
        if self.pairs not in PAIR_SOURCES:
            raise ValueError(f"pairs: expected one of {PAIR_SOURCES}, got {self.pairs!r}")
        if self.pairs == "clusters" and not self.clusters:
            raise ValueError("clusters: required when pairs='clusters'")
        if self.pairs == "tuples" and not self.tuples:
            raise ValueError("tuples: required when pairs='tuples'")
        if self.negatives not in NEGATIVE_SOURCES:
            raise ValueError(f"negatives: expected one of {NEGATIVE_SOURCES}, got {self.negatives!r}")
        if self.negatives == "listed" and self.pairs != "tuples":
            raise ValueError("negatives: 'listed' needs pairs='tuples' (the tuples file lists them)")
        if self.positive not in POSITIVE_METHODS:
            raise ValueError(f"positive: expected one of {POSITIVE_METHODS}, got {self.positive!r}")
        for name in ("num_queries", "pool_size", "num_negatives", "batch_size", "workers", "val_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        if isinstance(self.cpus_per_worker, bool) or not isinstance(self.cpus_per_worker, (int, float)) or not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker: must be a number > 0, got {self.cpus_per_worker!r}")
        if self.exclude_knn and not self.knn:
            raise ValueError("exclude_knn: needs knn (knn.parquet of the clean stage)")
        if self.exclude_knn is None:
            self.exclude_knn = DEFAULT_EXCLUDE_KNN if self.knn else 0
        for name in ("epochs", "max_failures", "seed", "exclude_knn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be an int >= 0, got {value!r}")
        if self.image_size < 32:
            raise ValueError(f"image_size: must be >= 32, got {self.image_size}")
        if self.gem_p <= 0:
            raise ValueError(f"gem_p: must be > 0, got {self.gem_p}")
        if not isinstance(self.pooling_kwargs, dict):
            raise ValueError(f"pooling_kwargs: must be a mapping, got {self.pooling_kwargs!r}")
        if self.pooling == "gem" and "p" in self.pooling_kwargs:
            raise ValueError("pooling_kwargs: GeM's power is the field gem_p, not pooling_kwargs['p']")
        if self.weights in ("none", "None", ""):
            self.weights = None
        self.model_spec()  # the model fields, validated by ModelSpec (backbone, pooling, whiten_dim, max_size)
        if self.init_checkpoint is not None and not (Path(self.init_checkpoint) / "meta.json").is_file():
            raise ValueError(f"init_checkpoint: no meta.json in {self.init_checkpoint}")
        if not 0.0 <= self.whiten_shrinkage <= 1.0:
            raise ValueError(f"whiten_shrinkage: must be in [0, 1], got {self.whiten_shrinkage}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.margin is None:
            self.margin = DEFAULT_MARGINS[self.loss]
        if self.margin <= 0:
            raise ValueError(f"margin: must be > 0, got {self.margin}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.gem_p_lr is None:
            self.gem_p_lr = 10.0 * self.lr
        if self.gem_p_lr < 0:
            raise ValueError(f"gem_p_lr: must be >= 0, got {self.gem_p_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay: must be in (0, 1], got {self.lr_decay}")
        if self.val_max_queries is not None and self.val_max_queries < 1:
            raise ValueError(f"val_max_queries: must be >= 1 or None, got {self.val_max_queries}")
        if not self.name or "/" in self.name:
            raise ValueError(f"name: must be a non-empty name without '/', got {self.name!r}")
        if not self.out:
            raise ValueError("out: required")
        if self.model_alias is not None and not self.registered_model:
            raise ValueError("model_alias: needs registered_model")

    # --------------------------------------------------------------------- conversions

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (what the Ray Train workers receive)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_dict` output; unknown keys raise ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"train config: unknown fields {unknown}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load a YAML mapping of fields; `overrides` (not None) win over the file.

        Relative paths in the file stay relative to the current directory (as on the CLI).
        """
        return cls.from_dict(read_yaml_mapping(path, overrides))

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        """A copy with the given fields replaced (None values are ignored)."""
        return TrainConfig.from_dict({**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})

    # --------------------------------------------------------------------- derived

    PATH_FIELDS = ("manifest", "clusters", "tuples", "knn", "split", "init_checkpoint", "val_data_root", "out")

    def tuple_rules(self) -> TupleRules:
        """The rules of the shared tuple builder (`raytrieval.mining.tuples`) for this run."""
        return TupleRules(
            positive="fixed" if self.pairs == "tuples" else self.positive,
            negatives="listed" if self.negatives == "listed" else "hard",
            num_queries=self.num_queries, pool_size=self.pool_size, num_negatives=self.num_negatives,
            unclustered_negatives=self.unclustered_negatives, seed=self.seed,
        )

    def resolved(self) -> TrainConfig:
        """A copy whose file and folder fields are absolute (what the workers receive: their
        working directory may differ, e.g. under `ray job submit --working-dir`)."""
        return self.with_overrides(**{
            name: str(Path(getattr(self, name)).resolve()) for name in self.PATH_FIELDS if getattr(self, name)
        })

    def model_spec(self) -> ModelSpec:
        """The `ModelSpec` of a freshly initialised model (ignores `init_checkpoint`)."""
        return ModelSpec(
            backbone=self.backbone,
            pooling=self.pooling,
            pooling_kwargs={**self.pooling_kwargs, **({"p": self.gem_p} if self.pooling == "gem" else {})},
            whiten_dim=self.whiten_dim,
            max_size=self.max_size,
            scales=(1.0,),
            weights=self.weights,
        )

    @property
    def torch_threads(self) -> int:
        """Intra-op threads of a worker: its CPU share rounded down, at least 1."""
        return max(1, int(self.cpus_per_worker))

    @property
    def run_dir(self) -> Path:
        """`<out>/<name>` as an absolute path (Ray storage of this run)."""
        return Path(self.out).resolve() / self.name

    @property
    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI (`tracking_uri_for`): explicit, MLFLOW_TRACKING_URI, or `<out>/mlflow.db`."""
        return tracking_uri_for(self.out, self.tracking_uri)
