"""Global pooling of conv feature maps: MAC, SPoC, GeM, R-MAC, CroW, and two learned heads,
neural codes (an fc layer) and regional attention.

Pure functions over (B, C, H, W) tensors returning (B, C), then thin `nn.Module` wrappers and
a name -> constructor registry. Normalisation is left to the caller (`l2n`). A pooling with
weights that depend on the channel count declares `needs_channels = True` and is given
`in_channels` by `create_pooling`; one whose output is not C-dimensional has `out_dim`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6


def l2n(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """L2-normalise the last dimension.

    Args:
        x: (..., D) tensor.
        eps: added to the norm.
    """
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: (B, C, H, W) -> (B, C)."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled convolutional features (mean over positions): (B, C, H, W) -> (B, C)."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = EPS) -> torch.Tensor:
    """Generalized mean pooling (Radenović et al. 2018): (mean x^p)^(1/p).

    Args:
        x: (B, C, H, W) non-negative activations (clamped at eps).
        p: the power; 1 is SPoC, large p tends to MAC.
        eps: lower clamp so that the power is defined.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """R-MAC square regions (Tolias et al. 2016) over an H x W map, as in cirtorch.

    Args:
        height: feature map height.
        width: feature map width.
        levels: number of scales L; level l has regions of side floor(2 min(H, W) / (l + 1)).
        overlap: desired overlap between neighbouring regions of the first level.

    Returns:
        A list of (y, x, h, w) regions, the whole map first.
    """
    regions = [(0, 0, height, width)]
    side = min(height, width)
    steps = torch.tensor([2, 3, 4, 5, 6, 7], dtype=torch.float64)
    b = (max(height, width) - side) / (steps - 1)
    idx = int(torch.argmin(torch.abs(((side**2 - side * b) / side**2) - overlap)))
    extra_w = idx + 1 if height < width else 0
    extra_h = idx + 1 if height > width else 0
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        if wl == 0:
            continue
        half = math.floor(wl / 2 - 1)
        bw = 0.0 if level + extra_w == 1 else (width - wl) / (level + extra_w - 1)
        bh = 0.0 if level + extra_h == 1 else (height - wl) / (level + extra_h - 1)
        xs = [math.floor(half + i * bw) - half for i in range(level + extra_w)]
        ys = [math.floor(half + i * bh) - half for i in range(level + extra_h)]
        regions.extend((y, x, wl, wl) for y in ys for x in xs)
    return regions


