"""Validation and normalisation of descriptor arrays shared by the numpy modules."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """L2-normalise rows: (N, D) -> (N, D), same dtype."""
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)


def as_descriptors(X: np.ndarray, name: str, dim: int | None = None, min_rows: int = 1) -> np.ndarray:
    """Validate a (N, D) real matrix; return it float32 C-contiguous (copy only if needed).

    Args:
        X: the array.
        name: the argument name used in error messages.
        dim: the required D, if any.
        min_rows: the smallest allowed N.
    """
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] < min_rows or X.shape[1] == 0:
        raise ValueError(f"{name}: expected a (N, D) array with N >= {min_rows}, got shape {X.shape}")
    if dim is not None and X.shape[1] != dim:
        raise ValueError(f"{name}: expected dimension {dim}, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        raise ValueError(f"{name}: expected floating point values, got dtype {X.dtype}")
    return np.ascontiguousarray(X, dtype=np.float32)


def check_int(value: int, name: str, low: int, high: int | None = None) -> int:
    """An int in [low, high] (high optional), else ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name}: must be {bound}, got {value}")
    return int(value)
