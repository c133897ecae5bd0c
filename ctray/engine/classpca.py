"""The final decision's per-class PCA at any class count: class-partitioned moment reducers, fed while
a scoring pass streams (the math: :class:`ctray.core.pca.ClassMoments`).

Flow (one final pass):

1. :func:`start_reducers` starts ``P = ceil(C / CLASSES_PER_REDUCER)`` actors (``num_cpus=0``, spread
   over the nodes); reducer ``j`` owns the classes ``c`` with ``c % P == j``.
2. :func:`feed_reducers` adds a pass-through op to the scored dataset: per block (``batch_size=None``)
   the features are folded per class PRESENT (:func:`~ctray.core.pca.fold_by_class`: a class is its
   rows until it has more than D of them, so a block's partial never exceeds its own features), split by
   owner, and sent in one call per owner present, keyed by the block's content id
   (:func:`~ctray.engine.aggregate.block_id`): a retried task re-sends the same id and the reducer
   ignores it, so nothing is counted twice.
3. :func:`class_axes` asks every reducer for its classes' means and top-k axes and stops the actors.

Memory: a reducer holds at most 2 x D x D float64 for each class it owns (the outer-product sum plus up
to D pending rows: 128 classes at D = 512 = 537 MB; measured in :mod:`ctray.benchmarks.classpca`);
the driver receives ``C x D x (k + 1)`` floats, never ``C x D x D`` (ImageNet-21k at D = 512 would be
44 GB in one dense :class:`~ctray.core.pca.FeatureMoments`, and the per-batch dense blobs this replaces
were ``C x D x D`` each).

Why actors and not Ray Data's ``groupby("label").aggregate(...)`` (a hash-partitioned tree reduction
that would also compute these): the final pass yields the per-sample scalar columns and the moments in
ONE pass over D, and a groupby consumes its input, so it would cost another scoring pass over D. This
is the shard aggregator's pattern (:mod:`ctray.engine.aggregate`), with the same retry rule.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa

from ctray.core.pca import ClassMoments, fold_by_class, merge_by_class
from ctray.engine.aggregate import block_id

log = logging.getLogger(__name__)

__all__ = ["CLASSES_PER_REDUCER", "MomentReducer", "class_axes", "feed_reducers", "start_reducers", "stop_reducers"]

#: Classes one reducer owns (at D = 512 at most 128 x 4 MB: outer-product sums and pending rows).
CLASSES_PER_REDUCER = 128


class MomentReducer:
    """The moments of the classes one reducer owns, run as a Ray actor by :func:`start_reducers`.

    ``add`` is idempotent per block id and costs O(the block's partial for these classes).
    """

    def __init__(self) -> None:
        self._acc: dict[int, ClassMoments] = {}
        self._seen: set[str] = set()
        self._duplicates = 0

    def add(self, block: str, parts: dict[int, ClassMoments]) -> bool:
        """Fold one block's partials in; False (and nothing counted) when ``block`` was seen before."""
        if block in self._seen:
            self._duplicates += 1
            return False
        self._seen.add(block)
        merge_by_class(self._acc, parts)
        return True

    def held_bytes(self) -> int:
        """Bytes of the moments held now (for benchmarks and logs; cheap, unlike :meth:`result`)."""
        return sum(m.nbytes for m in self._acc.values())

    def result(self, k: int) -> dict[str, Any]:
        """``classes`` int64 (K,), ``counts`` int64 (K,), ``means`` float64 (K, D), ``axes`` float64
        (K, D, k) of the K classes seen, plus ``blocks`` / ``duplicates`` / ``bytes`` (held)."""
        cls = np.array(sorted(self._acc), dtype=np.int64)
        ms = [self._acc[int(c)] for c in cls]
        d = ms[0].dim if ms else 0
        return {"classes": cls, "counts": np.array([m.count for m in ms], dtype=np.int64),
                "means": np.array([m.mean() for m in ms]).reshape(len(ms), d),
                "axes": np.array([m.axes(k) for m in ms]).reshape(len(ms), d, k),
                "blocks": len(self._seen), "duplicates": self._duplicates,
                "bytes": sum(m.nbytes for m in ms)}


def start_reducers(num_classes: int, classes_per_reducer: int = CLASSES_PER_REDUCER) -> list[Any]:
    """This pass's reducer actors (``num_cpus=0``: they merge arrays; spread over the nodes so their
    memory is too), ``ceil(num_classes / classes_per_reducer)`` of them. Pass the list explicitly (no
    named actors, so concurrent runs cannot collide)."""
    import ray

    if num_classes < 1 or classes_per_reducer < 1:
        raise ValueError(f"num_classes and classes_per_reducer must be >= 1, got {num_classes}, {classes_per_reducer}")
    n = math.ceil(num_classes / classes_per_reducer)
    actor = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy="SPREAD")(MomentReducer)
    return [actor.remote() for _ in range(n)]


