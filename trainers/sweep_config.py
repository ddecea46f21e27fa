"""`SweepConfig`: a Ray Tune sweep over fine-tuning runs, as a stdlib dataclass loaded from YAML.

A sweep is a base `TrainConfig` (the `train` mapping) and a search space over some of its
fields. In the YAML file a searched field is either

- a list: every value with `searcher: grid` (a grid axis), one value drawn per trial otherwise;
- a mapping with one key: `grid: [...]`, `choice: [...]`, `uniform: [lo, hi]`,
  `loguniform: [lo, hi]`, `randint: [lo, hi]` (hi excluded), `quniform: [lo, hi, q]`.

`grid` axes need the grid or random searcher (TPE cannot enumerate a grid).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytrieval.retrieval.configfile import read_yaml_mapping
from raytrieval.trainers.config import TrainConfig, tracking_uri_for

SEARCHERS = ("grid", "random", "tpe")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")
# Filled in per trial by the sweep: searching or setting them in `train` is an error.
TRIAL_FIELDS = ("out", "name", "registered_model", "model_alias", "tracking_uri", "experiment", "address")


@dataclass
class SweepConfig:
    """Configuration of a hyper-parameter sweep (`raytrieval tune --config configs/tune.yaml`).

    Args:
        train: base `TrainConfig` fields shared by every trial; it needs what produces
            `metric`: `split` for the default label-free `self_map` (a benchmark's
            `val_dataset` only scores, unless `metric` names its mAP explicitly).
        search_space: searched `TrainConfig` fields (see the module docstring).
        searcher: 'grid' (every combination of the list axes), 'random' or 'tpe' (Optuna's
            tree-structured Parzen estimator, runs offline).
        num_samples: trials to draw ('random', 'tpe'; None: 8); with 'grid' the number of
            repeats of the grid (None: 1; each repeat draws the non-grid axes anew).
        include_default: also run the base configuration as the first trial (when its values
            lie in the search space), the reference the sweep's gain is measured against.
        scheduler: 'asha' (asynchronous successive halving on the validation metric, the
            time axis being epochs) or 'fifo' (every trial runs to the end).
        grace_period: ASHA: epochs a trial always runs before it can be stopped.
        reduction_factor: ASHA: 1 / the fraction of trials kept at each rung.
        metric: validation metric the sweep optimises (reported per epoch by the trainer);
            the default `self_map` needs no labels.
        mode: 'max' or 'min'.
        max_concurrent_trials: None derives it from the cluster (a trial needs all its Ray
            Train workers at once, plus a small share for its Tune driver actor).
        trial_cpu: CPUs of a trial's Tune actor (it only waits on its TorchTrainer).
        out: sweep root; the sweep lives in `<out>/<name>`.
        name: sweep name; re-running an interrupted sweep resumes it (`Tuner.restore`).
        tracking_uri: MLflow tracking URI; None for `sqlite:///<out>/mlflow.db`.
        experiment: MLflow experiment.
        registered_model: register the best trial's model under this name; None to skip.
        champion_alias: registry alias moved to the best trial's version.
        seed: seed of the random and TPE searchers.
        address: Ray cluster address; None for RAY_ADDRESS or an embedded local Ray.
    """

    train: dict[str, Any] = field(default_factory=dict)
    search_space: dict[str, Any] = field(default_factory=dict)
    searcher: str = "random"
    num_samples: int | None = None
    include_default: bool = True
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    metric: str = "self_map"
    mode: str = "max"
    max_concurrent_trials: int | None = None
    trial_cpu: float = 0.1
    out: str = "runs/tune"
    name: str = "sweep"
    tracking_uri: str | None = None
    experiment: str = "raytrieval-tune"
    registered_model: str | None = "raytrieval"
    champion_alias: str | None = "champion"
    seed: int = 0
    address: str | None = None

    def __post_init__(self) -> None:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.train) - fields)
        if unknown:
            raise ValueError(f"train: unknown TrainConfig fields {unknown}")
        reserved = sorted((set(self.train) | set(self.search_space)) & set(TRIAL_FIELDS))
        if reserved:
            raise ValueError(f"{reserved}: set per trial by the sweep; use the sweep's own fields")
        unknown = sorted(set(self.search_space) - fields)
        if unknown:
            raise ValueError(f"search_space: unknown TrainConfig fields {unknown}")
        if not self.search_space:
            raise ValueError("search_space: empty; name at least one TrainConfig field to search")
        for key, spec in self.search_space.items():
            _check_axis(key, spec)
        if self.searcher not in SEARCHERS:
            raise ValueError(f"searcher: expected one of {SEARCHERS}, got {self.searcher!r}")
        if self.searcher == "tpe" and any(_kind(s) == "grid" for s in self.search_space.values()):
            raise ValueError("searcher: 'tpe' cannot enumerate 'grid' axes; use choice or the grid searcher")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: expected one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', got {self.mode!r}")
        if self.num_samples is None:
            self.num_samples = 1 if self.searcher == "grid" else 8
        for name in ("num_samples", "grace_period"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor: must be >= 2, got {self.reduction_factor}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"max_concurrent_trials: must be >= 1 or None, got {self.max_concurrent_trials}")
        if not 0 < self.trial_cpu <= 1:
            raise ValueError(f"trial_cpu: must be in (0, 1] (0 cannot be scheduled), got {self.trial_cpu}")
        if not self.name or "/" in self.name:
            raise ValueError(f"name: must be a non-empty name without '/', got {self.name!r}")
        if self.champion_alias is not None and not self.registered_model:
            self.champion_alias = None
        self.base_config()  # the base must be a valid run on its own

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> SweepConfig:
        """Load a YAML mapping of fields; `overrides` (not None) win over the file."""
        data = read_yaml_mapping(path, overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"sweep config: unknown fields {unknown}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict."""
        return dataclasses.asdict(self)

    # --------------------------------------------------------------------- derived

    @property
    def sweep_dir(self) -> Path:
        """`<out>/<name>`, absolute: the Tune experiment directory."""
        return Path(self.out).resolve() / self.name

    @property
    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI (`tracking_uri_for`): explicit, MLFLOW_TRACKING_URI, or `<out>/mlflow.db`."""
        return tracking_uri_for(self.out, self.tracking_uri)

    def base_config(self) -> TrainConfig:
        """The base run (validated): what `include_default` runs as the reference trial."""
        cfg = TrainConfig(**{**self.train, "out": str(self.sweep_dir / "trials"), "registered_model": None})
        if self.metric == "self_map" and cfg.split is None:
            raise ValueError("train.split: required, trials are compared on self_map (the label-free metric of the "
                             "split stage's validation clusters)")
        if self.metric.startswith("val_") and cfg.val_dataset is None:
            raise ValueError(f"train.val_dataset: required by metric {self.metric!r}")
        return cfg

    def trial_config(self, params: dict[str, Any], trial_id: str) -> TrainConfig:
        """The `TrainConfig` of one trial: base + sampled params, its own run directory.

        Validated per epoch under ASHA (`val_every` 1: the scheduler compares every epoch); the
        model is not registered by the trial (the sweep registers the champion).
        """
        data = {**self.train, **params, "out": str(self.sweep_dir / "trials"), "name": trial_id,
                "registered_model": None, "model_alias": None, "address": None}
        if self.scheduler == "asha":
            data["val_every"] = 1
        if "loss" in params and "margin" not in params and "margin" not in self.train:
            data["margin"] = None  # the default margin of the drawn loss
        return TrainConfig(**data).resolved()

    def trial_epochs(self, params: dict[str, Any]) -> int:
        """Epochs a trial with these params runs when not stopped early."""
        return int({**self.base_config().to_dict(), **params}["epochs"])

    def default_point(self) -> dict[str, Any] | None:
        """The base configuration's values of the searched fields, if they lie in the space."""
        base = dataclasses.asdict(self.base_config())
        point = {key: base[key] for key in self.search_space}
        return point if all(_contains(spec, point[key]) for key, spec in self.search_space.items()) else None

    def param_space(self) -> dict[str, Any]:
        """The Tune search space (`ray.tune` domains; lists become grid axes or choices)."""
        from ray import tune

        space = {}
        for key, spec in self.search_space.items():
            kind, args = _kind(spec), _args(spec)
            if kind == "list":
                kind = "grid" if self.searcher == "grid" else "choice"
            space[key] = {
                "grid": lambda a: tune.grid_search(list(a)),
                "choice": lambda a: tune.choice(list(a)),
                "uniform": lambda a: tune.uniform(*a),
                "loguniform": lambda a: tune.loguniform(*a),
                "randint": lambda a: tune.randint(*a),
                "quniform": lambda a: tune.quniform(*a),
            }[kind](args)
        return space


