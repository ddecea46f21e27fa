"""Siamese and triplet losses over descriptor distances (cirtorch forms), as pure functions.

Each loss takes distances (or descriptors) and a reduction; nothing here knows about tuples
of images. `tuple_loss` applies one of them to a tuple laid out as cirtorch lays it out:
query, positive, negatives.

- Contrastive (Hadsell et al. 2006; cirtorch `contrastive_loss`): for a pair at distance d,
  ``0.5 d^2`` when it matches (label 1) and ``0.5 max(margin - d, 0)^2`` when it does not
  (label 0). d is the Euclidean distance of L2-normalised descriptors, in [0, 2].
- Triplet (cirtorch `triplet_loss`): ``max(d(a, p)^2 - d(a, n)^2 + margin, 0)`` with squared
  Euclidean distances (in [0, 4]), or with plain distances when ``squared=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

REDUCTIONS = ("sum", "mean", "none")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def pair_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Euclidean distance of matching rows: (N, D), (N, D) -> (N,).

    `eps` inside the square root keeps the gradient finite for identical rows (as
    `torch.nn.functional.pairwise_distance` does with its own eps).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"descriptors: expected two (N, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return ((a - b).pow(2).sum(dim=1) + eps).sqrt()


def contrastive_loss(
    distance: torch.Tensor, label: torch.Tensor, margin: float = 0.7, reduction: str = "sum"
) -> torch.Tensor:
    """Contrastive loss of pairs at the given distances.

    Args:
        distance: (N,) Euclidean distances of the pairs.
        label: (N,) 1 for matching pairs, 0 for non-matching ones.
        margin: non-matching pairs closer than this are pushed apart.
        reduction: 'sum' (cirtorch), 'mean' or 'none'.

    Returns:
        The reduced loss, or (N,) per-pair losses for 'none'.
    """
    if distance.shape != label.shape or distance.dim() != 1:
        raise ValueError(f"distance/label: expected two (N,) tensors, got {tuple(distance.shape)} and {tuple(label.shape)}")
    if margin <= 0:
        raise ValueError(f"margin: must be > 0, got {margin}")
    y = label.to(distance.dtype)
    per_pair = 0.5 * y * distance.pow(2) + 0.5 * (1 - y) * torch.clamp(margin - distance, min=0).pow(2)
    return _reduce(per_pair, reduction)


def triplet_loss(
    d_pos: torch.Tensor,
    d_neg: torch.Tensor,
    margin: float = 0.1,
    reduction: str = "sum",
    squared: bool = True,
) -> torch.Tensor:
    """Triplet loss from anchor-positive and anchor-negative distances.

    Args:
        d_pos: (N,) Euclidean distances anchor-positive.
        d_neg: (N,) Euclidean distances anchor-negative.
        margin: required gap; on squared distances by default (cirtorch).
        reduction: 'sum' (cirtorch), 'mean' or 'none'.
        squared: compare squared distances (cirtorch) instead of distances.

    Returns:
        The reduced loss, or (N,) per-triplet losses for 'none'.
    """
    if d_pos.shape != d_neg.shape or d_pos.dim() != 1:
        raise ValueError(f"d_pos/d_neg: expected two (N,) tensors, got {tuple(d_pos.shape)} and {tuple(d_neg.shape)}")
    if margin <= 0:
        raise ValueError(f"margin: must be > 0, got {margin}")
    if squared:
        d_pos, d_neg = d_pos.pow(2), d_neg.pow(2)
    return _reduce(torch.clamp(d_pos - d_neg + margin, min=0), reduction)


def contrastive_on_tuple(d: torch.Tensor, margin: float, reduction: str) -> torch.Tensor:
    """Contrastive loss of a tuple's distances d = (d(q, p), d(q, n_1), ...): (q, p) matches."""
    label = torch.zeros_like(d)
    label[0] = 1
    return contrastive_loss(d, label, margin, reduction)


def triplet_on_tuple(d: torch.Tensor, margin: float, reduction: str) -> torch.Tensor:
    """Triplet loss of a tuple's distances d = (d(q, p), d(q, n_1), ...): the triplets (q, p, n_i)."""
    return triplet_loss(d[:1].expand(d.shape[0] - 1), d[1:], margin, reduction)


@dataclass(frozen=True)
class TupleLoss:
    """A loss over one tuple's distances, and its default margin."""

    fn: Callable[[torch.Tensor, float, str], torch.Tensor]
    default_margin: float


# the registry: a new loss is one function above and one line here
TUPLE_LOSSES: dict[str, TupleLoss] = {
    "contrastive": TupleLoss(contrastive_on_tuple, 0.7),
    "triplet": TupleLoss(triplet_on_tuple, 0.1),
}
LOSSES = tuple(TUPLE_LOSSES)
DEFAULT_MARGINS = {name: loss.default_margin for name, loss in TUPLE_LOSSES.items()}


def tuple_loss(
    loss: str, descriptors: torch.Tensor, margin: float, reduction: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loss over one training tuple: query, positive, then k >= 1 negatives.

    Contrastive: the pairs (q, p) with label 1 and (q, n_i) with label 0. Triplet: the triplets
    (q, p, n_i).

    Args:
        loss: a name of `TUPLE_LOSSES` ('contrastive', 'triplet').
        descriptors: (2 + k, D) L2-normalised descriptors in tuple order.
        margin: the loss margin.
        reduction: over the pairs / triplets of the tuple.

    Returns:
        (loss, positive distance (1,), negative distances (k,)); the distances are detached.
    """
    if loss not in TUPLE_LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if descriptors.dim() != 2 or descriptors.shape[0] < 3:
        raise ValueError(f"descriptors: expected (2 + k, D) with k >= 1, got {tuple(descriptors.shape)}")
    q = descriptors[:1]
    others = descriptors[1:]  # (1 + k, D)
    d = pair_distance(q.expand_as(others), others)  # (1 + k,)
    value = TUPLE_LOSSES[loss].fn(d, margin, reduction)
    return value, d[:1].detach(), d[1:].detach()
