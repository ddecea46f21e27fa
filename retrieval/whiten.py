"""Linear whitening of global descriptors: PCA whitening and learned (Lw) whitening.

Both are affine maps ``x -> P (x - m)`` followed by L2 normalisation, stored as a `Whitening`
(mean (D,), proj (d, D)). Rows of ``proj`` are sorted by decreasing importance, so keeping the
first ``d`` rows reduces the dimension (`Whitening.truncate`).

- `learn_pca_whitening`: no labels. Eigen-decomposition of the covariance, eigenvalues raised to
  ``-shrinkage / 2`` (0: plain PCA rotation, 1: full whitening, in between: "shrunk" whitening).
- `learn_lw_whitening`: supervised "learned whitening" of Radenović et al. (TPAMI 2019, cirtorch
  ``whitenlearn``): whiten by the intra-class covariance of matching-pair differences, then
  rotate by the PCA of the whitened (inter-class) data.

Computations are done in float64; the stored parameters and outputs are float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from raytrieval.retrieval.arrays import l2_normalize

# Eigenvalues below this fraction of the largest one count as zero when computing the rank.
_RANK_RTOL = 1e-10


def _check_descriptors(X: np.ndarray, name: str) -> np.ndarray:
    """Validate a (N, D) finite real matrix and return it as float64."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a (N, D) array, got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name}: empty array of shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        raise ValueError(f"{name}: expected floating point values, got dtype {X.dtype}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return X.astype(np.float64, copy=False)