def _kind(spec: Any) -> str:
    if isinstance(spec, list):
        return "list"
    if isinstance(spec, dict) and len(spec) == 1:
        return next(iter(spec))
    return "invalid"


def _args(spec: Any) -> list:
    return spec if isinstance(spec, list) else next(iter(spec.values()))


def _check_axis(key: str, spec: Any) -> None:
    kind = _kind(spec)
    if kind not in ("list", *DISTRIBUTIONS):
        raise ValueError(f"search_space.{key}: expected a list or one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    args = _args(spec)
    if not isinstance(args, list) or not args:
        raise ValueError(f"search_space.{key}: expected a non-empty list of values, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not args[0] < args[1]:
            raise ValueError(f"search_space.{key}: {kind} needs [low, high] with low < high, got {args}")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"search_space.{key}: loguniform needs low > 0, got {args}")
    if kind == "quniform" and (len(args) != 3 or not args[0] < args[1] or args[2] <= 0):
        raise ValueError(f"search_space.{key}: quniform needs [low, high, q], got {args}")


def _contains(spec: Any, value: Any) -> bool:
    kind, args = _kind(spec), _args(spec)
    if kind in ("list", "grid", "choice"):
        return value in args
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if kind == "randint":
        return args[0] <= value < args[1] and float(value).is_integer()
    return args[0] <= value <= args[1]
