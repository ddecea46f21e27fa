"""Where a model comes from, and the one loader: a `ModelSpec`, a checkpoint directory, or an
MLflow model URI (``models:/<name>@champion``).

Configs, index records and the command line name a model in either of two dict forms, both read
by `ModelSource.from_dict`: the tagged form ``{"checkpoint": dir}`` / ``{"spec": ModelSpec dict}``
/ ``{"model_uri": uri, "tracking_uri": uri}`` (index meta, selection.json, serving), and the plain
form used by mining (a checkpoint path, or a flat `ModelSpec` dict).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from raytrieval.retrieval.checkpoint import META_FILE, MODEL_FILE, load_checkpoint, read_meta
from raytrieval.retrieval.model import ModelSpec, RetrievalNet

_KINDS = ("checkpoint", "spec", "model_uri")


@dataclass(frozen=True)
class ModelSource:
    """A model named by exactly one of a spec, a checkpoint directory or an MLflow model URI.

    Args:
        spec: an untrained-head model built from this definition (weights from `spec.weights`).
        checkpoint: a checkpoint directory (meta.json + model.pt).
        model_uri: an MLflow model URI whose artifacts contain a checkpoint directory.
        tracking_uri: the MLflow tracking URI for `model_uri` (None: MLflow's default).
    """

    spec: ModelSpec | None = None
    checkpoint: str | None = None
    model_uri: str | None = None
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"model source: expected exactly one of checkpoint, spec or model_uri, got {given}")
        if self.spec is not None and not isinstance(self.spec, ModelSpec):
            raise ValueError(f"spec: expected a ModelSpec, got {type(self.spec).__name__}")
        if self.tracking_uri is not None and self.model_uri is None:
            raise ValueError("tracking_uri: only goes with model_uri")

    @classmethod
    def from_dict(cls, value: "ModelSourceLike") -> "ModelSource":
        """Read any of the forms a model is named in (see the module docstring).

        Raises:
            ValueError: none or several of the kinds, or an invalid spec.
        """
        if isinstance(value, ModelSource):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(checkpoint=str(value))
        if not isinstance(value, dict):
            raise ValueError(f"model source: expected a dict or a checkpoint path, got {type(value).__name__}")
        if not any(k in value for k in _KINDS):  # a flat ModelSpec dict
            return cls(spec=ModelSpec(**value))
        extra = set(value) - set(_KINDS) - {"tracking_uri"}
        if extra:
            raise ValueError(f"model source: unknown keys {sorted(extra)}")
        if value.get("checkpoint"):
            return cls(checkpoint=str(value["checkpoint"]))
        if value.get("spec") is not None:
            spec = value["spec"]
            return cls(spec=spec if isinstance(spec, ModelSpec) else ModelSpec(**spec))
        if value.get("model_uri"):
            return cls(model_uri=str(value["model_uri"]), tracking_uri=value.get("tracking_uri") or None)
        raise ValueError(f"model source: expected checkpoint, spec or model_uri, got {sorted(value)}")

    def to_dict(self) -> dict[str, Any]:
        """The tagged dict form (JSON-serialisable)."""
        if self.checkpoint is not None:
            return {"checkpoint": self.checkpoint}
        if self.spec is not None:
            return {"spec": self.spec.to_dict()}
        return {"model_uri": self.model_uri, "tracking_uri": self.tracking_uri}

    def preprocessing(self) -> tuple[tuple[float, ...], int]:
        """(scales, max_size) the model extracts with, without loading weights.

        Raises:
            ValueError: for a `model_uri` (its meta is only known once downloaded; load it).
        """
        if self.spec is not None:
            return tuple(self.spec.scales), int(self.spec.max_size)
        if self.checkpoint is not None:
            meta = read_meta(self.checkpoint)
            return tuple(float(s) for s in meta["scales"]), int(meta["max_size"])
        raise ValueError(f"model_uri: preprocessing of {self.model_uri} is known only after loading it")

    def load(self, map_location: str = "cpu") -> RetrievalNet:
        """The model in eval mode (see `load_model`)."""
        if self.checkpoint is not None:
            return load_checkpoint(self.checkpoint, map_location=map_location)
        if self.spec is not None:
            return RetrievalNet(self.spec).eval()
        return load_checkpoint(_download_checkpoint(self.model_uri, self.tracking_uri), map_location=map_location)


ModelSourceLike = Union[ModelSource, str, os.PathLike, dict]


def load_model(source: ModelSourceLike, map_location: str = "cpu") -> RetrievalNet:
    """Load a model from any form of `ModelSource` (the one model-loading entry point).

    Args:
        source: a `ModelSource`, a checkpoint path, or one of its dict forms.
        map_location: where the checkpoint's tensors are loaded.

    Returns:
        `RetrievalNet` in eval mode.
    """
    return ModelSource.from_dict(source).load(map_location)


def find_checkpoint(root: str | Path) -> Path:
    """The directory under `root` holding meta.json and model.pt (e.g. an MLflow artifact tree)."""
    for dirpath, _, filenames in sorted(os.walk(root)):
        if META_FILE in filenames and MODEL_FILE in filenames:
            return Path(dirpath)
    raise FileNotFoundError(f"model: no checkpoint ({META_FILE} + {MODEL_FILE}) in the artifacts under {root}")


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` for a block, then put back as it was.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI to the process; left there, a
    later pipeline in the same process would take it for a shared server and log into this
    training's store.
    """
    import mlflow

    exported = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported


def _download_checkpoint(model_uri: str, tracking_uri: str | None) -> Path:
    """Download the registered model's artifacts and find its checkpoint (imports mlflow only here)."""
    try:
        import mlflow
    except ImportError as exc:  # pragma: no cover - mlflow is a dependency
        raise ImportError("model_uri needs mlflow: pip install mlflow") from exc
    dst = tempfile.mkdtemp(prefix="raytrieval-model-")
    with fluent_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext():  # models:/ reads the global
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst)
    return find_checkpoint(Path(local))
