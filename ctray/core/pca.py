"""Mergeable per-class feature moments and the per-class 2-D PCA of the final decision (ct.md §1.6).

The engine never ships full feature matrices to the driver: feature blocks are folded into moments
(count, sum, sum of outer products per class), the moments are merged, the principal axes are computed
once per class, and workers project their own blocks with :func:`project`. Only the (N, 2) projections
travel on.

Two containers:

- :class:`FeatureMoments`: dense, all C classes at once (``outer`` is ``C * D * D`` float64: CIFAR-10
  ResNet-18 10 x 512 x 512 = 21 MB). For few groups: the cross-class detector's four, the baselines.
- :class:`ClassMoments` per class, built by :func:`fold_by_class` for the classes PRESENT in a block and
  kept as the rows themselves until a class has more than D of them: a block's partial never exceeds
  its own features, and whoever merges holds D x D only for the classes it owns. The final decision
  merges these in class-partitioned reducers (``ctray.engine.classpca``): ImageNet-21k at D = 512
  would be 44 GB as one dense ``FeatureMoments``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ctray.core.checks import check_matrix
from ctray.core.distill import check_labels
from ctray.errors import ConfigError, DataError

__all__ = ["ClassMoments", "FeatureMoments", "fold_by_class", "merge_by_class", "project"]

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
        _check_k(k, d)
        covs = self.covariances()
        axes = np.zeros((self.num_classes, d, k))
        for c in np.flatnonzero(self.count >= 2):
            axes[c] = _top_axes(covs[c], k)
        return axes


def _check_k(k: int, d: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= d:
        raise ConfigError(f"k must be an integer in [1, {d}] (the feature dimension), got {k!r}")


def _top_axes(cov: np.ndarray, k: int) -> np.ndarray:
    """float64 (D, k): the unit eigenvectors of the k largest eigenvalues of a symmetric (D, D) ``cov``,
    largest first, each flipped so its largest-magnitude component (the first on ties) is positive."""
    d = cov.shape[0]
    _, vecs = scipy.linalg.eigh(cov, subset_by_index=[d - k, d - 1])  # ascending eigenvalues
    vecs = vecs[:, ::-1]
    pivot = np.argmax(np.abs(vecs), axis=0)
    signs = np.sign(vecs[pivot, np.arange(k)])
    signs[signs == 0] = 1.0
    return vecs * signs


@dataclass
class ClassMoments:
    """One class's raw feature moments, mergeable and exact, in a form bounded by D.

    The sum of outer products is kept in two parts: ``outer`` (float64 (D, D), or None until needed) and
    up to D pending ``rows`` (float64 (m, D), m <= D) whose products are not formed yet; when a merge
    would leave more than D pending rows they are folded into ``outer`` with one GEMM. So a class seen
    a few times per block stays its rows (a block's partial never costs more than the block's own
    features in float64), a class costs at most ``2 * D * D`` floats however many rows it has, and a
    reducer merging many small partials into a large class touches its D x D sum once per D rows, not
    once per block. With many classes (ImageNet: 1,000, a few rows each per block) nothing of size
    ``C * D * D`` exists per block, and a reducer holds D x D only for the classes it owns.

    Attributes:
        count: rows folded in (>= 0).
        sum: float64 (D,) sum of the rows.
        rows: float64 (m, D), ``m <= D``: rows whose outer products are not in ``outer`` yet.
        outer: float64 (D, D) sum of ``x x^T`` over the other ``count - m`` rows, or None when there
            are none.
    """

    count: int
    sum: np.ndarray
    rows: np.ndarray
    outer: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.count = int(self.count)
        self.sum = np.asarray(self.sum, dtype=np.float64)
        if self.sum.ndim != 1:
            raise DataError(f"ClassMoments.sum must be 1-D (D,), got shape {self.sum.shape}")
        d = self.sum.shape[0]
        self.rows = np.asarray(self.rows, dtype=np.float64)
        if self.rows.ndim != 2 or self.rows.shape[1] != d or self.rows.shape[0] > d:
            raise DataError(f"ClassMoments.rows must be (m, D) with m <= D = {d}, got {self.rows.shape}")
        if self.outer is not None:
            self.outer = np.asarray(self.outer, dtype=np.float64)
            if self.outer.shape != (d, d):
                raise DataError(f"ClassMoments.outer must be (D, D) = {(d, d)}, got {self.outer.shape}")
        elif self.rows.shape[0] != self.count:
            raise DataError(f"ClassMoments without outer must hold all its rows: count {self.count}, "
                            f"rows {self.rows.shape[0]}")

    @classmethod
    def of_rows(cls, x: np.ndarray) -> ClassMoments:
        """The moments of the rows of float (n, D) ``x`` (n >= 0): the rows themselves while n <= D,
        else their D x D outer-product sum."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise DataError(f"ClassMoments.of_rows needs (n, D) rows, got shape {x.shape}")
        if x.shape[0] <= x.shape[1]:
            return cls(x.shape[0], x.sum(axis=0), rows=x.copy())
        return cls(x.shape[0], x.sum(axis=0), rows=np.zeros((0, x.shape[1])), outer=x.T @ x)

    @property
    def dim(self) -> int:
        """D."""
        return int(self.sum.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held: ``8 * D * (1 + m)`` plus ``8 * D * D`` once ``outer`` exists."""
        return int(self.sum.nbytes + self.rows.nbytes + (self.outer.nbytes if self.outer is not None else 0))

    def outer_sum(self) -> np.ndarray:
        """float64 (D, D): the sum of ``x x^T`` over every row folded in."""
        pending = self.rows.T @ self.rows
        return pending if self.outer is None else self.outer + pending

    def merge(self, other: ClassMoments) -> ClassMoments:
        """The moments of both row sets (same D); a new object, inputs untouched (an ``outer`` may be
        shared with an input, never written).

        Raises:
            DataError: ``other`` is not ClassMoments or has another D.
        """
        if not isinstance(other, ClassMoments):
            raise DataError(f"other must be ClassMoments, got {type(other).__name__}")
        if other.dim != self.dim:
            raise DataError(f"cannot merge class moments of D = {self.dim} and D = {other.dim}")
        outers = [o for o in (self.outer, other.outer) if o is not None]
        outer = None if not outers else outers[0] if len(outers) == 1 else outers[0] + outers[1]
        rows = np.concatenate([self.rows, other.rows]) if len(other.rows) else self.rows
        if rows.shape[0] > self.dim:  # fold the pending rows in: one GEMM per D rows
            folded = rows.T @ rows
            outer = folded if outer is None else outer + folded
            rows = rows[:0]
        return ClassMoments(self.count + other.count, self.sum + other.sum, rows=rows, outer=outer)

    def mean(self) -> np.ndarray:
        """float64 (D,); zeros when no rows were folded in."""
        return self.sum / self.count if self.count else np.zeros(self.dim)

    def axes(self, k: int = 2) -> np.ndarray:
        """float64 (D, k): the top-``k`` principal directions of the centred rows, as
        :meth:`FeatureMoments.principal_axes` computes them for one class (same sign convention);
        zeros with fewer than 2 rows.

        Raises:
            ConfigError: ``k`` outside ``[1, D]``.
        """
        d = self.dim
        _check_k(k, d)
        if self.count < 2:
            return np.zeros((d, k))
        mu = self.mean()
        cov = self.outer_sum() / self.count - np.outer(mu, mu)
        return _top_axes(0.5 * (cov + cov.T), k)


def fold_by_class(features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[int, ClassMoments]:
    """A block's features folded per class present: ``{class: ClassMoments}``, only the classes whose
    label occurs in ``labels``. Memory: at most the block's features in float64 (each class in the
    smaller of its rows and a D x D sum), never anything of size ``num_classes``.

    Args:
        features: float (B, D) finite.
        labels: int (B,) in ``[0, num_classes)``.

    Raises:
        DataError: shapes disagree, labels out of range, non-finite features.
    """
    x = check_matrix(features, "features")
    lab = check_labels(labels, num_classes)
    if x.shape[0] != lab.shape[0]:
        raise DataError(f"features and labels must have the same length, got {x.shape[0]} and {lab.shape[0]}")
    if not lab.size:
        return {}
    order = np.argsort(lab, kind="stable")
    xs, ls = x[order], lab[order]
    uniq, starts = np.unique(ls, return_index=True)
    ends = np.append(starts[1:], ls.size)
    return {int(c): ClassMoments.of_rows(xs[s:e]) for c, s, e in zip(uniq, starts, ends, strict=True)}


def merge_by_class(into: dict[int, ClassMoments], parts: dict[int, ClassMoments]) -> None:
    """Fold ``parts`` into ``into`` class by class, in place (``into`` gains the classes it lacked).

    Raises:
        DataError: a class's D differs between the two.
    """
    for c, m in parts.items():
        have = into.get(c)
        into[c] = m if have is None else have.merge(m)


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
