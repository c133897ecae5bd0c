"""Mergeable per-class feature moments and the per-class 2-D PCA of the final decision (ct.md §1.6).

The engine never ships full feature matrices to the driver: every worker folds its feature blocks into a
:class:`FeatureMoments` (count, sum, sum of outer products per class), the moments are merged, the
principal axes are computed once, and workers project their own blocks with :func:`project`. Only the
(N, 2) projections travel on.

Memory: ``outer`` holds ``C * D * D`` float64 (CIFAR-10 ResNet-18: 10 x 512 x 512 = 21 MB; GTSRB
43 classes: 90 MB; ImageNet narrow net 1000 x 64 x 64: 33 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ctray.core.checks import check_matrix
from ctray.core.distill import check_labels
from ctray.errors import ConfigError, DataError

__all__ = ["FeatureMoments", "project"]

# Below this many rows per distinct label, per-sample outer products (chunked) beat one GEMM per class.
_ROWS_PER_GROUP_FOR_GEMM = 8
# Float64 budget of one chunk of per-sample outer products (elements, ~64 MB).
_OUTER_CHUNK_ELEMS = 8 * 2**20


@dataclass
class FeatureMoments:
    """Per-class raw moments of penultimate features, mergeable across shards and workers.

    Attributes:
        count: int64 (C,) samples seen per class.
        sum: float64 (C, D) per-class sum of feature vectors.
        outer: float64 (C, D, D) per-class sum of ``x x^T``.

    ``update`` folds a batch in place; ``merge`` returns a new object (both inputs untouched). Raw
    float64 moments lose some precision when a class's mean is much larger than its spread
    (``E[xx^T] - mu mu^T`` cancels); for penultimate ReLU features of O(1) scale this is far below
    anything that moves the top-2 axes.
    """

    count: np.ndarray
    sum: np.ndarray
    outer: np.ndarray

    def __post_init__(self) -> None:
        self.count = np.asarray(self.count, dtype=np.int64)
        self.sum = np.asarray(self.sum, dtype=np.float64)
        self.outer = np.asarray(self.outer, dtype=np.float64)
        if self.count.ndim != 1 or self.sum.ndim != 2 or self.outer.ndim != 3:
            raise DataError(
                f"FeatureMoments needs count (C,), sum (C, D), outer (C, D, D); got {self.count.shape}, "
                f"{self.sum.shape}, {self.outer.shape}")
        c, d = self.sum.shape
        if self.count.shape != (c,) or self.outer.shape != (c, d, d):
            raise DataError(
                f"FeatureMoments shapes disagree: count {self.count.shape}, sum {self.sum.shape}, "
                f"outer {self.outer.shape}")

    @classmethod
    def zeros(cls, num_classes: int, dim: int) -> FeatureMoments:
        """Empty moments for ``num_classes`` classes of ``dim``-dimensional features."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
            raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise ConfigError(f"dim must be an integer >= 1, got {dim!r}")
        return cls(np.zeros(num_classes, np.int64), np.zeros((num_classes, dim)), np.zeros((num_classes, dim, dim)))

    @property
    def num_classes(self) -> int:
        """C."""
        return int(self.sum.shape[0])

    @property
    def dim(self) -> int:
        """D."""
        return int(self.sum.shape[1])

    def update(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Fold a batch into the moments, in place.

        Args:
            features: float (B, D) finite feature vectors (any float/int dtype; accumulated in float64).
            labels: int (B,) class of each row (the given label), values in ``[0, C)``.

        Raises:
            DataError: shapes disagree with each other or with D, labels out of range, non-finite features.
        """
        x = check_matrix(features, "features")
        lab = check_labels(labels, self.num_classes)
        if x.shape[0] != lab.shape[0]:
            raise DataError(f"features and labels must have the same length, got {x.shape[0]} and {lab.shape[0]}")
        if x.shape[1] != self.dim:
            raise DataError(f"features must have D = {self.dim} columns, got {x.shape[1]}")
        b = lab.size
        if b == 0:
            return
        order = np.argsort(lab, kind="stable")
        xs, ls = x[order], lab[order]
        uniq, starts = np.unique(ls, return_index=True)
        ends = np.append(starts[1:], b)
        self.count[uniq] += ends - starts
        self.sum[uniq] += np.add.reduceat(xs, starts, axis=0)
        if uniq.size * _ROWS_PER_GROUP_FOR_GEMM <= b:
            # Few large groups: one GEMM per class present.
            for c, s, e in zip(uniq, starts, ends, strict=True):
                self.outer[c] += xs[s:e].T @ xs[s:e]
        else:
            # Many tiny groups (e.g. 1000 classes, batch 1024): per-sample outer products in chunks,
            # summed per class with reduceat (rows are sorted by label).
            d = self.dim
            chunk = max(1, _OUTER_CHUNK_ELEMS // (d * d))
            for a in range(0, b, chunk):
                xc, lc = xs[a:a + chunk], ls[a:a + chunk]
                u, st = np.unique(lc, return_index=True)
                self.outer[u] += np.add.reduceat(np.einsum("bi,bj->bij", xc, xc), st, axis=0)

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        """Sum of two moment sets (same C and D); returns a new object, inputs untouched.

        Raises:
            DataError: ``other`` has a different C or D.
        """
        if not isinstance(other, FeatureMoments):
            raise DataError(f"other must be FeatureMoments, got {type(other).__name__}")
        if other.sum.shape != self.sum.shape:
            raise DataError(f"cannot merge moments of shape (C, D) = {self.sum.shape} and {other.sum.shape}")
        return FeatureMoments(self.count + other.count, self.sum + other.sum, self.outer + other.outer)

    def means(self) -> np.ndarray:
        """float64 (C, D) per-class mean; zeros for classes without samples."""
        n = np.maximum(self.count, 1).astype(np.float64)
        return np.where(self.count[:, None] > 0, self.sum / n[:, None], 0.0)

    def covariances(self) -> np.ndarray:
        """float64 (C, D, D) centred (population, divide-by-n) covariance ``E[xx^T] - mu mu^T``.

        Zeros for classes with fewer than 2 samples. Symmetrised to cancel rounding.
        """
        mu = self.means()
        n = np.maximum(self.count, 1).astype(np.float64)
        cov = self.outer / n[:, None, None] - mu[:, :, None] * mu[:, None, :]
        cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
        cov[self.count < 2] = 0.0
        return cov

    def principal_axes(self, k: int = 2) -> np.ndarray:
        """Top-``k`` principal directions of every class's centred features.

        Exact eigendecomposition of the centred covariance. The reference (``torch.pca_lowrank`` with
        centering, q=2) is a randomized approximation of the same top-2 subspace; exact eigenvectors are
        what it converges to, and the LRT downstream depends only on the plane, not on rotations within it.
        Sign convention (for reproducibility): each axis is flipped so that its largest-magnitude
        component (the first one on ties) is positive.

        Args:
            k: number of axes, ``1 <= k <= D``.

        Returns:
            float64 (C, D, k); column j of ``axes[c]`` is the unit eigenvector of the (j+1)-th largest
            eigenvalue of class c. All zeros for classes with fewer than 2 samples.

        Raises:
            ConfigError: ``k`` outside ``[1, D]``.
        """
        d = self.dim
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= d:
            raise ConfigError(f"k must be an integer in [1, {d}] (the feature dimension), got {k!r}")
        covs = self.covariances()
        axes = np.zeros((self.num_classes, d, k))
        for c in np.flatnonzero(self.count >= 2):
            _, vecs = scipy.linalg.eigh(covs[c], subset_by_index=[d - k, d - 1])  # ascending eigenvalues
            vecs = vecs[:, ::-1]
            pivot = np.argmax(np.abs(vecs), axis=0)
            signs = np.sign(vecs[pivot, np.arange(k)])
            signs[signs == 0] = 1.0
            axes[c] = vecs * signs
        return axes


def project(features: np.ndarray, labels: np.ndarray, axes: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Centred projection of each sample onto its OWN class's principal axes.

    ``proj[i] = (features[i] - means[labels[i]]) @ axes[labels[i]]``. (The reference projects
    uncentred features; that only shifts a whole class by a constant, which the Gaussian likelihood
    ratio of :func:`ctray.core.decide.likelihood_ratios` does not see.)

    Args:
        features: float (B, D) finite features.
        labels: int (B,) given labels, values in ``[0, C)``.
        axes: float (C, D, k) from :meth:`FeatureMoments.principal_axes`.
        means: float (C, D) from :meth:`FeatureMoments.means`.

    Returns:
        float64 (B, k).

    Raises:
        DataError: shapes disagree, labels out of range, non-finite features.
    """
    x = check_matrix(features, "features")
    ax = np.asarray(axes, dtype=np.float64)
    mu = np.asarray(means, dtype=np.float64)
    if ax.ndim != 3:
        raise DataError(f"axes must be 3-D (C, D, k), got shape {ax.shape}")
    c, d, _ = ax.shape
    if mu.shape != (c, d):
        raise DataError(f"means must have shape (C, D) = {(c, d)} to match axes, got {mu.shape}")
    lab = check_labels(labels, c)
    if x.shape[0] != lab.shape[0]:
        raise DataError(f"features and labels must have the same length, got {x.shape[0]} and {lab.shape[0]}")
    if x.shape[1] != d:
        raise DataError(f"features must have D = {d} columns to match axes, got {x.shape[1]}")
    k = ax.shape[2]
    # One GEMM against every class's axes, then keep the own-class columns:
    # (x - mu_c) @ A_c = x @ A_c - mu_c @ A_c. Chunked so the (chunk, C * k) product stays ~64 MB.
    flat = np.ascontiguousarray(ax.transpose(1, 0, 2).reshape(d, c * k))  # (D, C*k)
    offset = np.einsum("cd,cdk->ck", mu, ax)  # (C, k)
    cols = lab.astype(np.int64)[:, None] * k + np.arange(k)[None, :]  # (B, k) own-class columns
    out = np.empty((x.shape[0], k))
    chunk = max(1, _OUTER_CHUNK_ELEMS // (c * k))
    for a in range(0, x.shape[0], chunk):
        full = x[a:a + chunk] @ flat
        out[a:a + chunk] = np.take_along_axis(full, cols[a:a + chunk], axis=1) - offset[lab[a:a + chunk]]
    return out
