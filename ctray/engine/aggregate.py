"""Per-shard and per-source suspicion tables, aggregated by an actor while the final scoring streams.

Flow (one detection run):

1. :func:`with_sources` adds a ``source`` column to the read rows: the ``source`` field of a sample's
   ``.json`` metadata, else the host of its ``url`` field, else "" (no source).
2. The final round's scored dataset passes through :func:`feed_aggregator`: a ``map_batches`` with
   ``batch_size=None`` (one call per block) folds the block's real samples (canaries dropped) into two
   :class:`~ctray.core.shardstats.GroupStats` (by shard, by source) and sends them to the run's
   :class:`ShardAggregator` actor in ONE call per block, keyed by a content hash of the block's sorted
   sample ids. Ray Data re-runs a failed task; the re-sent block has the same id and the actor ignores
   it, so nothing is counted twice.
3. After the likelihood-ratio test, :func:`write_group_tables` derives each group's flagged count from
   its per-class isolated counts (``label in cleansed and pred == label``), adds the read's quarantine
   counts, marks outliers with :func:`~ctray.core.shardstats.binomial_marks` and writes
   ``shards.parquet`` and ``sources.parquet``, most suspicious first.

Only per-group partials (a few hundred bytes per group in a block) reach the actor, and only the
merged tables reach the driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from ctray import io as cio
from ctray.core.shardstats import GroupStats, binomial_marks, suspicion_order
from ctray.engine.canary import CANARY_PREFIX

log = logging.getLogger(__name__)

#: Compact the actor's pending partials once they hold this many group rows (and at least as many as
#: the merged total): merging stays linear in the input overall.
_COMPACT_MIN_ROWS = 4096


# ------------------------------------------------------------------------------------------- sources


def source_of(meta: str) -> str:
    """The source of a sample from its raw ``.json`` metadata text: the ``source`` field when it is
    a non-empty string, else the lower-cased host of the ``url`` field, else "" (none)."""
    if not meta:
        return ""
    try:
        d = json.loads(meta)
    except ValueError:
        return ""
    if not isinstance(d, dict):
        return ""
    src = d.get("source")
    if isinstance(src, str) and src.strip():
        return src.strip()
    url = d.get("url")
    if isinstance(url, str) and url:
        try:
            host = urlsplit(url.strip()).hostname
        except ValueError:
            return ""
        return host.lower() if host else ""
    return ""


def _add_source(batch: pa.Table) -> pa.Table:
    meta = batch["meta"].to_pylist()
    src = [source_of(m) if m else "" for m in meta]
    return batch.append_column("source", pa.array(src, type=pa.string()))


def with_sources(ds: Any, num_cpus: float) -> Any:
    """``ds`` (rows of ``ctray.data.reader.read_shards``) plus a string ``source`` column."""
    return ds.map_batches(_add_source, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          num_cpus=num_cpus)


#: Columns of :func:`scoring_view`: what the scorer needs plus the group columns it passes through.
SCORING_COLUMNS = ("sid", "image", "label", "shard", "source")


def _scoring_batch(batch: pa.Table) -> pa.Table:
    return batch.filter(batch["ok"]).select(list(SCORING_COLUMNS))


def scoring_view(ds: Any, num_cpus: float) -> Any:
    """The usable rows of ``ds`` (read rows + ``source``) with :data:`SCORING_COLUMNS`: the input of
    the final scoring pass, whose output keeps ``shard`` and ``source`` for the aggregation."""
    return ds.map_batches(_scoring_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          num_cpus=num_cpus)


# --------------------------------------------------------------------------------------------- actor


def block_id(sids: np.ndarray) -> str:
    """A content id of a block: BLAKE2b of its sorted int64 sample ids (stable under retries and
    under any row order)."""
    return hashlib.blake2b(np.sort(np.asarray(sids, dtype=np.int64)).tobytes(), digest_size=16).hexdigest()


class ShardAggregator:
    """The run's aggregation state, run as a Ray actor by :func:`start_aggregator` (``num_cpus=0``).

    ``add`` is idempotent per block id; partials are buffered and merged in batches (amortised linear
    cost), so a call costs O(size of the block's partials).
    """

    def __init__(self, num_classes: int, bins: int, top_k: int):
        self._empty = GroupStats.empty(num_classes, bins, top_k)
        self._acc = {"shard": self._empty, "source": self._empty}
        self._pending: dict[str, list[GroupStats]] = {"shard": [], "source": []}
        self._pending_rows = {"shard": 0, "source": 0}
        self._seen: set[str] = set()
        self._duplicates = 0

    def add(self, block: str, by_shard: GroupStats, by_source: GroupStats) -> bool:
        """Fold one block's partials in; False (and nothing counted) when ``block`` was seen before."""
        if block in self._seen:
            self._duplicates += 1
            return False
        self._seen.add(block)
        for name, part in (("shard", by_shard), ("source", by_source)):
            if not len(part):
                continue
            self._pending[name].append(part)
            self._pending_rows[name] += len(part)
            if self._pending_rows[name] >= max(_COMPACT_MIN_ROWS, len(self._acc[name])):
                self._compact(name)
        return True

    def _compact(self, name: str) -> None:
        if self._pending[name]:
            self._acc[name] = GroupStats.merge_all([self._acc[name], *self._pending[name]])
            self._pending[name] = []
            self._pending_rows[name] = 0

    def result(self) -> tuple[GroupStats, GroupStats, dict[str, int]]:
        """``(by_shard, by_source, {"blocks": distinct blocks, "duplicates": re-sent blocks ignored})``."""
        self._compact("shard")
        self._compact("source")
        return self._acc["shard"], self._acc["source"], {"blocks": len(self._seen), "duplicates": self._duplicates}


def start_aggregator(num_classes: int, bins: int, top_k: int) -> Any:
    """Create this run's aggregator actor (``num_cpus=0``: it only merges small arrays) and return
    its handle; pass the handle explicitly (no named actor, so concurrent runs cannot collide)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ShardAggregator).remote(num_classes, bins, top_k)


def block_partials(batch: pa.Table, num_classes: int, bins: int, top_k: int) -> tuple[str, GroupStats, GroupStats]:
    """One scored block -> ``(block id, by-shard stats, by-source stats)`` of its real samples.

    ``batch`` needs ``sid, shard, source, label, pred, prob`` (``prob`` = the score in [0, 1]). The
    id covers every row (canaries included); the stats drop canaries and, for sources, samples
    without one.
    """
    sid = batch["sid"].to_numpy()
    bid = block_id(sid)
    shard = np.asarray(batch["shard"].to_pylist(), dtype=str) if len(sid) else np.zeros(0, str)
    real = ~np.char.startswith(shard, CANARY_PREFIX) if len(sid) else np.zeros(0, bool)
    source = np.asarray(batch["source"].to_pylist(), dtype=str) if len(sid) else np.zeros(0, str)
    label = batch["label"].to_numpy()
    pred = batch["pred"].to_numpy()
    score = np.clip(batch["prob"].to_numpy().astype(np.float64), 0.0, 1.0)

    def stats(groups: np.ndarray, m: np.ndarray) -> GroupStats:
        return GroupStats.from_samples(groups[m], sid[m], score[m], label[m], pred[m], num_classes, bins, top_k)

    has_src = real & (source != "") if len(sid) else real
    return bid, stats(shard, real), stats(source, has_src)


def _feed_block(batch: pa.Table, aggregator: Any, num_classes: int, bins: int, top_k: int) -> pa.Table:
    import ray

    bid, by_shard, by_source = block_partials(batch, num_classes, bins, top_k)
    # one call per block; waiting here (in the Data task, not the driver) ties the send to the task's
    # success: a task that fails after sending is re-run and re-sends the same id, which is ignored
    ray.get(aggregator.add.remote(bid, by_shard, by_source))
    return batch


def feed_aggregator(scored: Any, aggregator: Any, num_classes: int, bins: int, top_k: int, num_cpus: float) -> Any:
    """``scored`` unchanged, with a pass-through op that feeds each block to ``aggregator``.

    ``batch_size=None`` makes every call see exactly one block, so block ids are stable under task
    retries. ``scored`` needs the columns of :func:`block_partials`.
    """
    return scored.map_batches(_feed_block, fn_kwargs={"aggregator": aggregator, "num_classes": num_classes,
                                                      "bins": bins, "top_k": top_k},
                              batch_format="pyarrow", batch_size=None, zero_copy_batch=True, num_cpus=num_cpus)


# -------------------------------------------------------------------------------------------- tables


def group_table(stats: GroupStats, flagged: np.ndarray, alpha: float, key_of: dict[int, tuple[str, str]],
                name: str) -> tuple[pa.Table, dict[str, Any]]:
    """The ranked table of one grouping.

    Columns: ``<name>`` (shard id / source), ``samples, usable, quarantined, failures, flagged,
    flag_rate, expected`` (usable x overall flag rate), ``mean_score``, ``p_value`` (one-sided
    binomial tail, see :func:`~ctray.core.shardstats.binomial_marks`), ``marked`` (p < alpha / groups),
    ``top_keys`` / ``top_scores`` (highest scores first; keys as ``key`` in the shard table and as
    ``shard:key`` in the source table), ``score_hist`` (counts per bin over [0, 1]).
    ``key_of`` maps a top sample id to its ``(shard, key)``.
    Rows are sorted most suspicious first (:func:`~ctray.core.shardstats.suspicion_order`).

    Returns:
        ``(table, summary)`` with the overall rate, the marking level and the marked groups.
    """
    p, marked, rate, level = binomial_marks(flagged, stats.usable, alpha)
    ms = stats.mean_score()
    order = suspicion_order(p, flagged, ms, stats.group)
    tops = stats.top_lists()
    usable = stats.usable

    def label(i: int) -> str:
        sk = key_of.get(int(i))
        if sk is None:
            return str(i)
        return sk[1] if name == "shard" else f"{sk[0]}:{sk[1]}"

    with np.errstate(invalid="ignore", divide="ignore"):
        frate = np.where(usable > 0, flagged / np.maximum(usable, 1), np.nan)
    table = pa.table({
        name: pa.array(stats.group[order].tolist(), pa.string()),
        "samples": stats.samples[order], "usable": usable[order], "quarantined": stats.quarantined[order],
        "failures": stats.failures[order], "flagged": np.asarray(flagged, np.int64)[order],
        "flag_rate": frate[order], "expected": (usable * rate)[order], "mean_score": ms[order],
        "p_value": p[order], "marked": marked[order],
        "top_keys": pa.array([[label(i) for i in tops[g][0]] for g in order], pa.list_(pa.string())),
        "top_scores": pa.array([tops[g][1].tolist() for g in order], pa.list_(pa.float64())),
        "score_hist": pa.array([stats.hist[g].tolist() for g in order], pa.list_(pa.int64())),
    })
    summary = {"groups": len(stats), "flag_rate": rate, "alpha": alpha, "level": level,
               "marked": stats.group[order][marked[order]].tolist()}
    return table, summary


def write_group_tables(out: str, by_shard: GroupStats, by_source: GroupStats, shard_flagged: np.ndarray,
                       source_flagged: np.ndarray, alpha: float, key_of: dict[int, tuple[str, str]]
                       ) -> dict[str, Any]:
    """Write ``out/shards.parquet`` (column ``shard``) and ``out/sources.parquet`` (column ``source``).

    Returns:
        ``{"shards": summary, "sources": summary}`` (see :func:`group_table`).
    """
    t_sh, s_sh = group_table(by_shard, shard_flagged, alpha, key_of, "shard")
    t_src, s_src = group_table(by_source, source_flagged, alpha, key_of, "source")
    cio.write_parquet(cio.join(out, "shards.parquet"), t_sh)
    cio.write_parquet(cio.join(out, "sources.parquet"), t_src)
    if s_sh["marked"]:
        log.info("shards marked at p < %.3g (binomial tail vs the overall flag rate %.4f): %s", s_sh["level"],
                 s_sh["flag_rate"], s_sh["marked"][:10])
    if s_src["marked"]:
        log.info("sources marked at p < %.3g: %s", s_src["level"], s_src["marked"][:10])
    return {"shards": s_sh, "sources": s_src}


def flagged_by_group(stats: GroupStats, groups: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """int64 (G,) flagged counts per group of ``stats`` from per-sample ``groups`` / ``flagged`` arrays
    (the Ember-style ``decide.flag_budget`` path, whose flags are not CT's isolated-class rule)."""
    names, counts = np.unique(np.asarray(groups, dtype=str)[np.asarray(flagged, bool)], return_counts=True)
    out = np.zeros(len(stats), np.int64)
    if len(names):
        pos = np.searchsorted(stats.group, names)
        ok = (pos < len(stats)) & (stats.group[np.minimum(pos, len(stats) - 1)] == names)
        out[pos[ok]] = counts[ok]
    return out
