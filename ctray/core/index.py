"""The driver's sample order and per-sample columns filled by sample id (pure NumPy).

A detection run keeps, per sample, a few numbers on the driver in one fixed order (the identity pass's
ids, sorted, then any canaries). Scoring passes return rows in whatever order Ray Data's tasks finish;
:class:`SampleIndex` maps their sample ids to positions in the driver's order, and
:class:`ColumnFiller` writes each streamed batch straight into preallocated arrays at those positions, so
a pass costs the output arrays and nothing else in proportion to N (no list of batches, no concatenation,
no second aligned copy). It also proves the pass saw every sample exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest signed integer dtype for class ids in ``[-1, num_classes)``: int16 below 32,768
    classes (ImageNet-21k's 21,841 included), else int32. Labels are the driver's largest column after
    the ids, so this is 6 of its bytes per sample."""
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


class SampleIndex:
    """Positions of sample ids in the driver's order.

    Args:
        sids: int64 (N,) unique sample ids in the driver's order. When they are already ascending (a run
            without canaries), no permutation is stored (the index costs nothing beyond ``sids``);
            otherwise a sorted copy and the permutation (16 bytes per sample).
    """

    def __init__(self, sids: np.ndarray):
        self.sids = np.asarray(sids, dtype=np.int64)
        self.n = len(self.sids)
        if self.n < 2 or bool(np.all(self.sids[1:] > self.sids[:-1])):
            self.order: np.ndarray | None = None
            self.sorted = self.sids
        else:
            self.order = np.argsort(self.sids, kind="stable")
            self.sorted = self.sids[self.order]

    def positions(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pos, hit)`` for ids ``s`` (int64 (B,)): ``hit[i]`` is whether ``s[i]`` is a known id, and
        ``pos[hit]`` are their positions in the driver's order (``pos`` is meaningless where not hit)."""
        s = np.asarray(s, dtype=np.int64)
        if not self.n:
            return np.zeros(len(s), np.int64), np.zeros(len(s), bool)
        i = np.minimum(np.searchsorted(self.sorted, s), self.n - 1)
        hit = self.sorted[i] == s
        return (self.order[i] if self.order is not None else i), hit

    def positions_of_known(self, s: np.ndarray) -> np.ndarray:
        """Positions of ids that must all be known (e.g. a kept set chosen from ``sids``).

        Raises:
            KeyError: some id is not in the index.
        """
        pos, hit = self.positions(s)
        if not bool(np.all(hit)):
            raise KeyError(f"{int((~hit).sum())} of {len(hit)} sample ids are not in the index")
        return pos


class ColumnFiller:
    """Per-sample columns of one pass, filled batch by batch at their ids' positions.

    Args:
        index: the driver's order.
        dtypes: column name -> NumPy dtype of its output array (N,).
    """

    def __init__(self, index: SampleIndex, dtypes: Mapping[str, np.dtype | type]):
        self.index = index
        self.out = {c: np.empty(index.n, dtype=dt) for c, dt in dtypes.items()}
        self.seen = np.zeros(index.n, np.uint8)  # saturates at 255: only 0, 1 and "more" matter
        self.rows = 0
        self.unknown = 0

    def add(self, sid: np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
        """One batch: ``sid`` int64 (B,) and every column of ``dtypes`` as (B,) arrays."""
        pos, hit = self.index.positions(sid)
        self.rows += len(pos)
        self.unknown += int((~hit).sum())
        p = pos[hit]
        np.add.at(self.seen, p, 1)
        np.minimum(self.seen, 2, out=self.seen)
        for c, arr in self.out.items():
            arr[p] = np.asarray(columns[c])[hit]

    def finish(self, what: str) -> dict[str, np.ndarray]:
        """The filled columns, after checking every sample came exactly once (a Ray Data task retried
        after a failure must neither drop nor repeat rows).

        Raises:
            RuntimeError: naming ``what`` and how many ids are missing, repeated or unknown.
        """
        missing = int((self.seen == 0).sum())
        repeated = int((self.seen > 1).sum())
        if missing or repeated or self.unknown:
            raise RuntimeError(f"{what}: got {self.rows} rows for {self.index.n} usable samples ({missing} missing, "
                               f"{repeated} repeated, {self.unknown} unknown sample ids); refusing to write scores")
        self.seen = np.zeros(0, np.uint8)
        return self.out