def regional_mac(x: torch.Tensor, regions: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """MAC of each region: (B, C, H, W) -> (B, R, C)."""
    return torch.stack([mac(x[:, :, y : y + h, xx : xx + w]) for y, xx, h, w in regions], dim=1)


def rmac(x: torch.Tensor, levels: int = 3, eps: float = EPS) -> torch.Tensor:
    """Regional MAC: sum of L2-normalised region MACs (whole map included): (B, C, H, W) -> (B, C)."""
    regions = rmac_regions(x.shape[-2], x.shape[-1], levels)
    return l2n(regional_mac(x, regions), eps).sum(dim=1)


def crow(x: torch.Tensor, a: float = 2.0, b: float = 2.0, eps: float = EPS) -> torch.Tensor:
    """Cross-dimensional weighting and pooling (Kalantidis et al. 2016): (B, C, H, W) -> (B, C).

    Spatial weights are the power-normalised channel sum; channel weights are the log inverse
    of each channel's share of non-zero responses (an IDF-like sparsity weight).
    """
    s = x.sum(dim=1, keepdim=True)  # (B, 1, H, W)
    z = s.pow(a).sum(dim=(-2, -1), keepdim=True).pow(1.0 / a)
    spatial = (s / (z + eps)).pow(1.0 / b)
    pooled = (x * spatial).sum(dim=(-2, -1))  # (B, C)
    q = (x > 0).float().mean(dim=(-2, -1))  # (B, C) share of non-zero positions
    channel = torch.log((q.shape[1] * eps + q.sum(dim=1, keepdim=True)) / (eps + q))
    return pooled * channel


def weighted_spoc(x: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Weighted mean of the features over positions: sum w x / sum w.

    Args:
        x: (B, C, H, W) features.
        w: (B, 1, H, W) non-negative weights; equal weights give `spoc`.
        eps: added to the weight sum.

    Returns:
        (B, C).
    """
    return (x * w).sum(dim=(-2, -1)) / (w.sum(dim=(-2, -1)) + eps)


def seeded_orthogonal(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A fixed random matrix with orthonormal rows (or columns when rows > cols): (rows, cols).

    QR of a seeded Gaussian matrix, signs fixed by the diagonal of R, so the same seed gives the
    same matrix on every machine and torch version that keeps `torch.randn` stable.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)  # (max, min) orthonormal columns
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)  # a unique Q: R with a positive diagonal
    return (q.T if rows < cols else q).float().contiguous()


class MAC(nn.Module):
    """MAC pooling module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mac(x)


class SPoC(nn.Module):
    """SPoC (average) pooling module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spoc(x)


class GeM(nn.Module):
    """GeM pooling with a learnable power p.

    Args:
        p: initial power.
        learn_p: whether p is a trainable parameter.
    """

    def __init__(self, p: float = 3.0, learn_p: bool = True):
        super().__init__()
        if p <= 0:
            raise ValueError(f"p: GeM power must be > 0, got {p}")
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}"


class RMAC(nn.Module):
    """R-MAC pooling module.

    Args:
        levels: number of region scales.
    """

    def __init__(self, levels: int = 3):
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels: must be >= 1, got {levels}")
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmac(x, self.levels)


class CroW(nn.Module):
    """CroW pooling module.

    Args:
        a: spatial power-normalisation exponent.
        b: spatial power-scaling exponent.
    """

    def __init__(self, a: float = 2.0, b: float = 2.0):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return crow(x, self.a, self.b)


class NeuralCodes(nn.Module):
    """Neural codes (Babenko et al. 2014): a fully connected layer with ReLU on the globally
    average-pooled conv features, (B, C, H, W) -> (B, dim); the net L2-normalises the result.

    Babenko et al. take the fc6/fc7 activations of a classification network; a backbone here
    has no fc layer, and a PCA of pooled features is not available when the model is built, so
    the layer starts as a fixed seeded random orthogonal projection (zero bias) and is only
    learned in fine-tuning (`raytrieval train`). Off the shelf it is a random projection of SPoC
    followed by ReLU, which drops the negative half of the projected coordinates: expect it
    below SPoC until trained (`benchmarks/heads.md`).

    Args:
        in_channels: C, given by the network (`create_pooling`).
        dim: output dimension.
        seed: seed of the initial orthogonal projection.
    """

    needs_channels = True

    def __init__(self, in_channels: int, dim: int = 512, seed: int = 0):
        super().__init__()
        if in_channels < 1 or dim < 1:
            raise ValueError(f"neural_codes: in_channels and dim must be >= 1, got {in_channels}, {dim}")
        self.out_dim = dim
        self.fc = nn.Linear(in_channels, dim, bias=True)
        with torch.no_grad():
            self.fc.weight.copy_(seeded_orthogonal(dim, in_channels, seed))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(spoc(x)))  # (B, dim)


class Attention(nn.Module):
    """Regional attention pooling (after Kim et al. 2018): a small network scores every
    position of the conv map, w = softplus(conv1x1(relu(conv1x1(x)))), C -> hidden -> 1, and the
    descriptor is the w-weighted mean of the features (`weighted_spoc`), (B, C, H, W) -> (B, C).

    Kim et al. weight R-MAC regions; here the regions are the map's positions. The last conv
    starts at zero, so every weight is softplus(0) and the untrained head is exactly SPoC. The
    scorer is trained on the clean stage's pseudo-landmark classes with the backbone frozen
    (`raytrieval.trainers.attention`, `raytrieval attention`), or with the whole net in
    fine-tuning.

    Args:
        in_channels: C, given by the network (`create_pooling`).
        hidden: width of the hidden layer; None: C // 8.
    """

    needs_channels = True

    def __init__(self, in_channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden if hidden is not None else max(1, in_channels // 8)
        if in_channels < 1 or hidden < 1:
            raise ValueError(f"attention: in_channels and hidden must be >= 1, got {in_channels}, {hidden}")
        self.score = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))
        nn.init.zeros_(self.score[2].weight)
        nn.init.zeros_(self.score[2].bias)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position weights (B, 1, H, W) of features (B, C, H, W)."""
        return F.softplus(self.score(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weighted_spoc(x, self.weights(x))


POOLINGS: dict[str, Callable[..., nn.Module]] = {
    "mac": MAC,
    "spoc": SPoC,
    "gem": GeM,
    "rmac": RMAC,
    "crow": CroW,
    "neural_codes": NeuralCodes,
    "attention": Attention,
}


def create_pooling(name: str, in_channels: int | None = None, **kwargs) -> nn.Module:
    """Build a pooling module by name (mac, spoc, gem, rmac, crow, neural_codes, attention).

    Args:
        name: registry name.
        in_channels: the feature maps' channel count; passed on only to the poolings that
            declare `needs_channels` (their weights depend on it), ignored by the others.
        **kwargs: the pooling's own arguments (`ModelSpec.pooling_kwargs`).
    """
    if name not in POOLINGS:
        raise ValueError(f"pooling: unknown {name!r}; choose from {sorted(POOLINGS)}")
    cls = POOLINGS[name]
    if getattr(cls, "needs_channels", False):
        if in_channels is None:
            raise ValueError(f"pooling: {name!r} needs in_channels (the feature maps' channel count)")
        return cls(in_channels=in_channels, **kwargs)
    return cls(**kwargs)


def pooled_dim(pooling: nn.Module, in_channels: int) -> int:
    """Dimension of the pooling's output for C = `in_channels` input channels."""
    return int(getattr(pooling, "out_dim", in_channels))


def multiscale_power(pooling: nn.Module) -> float:
    """The power used to average descriptors over scales: GeM's p, else 1 (plain mean)."""
    return float(pooling.p.detach()) if isinstance(pooling, GeM) else 1.0


def resize_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinearly rescale a (B, 3, H, W) image batch by `scale` (identity at 1)."""
    if scale == 1.0:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
