"""Ray Data reader for WebDataset shards: one row per sample, bad input kept as quarantine rows.

:func:`read_shards` builds a :class:`ray.data.Dataset` from a custom :class:`ray.data.Datasource`
whose read tasks each parse one or more whole shards with :func:`ctray.data.shards.iter_shard` (a tar
is never split) and yield pyarrow Tables of about ``rows_per_block`` rows with this schema:

========  ==========================================  ===========================================
column    type                                        meaning
========  ==========================================  ===========================================
shard     string                                      shard id (:func:`~ctray.data.shards.shard_ids`)
key       string                                      sample key ("" for a shard-level failure)
sid       int64                                       :func:`~ctray.data.shards.sample_id` (shard, key)
image     fixed-shape uint8 tensor ``(H, W, C)``      pixels at the run's spec; zeros when not ok
label     int64                                       class, -1 when not ok
ok        bool                                        usable sample
reason    string                                      quarantine reason, "" when ok
level     string                                      "sample" or "shard"
note      string                                      conversion/resize applied to an ok sample
meta      string                                      raw ``.json`` text or ""
========  ==========================================  ===========================================

The ``image`` column is Ray Data's Arrow tensor extension type, built with
``ArrowTensorArray.from_numpy`` so it follows ``DataContext.arrow_fixed_shape_tensor_format`` (in Ray
2.60 the default is ``ArrowTensorTypeV2``). Ray's batch APIs (``iter_batches(batch_format="numpy")``,
``iter_torch_batches``, ``map_batches``) hand it over as a ``uint8 (N, H, W, C)`` array/tensor; on a raw
``pyarrow.Table`` use :func:`images_to_numpy`.

Every sample found becomes exactly one row (quarantined rows are rare and keep the schema), so one pass
accounts for every input: see :func:`count_rows`. Every Ray Data op here asks for a fractional
``num_cpus`` so Data never starves beside Train workers on small machines (ray-notes §5.1).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ctray.data.shards import ImageSpec, Record, expand_shards, iter_shard, sample_id, shard_ids
from ctray.errors import DataError

log = logging.getLogger(__name__)

#: Columns of every block, in order.
COLUMNS = ("shard", "key", "sid", "image", "label", "ok", "reason", "level", "note", "meta")
#: Columns :func:`usable` keeps (what training needs; strings cannot become torch tensors).
TRAIN_COLUMNS = ("sid", "image", "label")
#: Columns of :func:`quarantine_table`.
QUARANTINE_COLUMNS = ("shard", "key", "reason", "level")

_DEFAULT_OP_CPUS = 0.25
_MAX_BLOCK_BYTES = 64 * 2**20


def _tensor_type(shape: tuple[int, int, int]) -> pa.DataType:
    from ray.data._internal.tensor_extensions.arrow import create_arrow_fixed_shape_tensor_type

    return create_arrow_fixed_shape_tensor_type(shape, pa.uint8())


def _tensor_array(images: np.ndarray) -> pa.Array:
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray

    return ArrowTensorArray.from_numpy(images, column_name="image")


def block_schema(spec: ImageSpec) -> pa.Schema:
    """The Arrow schema of every block :func:`read_shards` yields for ``spec``."""
    return pa.schema([
        ("shard", pa.string()), ("key", pa.string()), ("sid", pa.int64()),
        ("image", _tensor_type(spec.shape)), ("label", pa.int64()), ("ok", pa.bool_()),
        ("reason", pa.string()), ("level", pa.string()), ("note", pa.string()), ("meta", pa.string()),
    ])


def images_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The ``image`` column of a pyarrow Table/batch as ``uint8 (N, H, W, C)`` (a copy when chunked)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    arrays = [np.asarray(c.to_numpy(zero_copy_only=False)) for c in chunks if len(c)]
    if not arrays:
        storage = column.type
        shape = tuple(getattr(storage, "shape", ()))
        return np.zeros((0, *shape), dtype=np.uint8)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


class _BlockBuilder:
    """Accumulates :class:`Record` s into one Arrow table of at most ``capacity`` rows.

    Per row it does list appends and one ``(H, W, C)`` copy into a preallocated image buffer; all
    column building is vectorised at :meth:`build`.
    """

    def __init__(self, spec: ImageSpec, capacity: int):
        self.spec = spec
        row_bytes = spec.height * spec.width * spec.channels
        # cap a block's pixels at _MAX_BLOCK_BYTES (Ray's target block size is 128 MiB)
        self.capacity = max(1, min(capacity, _MAX_BLOCK_BYTES // max(1, row_bytes)))
        self._reset()

    def _reset(self) -> None:
        self.images = np.empty((self.capacity, *self.spec.shape), dtype=np.uint8)
        self.n = 0
        self.shard: list[str] = []
        self.key: list[str] = []
        self.sid: list[int] = []
        self.label: list[int] = []
        self.reason: list[str] = []
        self.level: list[str] = []
        self.note: list[str] = []
        self.meta: list[str] = []

    def add(self, r: Record) -> None:
        i = self.n
        if r.reason or r.image is None:
            self.images[i] = 0
        else:
            self.images[i] = r.image
        self.shard.append(r.shard)
        self.key.append(r.key)
        self.sid.append(sample_id(r.shard, r.key))
        self.label.append(r.label)
        self.reason.append(r.reason)
        self.level.append(r.level)
        self.note.append(r.note)
        self.meta.append(r.meta)
        self.n = i + 1

    @property
    def full(self) -> bool:
        return self.n >= self.capacity

    def build(self) -> pa.Table:
        n = self.n
        reason = pa.array(self.reason, type=pa.string())
        table = pa.Table.from_arrays(
            [
                pa.array(self.shard, type=pa.string()),
                pa.array(self.key, type=pa.string()),
                pa.array(np.fromiter(self.sid, dtype=np.int64, count=n)),
                # a short (last) block copies so it does not pin the whole preallocated buffer
                _tensor_array(self.images if n == self.capacity else self.images[:n].copy()),
                pa.array(np.fromiter(self.label, dtype=np.int64, count=n)),
                pc.equal(reason, ""),
                reason,
                pa.array(self.level, type=pa.string()),
                pa.array(self.note, type=pa.string()),
                pa.array(self.meta, type=pa.string()),
            ],
            names=list(COLUMNS),
        )
        self._reset()
        return table


def _id_selector(keep: np.ndarray, shard_id: str) -> Any:
    """``key -> bool``: whether ``sample_id(shard_id, key)`` is in ``keep`` (sorted int64)."""
    def select(key: str) -> bool:
        sid = sample_id(shard_id, key)
        i = int(np.searchsorted(keep, sid))
        return i < len(keep) and int(keep[i]) == sid

    return select


def _read_shard_group(paths: Sequence[str], ids: Sequence[str], spec: ImageSpec,
                      num_classes: int | None, rows_per_block: int, strict: bool,
                      keep: Any = None) -> Iterator[pa.Table]:
    """The body of one read task: parse ``paths`` in order, yield tables of <= ``rows_per_block`` rows.
    With ``keep`` (an ObjectRef of, or a, sorted int64 array of sample ids) only those samples are
    decoded and yielded."""
    kept = None
    if keep is not None:
        kept = np.asarray(ray.get(keep) if isinstance(keep, ray.ObjectRef) else keep, dtype=np.int64)
    builder = _BlockBuilder(spec, rows_per_block)
    for path, shard_id in zip(paths, ids, strict=True):
        select = _id_selector(kept, shard_id) if kept is not None else None
        for rec in iter_shard(path, shard_id, spec, num_classes, select=select):
            if rec.level == "shard":
                if strict:
                    raise DataError(f"shard {shard_id} ({path}): {rec.reason}")
                log.warning("shard %s quarantined: %s", shard_id, rec.reason)
            builder.add(rec)
            if builder.full:
                yield builder.build()
    if builder.n:
        yield builder.build()


class ShardDatasource(Datasource):
    """A :class:`ray.data.Datasource` over WebDataset tar shards (local paths or ``s3://``/``gs://`` URIs).

    One read task per ``shards_per_task`` consecutive shards (in sorted path order); Ray's requested
    ``parallelism`` is not used to split shards, since a tar is read by exactly one task.
    """

    def __init__(self, paths: Sequence[str], spec: ImageSpec, num_classes: int | None, *,
                 shards_per_task: int = 1, rows_per_block: int = 1024, strict: bool = False,
                 ids: dict[str, str] | None = None, keep: Any = None):
        super().__init__()
        self.keep = keep
        if shards_per_task < 1:
            raise DataError(f"shards_per_task must be >= 1, got {shards_per_task}")
        if rows_per_block < 1:
            raise DataError(f"rows_per_block must be >= 1, got {rows_per_block}")
        self.paths = list(paths)
        self.ids = ids if ids is not None else shard_ids(self.paths)
        self.spec = spec
        self.num_classes = num_classes
        self.shards_per_task = shards_per_task
        self.rows_per_block = rows_per_block
        self.strict = strict
        self._sizes = [_local_size(p) for p in self.paths]

    def get_name(self) -> str:
        return "ReadShards"

    def estimate_inmemory_data_size(self) -> int | None:
        """Sum of the local shard file sizes (a rough proxy); None when any shard is remote."""
        if any(s is None for s in self._sizes):
            return None
        return int(sum(s for s in self._sizes if s is not None))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        schema = block_schema(self.spec)
        tasks: list[ReadTask] = []
        k = self.shards_per_task
        for start in range(0, len(self.paths), k):
            group = self.paths[start:start + k]
            sizes = self._sizes[start:start + k]
            size = None if any(s is None for s in sizes) else int(sum(s for s in sizes if s is not None))
            read_fn = functools.partial(
                _read_shard_group, tuple(group), tuple(self.ids[p] for p in group), self.spec,
                self.num_classes, self.rows_per_block, self.strict, self.keep)
            meta = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=tuple(group))
            tasks.append(ReadTask(read_fn, meta, schema=schema, per_task_row_limit=per_task_row_limit))
        return tasks


def _local_size(path: str) -> int | None:
    if "://" in path:
        return None
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def read_shards(paths: str | Sequence[str], spec: ImageSpec, num_classes: int | None, *,
                num_cpus: float = 0.25, shards_per_task: int = 1, rows_per_block: int = 1024,
                strict: bool = False, keep: np.ndarray | None = None) -> ray.data.Dataset:
    """Read WebDataset shards into a Dataset of one row per sample (schema: module docstring).

    Args:
        paths: anything :func:`~ctray.data.shards.expand_shards` accepts (directory, glob, brace
            pattern, comma list, list; local or ``s3://``/``gs://``).
        spec: the run's image spec; ok images are ``uint8 (H, W, C)`` at ``spec.shape``.
        num_classes: labels must lie in ``[0, num_classes)``; None skips the upper bound.
        num_cpus: logical CPUs per read task; fractional on purpose (ray-notes §5.1).
        shards_per_task: consecutive shards parsed by one read task (1 = one task per shard).
        rows_per_block: rows per table a read task yields (capped so its pixels stay under 64 MiB,
            e.g. 445 rows of 224x224x3). Ray's output buffer then merges a task's tables into blocks
            of up to ``DataContext.target_max_block_size`` (128 MiB by default), so with small images
            one block is usually one task's shards.
        strict: raise :class:`~ctray.errors.DataError` from the read task on a shard-level failure
            (not a tar, truncated, empty) instead of writing a quarantine row. It surfaces when the
            Dataset executes, as a ``ray.exceptions.RayTaskError`` that is also an instance of
            ``DataError`` (Ray's ``as_instanceof_cause``); its message names the shard and the reason.
        keep: int64 sample ids: only these samples are decoded and become rows (shard-level failure rows
            still appear); the rest are skipped before decoding. For a pass over a known subset (a
            round's kept set) when D is not cached: it costs a tar scan, not a decode, per other sample.
            Put in the object store once and read by every task (not copied into each task).

    Raises:
        DataError: no shard matches ``paths`` (at call time); with ``strict``, at execution.
    """
    resolved = expand_shards(paths)
    ref = ray.put(np.unique(np.asarray(keep, dtype=np.int64))) if keep is not None else None
    ds_src = ShardDatasource(resolved, spec, num_classes, shards_per_task=shards_per_task,
                             rows_per_block=rows_per_block, strict=strict, keep=ref)
    n_tasks = -(-len(resolved) // shards_per_task)
    log.info("reading %d shards in %d read tasks (num_cpus=%s each)", len(resolved), n_tasks, num_cpus)
    return ray.data.read_datasource(ds_src, num_cpus=num_cpus, override_num_blocks=n_tasks)


# ----------------------------------------------------------------------------------------------------
# derived views


def _usable_batch(batch: pa.Table) -> pa.Table:
    return batch.filter(batch["ok"]).select(list(TRAIN_COLUMNS))


def usable(ds: ray.data.Dataset, *, num_cpus: float = _DEFAULT_OP_CPUS) -> ray.data.Dataset:
    """Only ok rows, only the training columns ``sid`` (int64), ``image`` (uint8 (H, W, C)),
    ``label`` (int64 in [0, num_classes)); ready for ``iter_torch_batches``."""
    return ds.map_batches(_usable_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          num_cpus=num_cpus)


def _select_batch(batch: pa.Table, *, sids: np.ndarray | None = None) -> pa.Table:
    return batch.filter(pa.array(np.isin(batch["sid"].to_numpy(), np.asarray(sids, dtype=np.int64))))


def select_ids(ds: ray.data.Dataset, sids: np.ndarray, num_cpus: float = _DEFAULT_OP_CPUS) -> ray.data.Dataset:
    """Only the rows whose ``sid`` is in ``sids`` (int64; a round's kept set), filtered while streaming."""
    return ds.map_batches(_select_batch, fn_kwargs={"sids": np.asarray(sids, dtype=np.int64)}, batch_format="pyarrow",
                          batch_size=None, zero_copy_batch=True, num_cpus=num_cpus)


def _quarantine_batch(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.invert(batch["ok"])).select(list(QUARANTINE_COLUMNS))


def quarantine_table(ds: ray.data.Dataset, *, num_cpus: float = _DEFAULT_OP_CPUS) -> pa.Table:
    """The not-ok rows as a pyarrow Table ``shard, key, reason, level`` (strings), sorted by
    ``(shard, key)``. Executes ``ds`` (a full read); only the small string columns reach the driver."""
    q = ds.map_batches(_quarantine_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                       num_cpus=num_cpus)
    parts: list[pa.Table] = [b for b in q.iter_batches(batch_size=None, batch_format="pyarrow")  # type: ignore[misc]
                             if len(b)]
    if not parts:
        return pa.table({c: pa.array([], type=pa.string()) for c in QUARANTINE_COLUMNS})
    table = pa.concat_tables(parts)
    return table.sort_by([("shard", "ascending"), ("key", "ascending")])


class ReadStats(TypedDict):
    """Counts of one pass over a :func:`read_shards` Dataset. ``read == usable + quarantined``.

    read: sample-level rows; usable: ok rows; quarantined: sample-level not-ok rows;
    shard_failures: shard-level rows (not a tar, truncated, empty); converted: ok rows with a note.
    """

    read: int
    usable: int
    quarantined: int
    shard_failures: int
    converted: int


_STAT_KEYS = ("read", "usable", "quarantined", "shard_failures", "converted")


def _count_batch(batch: pa.Table) -> dict[str, np.ndarray]:
    ok = batch["ok"]
    is_sample = pc.equal(batch["level"], "sample")
    counts = {
        "read": pc.sum(is_sample).as_py() or 0,
        "usable": pc.sum(ok).as_py() or 0,
        "quarantined": pc.sum(pc.and_(is_sample, pc.invert(ok))).as_py() or 0,
        "shard_failures": pc.sum(pc.invert(is_sample)).as_py() or 0,
        "converted": pc.sum(pc.and_(ok, pc.not_equal(batch["note"], ""))).as_py() or 0,
    }
    return {k: np.array([v], dtype=np.int64) for k, v in counts.items()}


def count_rows(ds: ray.data.Dataset, *, num_cpus: float = _DEFAULT_OP_CPUS) -> ReadStats:
    """Count rows by kind in one pass: a combiner ``map_batches`` emits per-block partial counts
    (one row per block) that the driver sums; no image data reaches the driver."""
    parts = ds.map_batches(_count_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                           num_cpus=num_cpus)
    totals = dict.fromkeys(_STAT_KEYS, 0)
    for b in parts.iter_batches(batch_size=None, batch_format="numpy"):
        for k in _STAT_KEYS:
            totals[k] += int(np.sum(b[k]))
    stats = ReadStats(**totals)  # type: ignore[typeddict-item]
    if stats["read"] != stats["usable"] + stats["quarantined"]:  # pragma: no cover - invariant
        raise AssertionError(f"inconsistent counts {stats}")
    return stats
