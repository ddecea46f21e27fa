"""The retrieval network: backbone -> pooling -> L2 -> optional whitening -> L2.

Training, mining, evaluation and serving all embed through `RetrievalNet.forward`, and every
model carries the `meta` needed to rebuild it and preprocess images exactly as it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from raytrieval.retrieval.backbones import BACKBONES, create_backbone
from raytrieval.retrieval.pooling import POOLINGS, create_pooling, l2n, multiscale_power, pooled_dim

CODE_VERSION = "0.1.0"


@dataclass
class ModelSpec:
    """What defines a retrieval model, saved as the checkpoint's meta.

    Args:
        backbone: backbone registry name.
        pooling: pooling registry name.
        pooling_kwargs: arguments of the pooling (e.g. {"p": 3.0} for GeM).
        whiten_dim: output dimension of a learned linear whitening layer; None for none.
        max_size: longer image side at extraction.
        scales: extraction scales, descriptors power-averaged over them.
        weights: "imagenet", a local file, or None; only used to initialise a new model.
    """

    backbone: str = "efficientnet_lite0"
    pooling: str = "gem"
    pooling_kwargs: dict[str, Any] = field(default_factory=dict)
    whiten_dim: int | None = None
    max_size: int = 512
    scales: tuple[float, ...] = (1.0,)
    weights: str | None = "imagenet"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: unknown {self.backbone!r}; choose from {sorted(BACKBONES)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: unknown {self.pooling!r}; choose from {sorted(POOLINGS)}")
        if self.whiten_dim is not None and self.whiten_dim < 1:
            raise ValueError(f"whiten_dim: must be >= 1, got {self.whiten_dim}")
        if self.max_size < 32:
            raise ValueError(f"max_size: must be >= 32, got {self.max_size}")
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales: must be positive, got {self.scales}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d


class RetrievalNet(nn.Module):
    """Backbone + pooling (+ whitening) producing L2-normalised global descriptors.

    Args:
        spec: the model definition; the backbone weights are taken from `spec.weights`.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.backbone = create_backbone(spec.backbone, spec.weights)
        channels = self.backbone.out_channels
        self.pool = create_pooling(spec.pooling, in_channels=channels, **spec.pooling_kwargs)
        self.pool_dim = pooled_dim(self.pool, channels)  # C, or a learned head's own dimension
        self.whiten = nn.Linear(self.pool_dim, spec.whiten_dim, bias=True) if spec.whiten_dim else None
        self.dim = spec.whiten_dim or self.pool_dim
        self.register_buffer("mean", torch.tensor(self.backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.backbone.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> backbone input."""
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> conv features (B, C, h, w)."""
        return self.backbone.forward_features(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Conv features (B, C, h, w) -> unnormalised pooled (and whitened) vectors (B, D)."""
        v = l2n(self.pool(features))
        return self.whiten(v) if self.whiten is not None else v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> L2-normalised descriptors (B, D)."""
        return l2n(self.head(self.forward_features(x)))

    @property
    def multiscale_power(self) -> float:
        """Power for averaging descriptors over scales: GeM's p, else 1 (also with whitening,
        which can make entries negative)."""
        return 1.0 if self.whiten is not None else multiscale_power(self.pool)

    @property
    def meta(self) -> dict[str, Any]:
        """Preprocessing and architecture, saved next to every checkpoint."""
        return {
            **self.spec.to_dict(),
            "mean": list(self.backbone.mean),
            "std": list(self.backbone.std),
            "dim": self.dim,
            "code_version": CODE_VERSION,
        }


def build_model(
    backbone: str = "efficientnet_lite0",
    pooling: str = "gem",
    weights: str | None = "imagenet",
    **spec_kwargs: Any,
) -> RetrievalNet:
    """Build a retrieval model in eval mode (see `ModelSpec` for the other arguments)."""
    return RetrievalNet(ModelSpec(backbone=backbone, pooling=pooling, weights=weights, **spec_kwargs)).eval()


def spec_from_meta(meta: dict[str, Any]) -> ModelSpec:
    """Rebuild the `ModelSpec` from a checkpoint meta (extra keys are ignored)."""
    names = ModelSpec.__dataclass_fields__.keys()
    kwargs = {k: meta[k] for k in names if k in meta}
    kwargs["weights"] = None  # weights come from the checkpoint's state dict
    return ModelSpec(**kwargs)