def stop_reducers(reducers: list[Any]) -> None:
    """Kill the reducers (idempotent: an actor already gone is skipped)."""
    import ray

    for r in reducers:
        try:
            ray.kill(r)
        except Exception:  # noqa: BLE001 - already dead or the cluster is shutting down: nothing to free
            log.debug("reducer already stopped", exc_info=True)


def _feed_block(batch: pa.Table, reducers: list[Any], num_classes: int) -> pa.Table:
    import ray

    from ctray.data.reader import images_to_numpy

    if not batch.num_rows:
        return batch
    sid = batch["sid"].to_numpy()
    feats = images_to_numpy(batch["features"])
    parts = fold_by_class(feats, batch["label"].to_numpy(), num_classes)
    p = len(reducers)
    owned: dict[int, dict[int, ClassMoments]] = {}
    for c, m in parts.items():
        owned.setdefault(c % p, {})[c] = m
    bid = block_id(sid)
    # one call per owner present; waiting here (in the Data task, not the driver) ties the sends to the
    # task's success: a task that fails after sending is re-run and re-sends the same id, which is ignored
    ray.get([reducers[j].add.remote(bid, part) for j, part in owned.items()])
    return batch


def feed_reducers(scored: Any, reducers: list[Any], num_classes: int, num_cpus: float) -> Any:
    """``scored`` unchanged, with a pass-through op that folds each block's ``features`` (float (B, D))
    per ``label`` and feeds the partials to their owners. ``batch_size=None`` makes every call see
    exactly one block, so block ids are stable under task retries."""
    return scored.map_batches(_feed_block, fn_kwargs={"reducers": reducers, "num_classes": num_classes},
                              batch_format="pyarrow", batch_size=None, zero_copy_batch=True, num_cpus=num_cpus)


def class_axes(reducers: list[Any], num_classes: int, k: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Collect the per-class results and stop the reducers.

    Returns:
        ``(axes, means, counts)``: float64 (C, D, k) top-k principal directions of each class's centred
        features (zeros for classes with < 2 rows; the convention of
        :meth:`~ctray.core.pca.FeatureMoments.principal_axes`), float64 (C, D) means (zeros for classes
        never seen), int64 (C,) rows per class.

    Raises:
        RuntimeError: no reducer saw any row (an empty scored dataset).
    """
    import ray

    try:
        results = ray.get([r.result.remote(k) for r in reducers])
    finally:
        stop_reducers(reducers)
    dims = {int(res["means"].shape[1]) for res in results if len(res["classes"])}
    if not dims:
        raise RuntimeError("no features to project (empty scored dataset)")
    if len(dims) > 1:
        raise RuntimeError(f"feature dimension differs between reducers: {sorted(dims)}")
    d = dims.pop()
    axes, means, counts = np.zeros((num_classes, d, k)), np.zeros((num_classes, d)), np.zeros(num_classes, np.int64)
    for res in results:
        axes[res["classes"]], means[res["classes"]], counts[res["classes"]] = res["axes"], res["means"], res["counts"]
    log.info("class moments: %d reducer(s), %d classes seen, %.1f MB held at most by one, %d duplicate block(s)",
             len(reducers), int((counts > 0).sum()), max(res["bytes"] for res in results) / 1e6,
             sum(res["duplicates"] for res in results))
    return axes, means, counts
