"""Defender canaries: CT's proactive idea turned on its own tuning.

The engine plants a small set of backdoor samples of its own: copies of a seeded random subset of D's
usable non-target samples, stamped with a defender trigger (:func:`canary_patch`: a small "X" in a black square at
the top edge, centred; no shipped attack uses that place or shape) and relabelled to a defender target
class. CT trains and scores them like any sample. Since the defender knows exactly which samples they
are, the share of canaries CT flags ("canary recall") measures, without any ground truth, how well a
configuration isolates a backdoor; the flag rate outside the canaries measures its cost. ``ctray
sweep`` combines both into its objective (see ``docs/sweep.md`` for the logic and the limits).

Canaries carry the reserved shard prefix :data:`CANARY_PREFIX` and their own sample ids, so no
user-facing output (scores.parquet, shards.parquet, sources.parquet, metrics over real samples, report
thumbnails) ever contains them. They are built with Ray Data ops (a filter + a map, fractional CPUs)
from the already-read dataset, so their images never pass through the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctray.data.attacks import Patch, patch_size
from ctray.data.shards import sample_id
from ctray.errors import ConfigError

log = logging.getLogger(__name__)

#: Shard-id prefix of every canary; user shard ids never start with it (they are relative paths).
CANARY_PREFIX = "__canary__/"
#: Seed salt: the canary choice must not follow the poisoning seed of a simulated attack.
_CANARY_SALT = 0xCA7A


def canary_patch(shape: tuple[int, ...]) -> Patch:
    """The defender trigger: a black square of side ``patch_size + 1`` (5 px at 28-32 px) with an "X"
    (both diagonals) in spring green on RGB, white on grey, centred on the top edge (1 px margin from
    16 px up). The whole square is pasted (full mask), so the trigger keeps its contrast on bright
    objects as on a dark background.

    Measured on Fashion-MNIST 10k, ``small-cnn`` (docs/sweep.md, "Canaries the model learns"): with only
    the X's pixels pasted, no model fitted 20 or 50 canaries (0%); with the square, round 0's base_0
    fits 95-100% of 20 canaries (0.2%) and none of 10.

    Distinct from the shipped triggers of ``ctray.data.attacks`` (corner patches, full-image blends,
    warps): a model that learns it learns a separate backdoor.
    """
    h, w, c = shape[-3:]
    s = patch_size(h, w) + 1
    i, j = np.indices((s, s))
    x = (i == j) | (i + j == s - 1)
    colour = np.array((0, 255, 128) if c == 3 else (255,), dtype=np.float32)
    pattern = np.clip(np.rint(x[:, :, None] * colour), 0, 255).astype(np.uint8)
    top = 1 if min(h, w) >= 16 else 0
    return Patch(pattern, np.ones((s, s), bool), top, (w - s) // 2)


@dataclass(frozen=True)
class CanaryPlan:
    """Which samples are copied into canaries and the canaries' identities.

    Attributes:
        source_sids: int64 (M,) sample ids of the copied real samples (sorted).
        sids: int64 (M,) the canaries' own ids, ``sample_id(CANARY_PREFIX + shard, key)``.
        shards: str (M,) the canaries' shard ids (``CANARY_PREFIX + shard``).
        keys: str (M,) their keys (the copied sample's key).
        target: the canaries' label.
    """

    source_sids: np.ndarray
    sids: np.ndarray
    shards: np.ndarray
    keys: np.ndarray
    target: int

    def __len__(self) -> int:
        return len(self.sids)


def resolve_target(target: int, num_classes: int) -> int:
    """The canary target class: ``target``, or ``num_classes - 1`` for -1.

    Raises:
        ConfigError: the target is outside ``[0, num_classes)``.
    """
    t = num_classes - 1 if target == -1 else int(target)
    if not 0 <= t < num_classes:
        raise ConfigError(f"canary.target={target} is not a class of this run (0..{num_classes - 1}, or -1)")
    return t


def plan_canaries(sids: np.ndarray, labels: np.ndarray, shards: np.ndarray | None, keys: np.ndarray | None,
                  num_classes: int, rate: float, min_count: int, target: int, seed: int,
                  names: Callable[[np.ndarray], dict[int, tuple[str, str]]] | None = None) -> CanaryPlan | None:
    """Choose the samples to copy: ``max(min_count, round(rate * N))`` of the usable samples whose
    label is not the target, uniformly at random with a generator seeded by ``seed``.

    Args:
        sids, labels, shards, keys: (N,) the run's usable samples in the driver's order; ``shards`` and
            ``keys`` may be None when ``names`` is given.
        num_classes: C.
        rate: canary fraction of N; 0 returns None.
        min_count: the floor on the count when ``rate > 0``.
        target: the canary label, or -1 for the last class.
        seed: the run's seed (the same config gives the same canaries).
        names: ``sids -> {sid: (shard, key)}`` for the chosen samples only (the detection driver keeps
            identity strings out of memory); used when ``shards`` is None.

    Raises:
        ConfigError: bad target, or fewer eligible samples than canaries.
    """
    if rate <= 0:
        return None
    t = resolve_target(target, num_classes)
    eligible = np.flatnonzero(np.asarray(labels) != t)
    m = max(int(min_count), int(round(rate * len(sids))))
    if m > len(eligible):
        raise ConfigError(f"canary: {m} canaries wanted but only {len(eligible)} usable samples are not of "
                          f"the canary target class {t}; lower canary.rate / canary.min_count")
    rng = np.random.default_rng([int(seed), _CANARY_SALT])
    pick = np.sort(rng.choice(eligible, size=m, replace=False))
    if shards is None or keys is None:
        if names is None:
            raise ValueError("plan_canaries needs shards and keys, or names")
        got = names(np.asarray(sids, dtype=np.int64)[pick])
        pairs = [got[int(x)] for x in np.asarray(sids, dtype=np.int64)[pick]]
        shards_p = np.array([p[0] for p in pairs], dtype=object)
        keys_p = np.array([p[1] for p in pairs], dtype=object)
    else:
        shards_p, keys_p = np.asarray(shards)[pick], np.asarray(keys)[pick]
    c_shards = np.array([CANARY_PREFIX + str(s) for s in shards_p], dtype=object)
    c_keys = np.asarray(keys_p).astype(str).astype(object)
    c_sids = np.array([sample_id(s, k) for s, k in zip(c_shards, c_keys, strict=True)], dtype=np.int64)
    src = np.asarray(sids, dtype=np.int64)[pick]
    order = np.argsort(src)
    log.info("canaries: %d copies of non-class-%d samples relabelled to %d (rate %.4g)", m, t, t, rate)
    return CanaryPlan(src[order], c_sids[order], c_shards[order].astype(str), c_keys[order].astype(str), t)


def is_canary(shards: np.ndarray) -> np.ndarray:
    """bool (N,): the shard id marks a canary."""
    arr = np.asarray(shards).astype(str)
    return np.char.startswith(arr, CANARY_PREFIX) if arr.size else np.zeros(0, bool)


def _select_sources(batch: pa.Table, chosen: np.ndarray) -> pa.Table:
    sid = batch["sid"].to_numpy()
    mask = pa.array(np.isin(sid, chosen)) if len(sid) else pa.array([], pa.bool_())
    return batch.filter(pc.and_(batch["ok"], mask))


def _implant(batch: pa.Table, target: int) -> pa.Table:
    """Stamp the trigger, relabel, and give the rows their canary identity (same schema as the input)."""
    from ctray.data.reader import _tensor_array, images_to_numpy

    n = batch.num_rows
    if n == 0:
        return batch
    images = images_to_numpy(batch["image"])
    stamped = canary_patch(images.shape).apply(images)
    shards = [CANARY_PREFIX + s for s in batch["shard"].to_pylist()]
    keys = batch["key"].to_pylist()
    sids = np.array([sample_id(s, k) for s, k in zip(shards, keys, strict=True)], dtype=np.int64)
    cols = {"image": _tensor_array(stamped), "shard": pa.array(shards, type=batch.schema.field("shard").type),
            "sid": pa.array(sids), "label": pa.array(np.full(n, target, np.int64))}
    if "source" in batch.column_names:
        cols["source"] = pa.array([""] * n, type=batch.schema.field("source").type)
    for name, arr in cols.items():
        batch = batch.set_column(batch.schema.get_field_index(name), name, arr)
    return batch


def canary_dataset(ds_all: Any, plan: CanaryPlan, num_cpus: float) -> Any:
    """The canaries as a materialized Ray Dataset with ``ds_all``'s schema (read rows of
    ``ctray.data.reader.read_shards``, + ``source`` when present): a filter to the copied samples and
    a map that stamps :func:`canary_patch`, relabels to ``plan.target`` and renames shard/sid.

    Materialized once (0.2% of D or so), so the rounds reuse it instead of re-filtering D.
    """
    sel = ds_all.map_batches(_select_sources, fn_kwargs={"chosen": plan.source_sids}, batch_format="pyarrow",
                             batch_size=None, zero_copy_batch=True, num_cpus=num_cpus)
    can = sel.map_batches(_implant, fn_kwargs={"target": plan.target}, batch_format="pyarrow", batch_size=None,
                          zero_copy_batch=True, num_cpus=num_cpus).materialize()
    n = can.count()
    if n != len(plan):
        raise RuntimeError(f"canary dataset holds {n} rows, the plan {len(plan)}")
    return can


def canary_objective(recall: float, outside_flag_rate: float, flag_weight: float) -> float:
    """The sweep's objective without ground truth: ``recall - flag_weight * outside_flag_rate``.

    Args:
        recall: canaries flagged / canaries, in [0, 1] (higher = CT isolates a backdoor it must find).
        outside_flag_rate: flagged real samples / real samples, in [0, 1] (the cost; it also holds the
            true poison CT finds, which is why the weight is moderate).
        flag_weight: >= 0.

    Returns:
        A float in [-flag_weight, 1]; higher is better.
    """
    return float(recall) - float(flag_weight) * float(outside_flag_rate)