def _sorted_eigh(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues decreasing, signs fixed.

    The sign of every eigenvector is chosen so that its largest-magnitude entry is positive,
    which makes the result deterministic.

    Returns:
        (eigval (D,), eigvec (D, D)) with eigvec[:, i] the i-th eigenvector.
    """
    eigval, eigvec = np.linalg.eigh((C + C.T) / 2.0)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    pivot = np.argmax(np.abs(eigvec), axis=0)
    signs = np.sign(eigvec[pivot, np.arange(eigvec.shape[1])])
    signs[signs == 0] = 1.0
    return eigval, eigvec * signs


def _rank(eigval: np.ndarray) -> int:
    """Numerical rank from decreasing non-negative eigenvalues."""
    top = float(eigval[0]) if eigval.size else 0.0
    if top <= 0.0:
        return 0
    return int(np.sum(eigval > top * _RANK_RTOL))


def _check_dim(dim: int | None, rank: int, full: int) -> int:
    """Resolve the output dimension: None -> rank (== full for full-rank data)."""
    if dim is None:
        if rank < full:
            raise ValueError(
                f"dim: the training data has rank {rank} < D={full}; pass dim <= {rank} "
                "(more training vectors are needed for a full-dimensional whitening)"
            )
        return full
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise ValueError(f"dim: expected an int, got {dim!r}")
    if not 1 <= dim <= full:
        raise ValueError(f"dim: must be in 1..{full}, got {dim}")
    if dim > rank:
        raise ValueError(f"dim: {dim} exceeds the rank {rank} of the training data")
    return int(dim)


@dataclass
class Whitening:
    """An affine whitening ``x -> l2n(proj @ (x - mean))``.

    Args:
        mean: (D,) float32 mean subtracted before projecting.
        proj: (d, D) float32 projection, rows by decreasing importance.
    """

    mean: np.ndarray
    proj: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float32)
        proj = np.asarray(self.proj, dtype=np.float32)
        if mean.ndim != 1:
            raise ValueError(f"mean: expected shape (D,), got {mean.shape}")
        if proj.ndim != 2 or proj.shape[1] != mean.shape[0] or proj.shape[0] < 1:
            raise ValueError(f"proj: expected shape (d, {mean.shape[0]}) with d >= 1, got {proj.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(proj))):
            raise ValueError("mean/proj: contain NaN or infinite values")
        self.mean = np.ascontiguousarray(mean)
        self.proj = np.ascontiguousarray(proj)

    @property
    def input_dim(self) -> int:
        """D, the dimension of the input descriptors."""
        return int(self.proj.shape[1])

    @property
    def dim(self) -> int:
        """d, the dimension of the whitened descriptors."""
        return int(self.proj.shape[0])

    def apply(self, X: np.ndarray) -> np.ndarray:
        """Whiten and L2-normalise descriptors.

        Args:
            X: (N, D) descriptors.

        Returns:
            (N, d) float32 C-contiguous, L2-normalised.
        """
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.input_dim:
            raise ValueError(f"X: expected shape (N, {self.input_dim}), got {X.shape}")
        Y = (X.astype(np.float32, copy=False) - self.mean) @ self.proj.T  # (N, d)
        return np.ascontiguousarray(l2_normalize(Y), dtype=np.float32)

    def truncate(self, dim: int) -> Whitening:
        """The same whitening keeping only the first ``dim`` output dimensions.

        Args:
            dim: output dimension in 1..d.
        """
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= self.dim:
            raise ValueError(f"dim: must be an int in 1..{self.dim}, got {dim!r}")
        return Whitening(mean=self.mean.copy(), proj=self.proj[:dim].copy())

    def linear_params(self) -> tuple[np.ndarray, np.ndarray]:
        """Weight and bias of the equivalent linear layer ``y = W x + b`` (before L2).

        Returns:
            (weight (d, D) float32, bias (d,) float32), e.g. for ``nn.Linear`` initialisation.
        """
        weight = self.proj.copy()
        bias = -(self.proj.astype(np.float64) @ self.mean.astype(np.float64)).astype(np.float32)
        return weight, bias

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe representation (nested lists of floats); inverse of `from_dict`."""
        return {"mean": self.mean.tolist(), "proj": self.proj.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Whitening:
        """Rebuild from `to_dict` output (or a dict of arrays, e.g. from an npz file).

        Args:
            d: mapping with keys ``mean`` (D,) and ``proj`` (d, D).
        """
        if not hasattr(d, "keys"):
            raise ValueError(f"whitening: expected a mapping, got {type(d).__name__}")
        missing = [key for key in ("mean", "proj") if key not in d]
        if missing:
            raise ValueError(f"whitening: missing key(s) {missing}")
        return cls(mean=np.asarray(d["mean"], dtype=np.float32), proj=np.asarray(d["proj"], dtype=np.float32))


def learn_pca_whitening(
    X: np.ndarray,
    dim: int | None = None,
    shrinkage: float = 1.0,
    eps: float = 1e-9,
) -> Whitening:
    """Learn PCA whitening without labels.

    ``proj = diag((lambda + eps)^(-shrinkage/2)) U^T`` where (lambda, U) are the eigenpairs of the
    covariance of X, by decreasing eigenvalue. With ``shrinkage=1`` and ``dim=D`` the training
    covariance becomes the identity (before the final L2 normalisation of `Whitening.apply`).

    Args:
        X: (N, D) training descriptors.
        dim: output dimension in 1..rank(X - mean); None keeps all D (needs full rank).
        shrinkage: power on the eigenvalues in [0, 1]; 0 is a plain PCA rotation, 1 full whitening.
        eps: added to the eigenvalues before the power.

    Returns:
        The learned `Whitening` with proj of shape (dim, D).
    """
    X = _check_descriptors(X, "X")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage: must be in [0, 1], got {shrinkage}")
    if eps < 0.0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    n, D = X.shape
    mean = X.mean(axis=0)  # (D,)
    Xc = X - mean
    cov = Xc.T @ Xc / n  # (D, D)
    eigval, eigvec = _sorted_eigh(cov)
    eigval = np.clip(eigval, 0.0, None)
    d = _check_dim(dim, _rank(eigval), D)
    scale = (eigval[:d] + eps) ** (-shrinkage / 2.0)  # (d,)
    proj = scale[:, None] * eigvec[:, :d].T  # (d, D)
    return Whitening(mean=mean.astype(np.float32), proj=proj.astype(np.float32))


def _regularized_cholesky(S: np.ndarray) -> np.ndarray:
    """Cholesky factor of S, adding a growing multiple of the identity until S is positive definite."""
    scale = float(np.trace(S)) / S.shape[0]
    if scale <= 0.0:
        raise ValueError("pairs: the matching pairs have zero intra-class variance (identical descriptors)")
    reg = 0.0
    while True:
        try:
            return np.linalg.cholesky(S + reg * np.eye(S.shape[0]))
        except np.linalg.LinAlgError:
            reg = scale * 1e-10 if reg == 0.0 else reg * 10.0
            if reg > scale:
                raise ValueError("pairs: intra-class covariance could not be made positive definite") from None


def learn_lw_whitening(X: np.ndarray, pairs: np.ndarray, dim: int | None = None) -> Whitening:
    """Learn supervised whitening from matching pairs (Radenović et al., cirtorch ``whitenlearn``).

    1. ``m`` = mean of the first members of the pairs.
    2. Intra-class covariance ``S_w = mean_k (x_a - x_b)(x_a - x_b)^T`` over pairs (a, b);
       ``P_w = chol(S_w)^-1`` whitens it (a tiny ridge is added if S_w is singular).
    3. PCA of the whitened data ``P_w (x - m)`` over all of X: eigenvectors ``U`` by decreasing
       eigenvalue; ``proj = U^T P_w`` (first ``dim`` rows). Then ``proj S_w proj^T = I``.

    The pair differences should span the space of the descriptors (roughly M >= D pairs over
    many objects); directions without any intra-class sample are only regularised by the ridge
    and dominate the output, as in cirtorch.

    Args:
        X: (N, D) training descriptors.
        pairs: (M, 2) int indices into X of matching (same object) descriptors.
        dim: output dimension in 1..rank(X - m); None keeps all D (needs full rank).

    Returns:
        The learned `Whitening` with proj of shape (dim, D).
    """
    X = _check_descriptors(X, "X")
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise ValueError(f"pairs: expected a non-empty (M, 2) array, got shape {pairs.shape}")
    if not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(f"pairs: expected integer indices, got dtype {pairs.dtype}")
    n, D = X.shape
    if pairs.min() < 0 or pairs.max() >= n:
        raise ValueError(f"pairs: indices must be in 0..{n - 1}")
    qa, qb = pairs[:, 0], pairs[:, 1]
    mean = X[qa].mean(axis=0)  # (D,)
    diff = X[qa] - X[qb]  # (M, D)
    S_w = diff.T @ diff / diff.shape[0]  # (D, D)
    L = _regularized_cholesky(S_w)
    P_w = np.linalg.solve(L, np.eye(D))  # (D, D) = L^-1
    Xc = X - mean  # (N, D)
    # rank in the original space: P_w is invertible, and with a ridge-regularised S_w the
    # whitened spectrum can span many orders of magnitude
    rank = _rank(np.sort(np.clip(np.linalg.eigvalsh(Xc.T @ Xc), 0.0, None))[::-1])
    Xw = Xc @ P_w.T  # (N, D)
    eigval, eigvec = _sorted_eigh(Xw.T @ Xw)
    d = _check_dim(dim, rank, D)
    proj = eigvec[:, :d].T @ P_w  # (d, D)
    return Whitening(mean=mean.astype(np.float32), proj=proj.astype(np.float32))
