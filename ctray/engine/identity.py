"""Sample identities kept out of the driver's memory.

A detection run needs, per sample, a handful of numbers on the driver (sample id, label, losses, the
final scores) but the identity strings (``shard``, ``key``, ``source``) only when it writes its outputs
and for the few samples it names (flagged keys, the shard table's top keys, canary copies). The
identity pass (:func:`read_identity`) streams the read rows once: the numbers stay on the driver, the
strings go to a local Parquet file batch by batch (:class:`IdentityStore`), and only the quarantined
rows' strings (bounded by the bad input) are kept. The outputs are then written by streaming the store
back (:func:`write_scores`), one row group per batch, with the numbers gathered by sample id.

Driver memory per sample: the identity pass keeps ``sid int64, label int16`` (10 bytes; int32 labels
while it runs); the store's batches and Parquet buffers are bounded by the batch size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctray import io as cio
from ctray.core.index import SampleIndex, label_dtype

log = logging.getLogger(__name__)

#: Columns of the identity pass (a subset of ``ctray.data.reader.read_shards`` rows + ``source``).
IDENT_COLUMNS = ("shard", "key", "sid", "label", "ok", "reason", "level", "note", "source")
_STORE_COLUMNS = ("shard", "key", "sid", "ok", "source")
_BATCH = 65536


@contextlib.contextmanager
def preserve_order() -> Iterator[None]:
    """Ray Data yields blocks in input (shard) order while this is active, so a pass over the read rows
    is the same on every run (outputs and tie-breaks do not depend on which read task finished first)."""
    import ray.data

    opts = ray.data.DataContext.get_current().execution_options
    old = opts.preserve_order
    opts.preserve_order = True
    try:
        yield
    finally:
        opts.preserve_order = old


class IdentityStore:
    """The ``shard, key, sid, ok, source`` strings of every read row, in a local Parquet file written by
    batches (one row group each) in the identity pass's order. Delete it with :meth:`close`."""

    def __init__(self, directory: str | None = None):
        self.dir = tempfile.mkdtemp(prefix="ctray-ident-", dir=directory)
        self.path = os.path.join(self.dir, "identity.parquet")
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, True)  # also on an error path

    def append(self, batch: pa.Table) -> None:
        t = batch.select(list(_STORE_COLUMNS))
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, t.schema)
        self._writer.write_table(t)
        self.rows += t.num_rows

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def batches(self, columns: tuple[str, ...] = _STORE_COLUMNS) -> Iterator[pa.RecordBatch]:
        """The stored rows in order, ``_BATCH`` at a time."""
        if not self.rows:
            return
        yield from pq.ParquetFile(self.path).iter_batches(batch_size=_BATCH, columns=list(columns))

    def names(self, sids: np.ndarray) -> dict[int, tuple[str, str]]:
        """``{sid: (shard, key)}`` for the usable rows whose id is in ``sids`` (one streaming scan)."""
        want = np.unique(np.asarray(sids, dtype=np.int64))
        out: dict[int, tuple[str, str]] = {}
        if not len(want):
            return out
        for b in self.batches(("shard", "key", "sid", "ok")):
            s = b.column("sid").to_numpy()
            hit = np.flatnonzero(np.isin(s, want) & b.column("ok").to_numpy(zero_copy_only=False))
            if len(hit):
                sh, ke = b.column("shard").to_pylist(), b.column("key").to_pylist()
                for i in hit:
                    out[int(s[i])] = (sh[i], ke[i])
        return out

    def close(self) -> None:
        self.finish()
        self._cleanup()


@dataclass
class Identity:
    """What the driver keeps of the identity pass.

    Attributes:
        sids: int64 (U,) usable samples' ids, sorted ascending: the driver's sample order.
        labels: (U,) their labels, the smallest integer dtype that holds them (int16 for < 32,768 classes;
            :func:`ctray.core.index.label_dtype`).
        n_read: sample rows read (usable + quarantined); shard-level failures are not samples.
        n_converted: usable samples whose mode was converted.
        bad: the not-ok rows (quarantined samples and shard failures) as a table
            ``shard, key, reason, level, source`` (bounded by the bad input).
        shards: every shard id seen, sorted; sources: every non-empty source seen, sorted.
        store: the identity strings of all rows (:class:`IdentityStore`).
    """

    sids: np.ndarray
    labels: np.ndarray
    n_read: int
    n_converted: int
    bad: pa.Table
    shards: list[str]
    sources: list[str]
    store: IdentityStore
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_usable(self) -> int:
        return len(self.sids)

    @property
    def n_quarantined(self) -> int:
        return int(np.sum(self.bad.column("level").to_numpy(zero_copy_only=False) == "sample")) if self.bad.num_rows else 0

    @property
    def n_shard_failures(self) -> int:
        return self.bad.num_rows - self.n_quarantined


def read_identity(ds: Any, num_cpus: float, store_dir: str | None = None) -> Identity:
    """One pass over read rows (``ds``: rows of ``read_shards`` + ``source``) in shard order.

    Keeps the usable rows' ids and labels (sorted by id), the not-ok rows' strings, the shard and
    source names, and writes every row's strings to an :class:`IdentityStore`.
    """
    from ctray.engine.score import PROJECT_CPUS

    store = IdentityStore(store_dir)
    sids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    bad: list[pa.Table] = []
    shards: set[str] = set()
    sources: set[str] = set()
    n_read = n_conv = 0
    cols = ds.select_columns(list(IDENT_COLUMNS), num_cpus=PROJECT_CPUS)
    try:
        with preserve_order():
            for b in cols.iter_batches(batch_size=_BATCH, batch_format="pyarrow"):
                t: pa.Table = b  # type: ignore[assignment]
                if not t.num_rows:
                    continue
                store.append(t)
                ok = t.column("ok").to_numpy(zero_copy_only=False).astype(bool)
                # counted on Arrow columns: no Python string per row (see ctray.memory)
                n_read += int(pc.sum(pc.equal(t.column("level"), "sample")).as_py() or 0)
                sid = t.column("sid").to_numpy()
                sids.append(sid[ok].astype(np.int64))
                labels.append(t.column("label").to_numpy()[ok].astype(np.int32))
                converted = pc.fill_null(pc.not_equal(t.column("note"), ""), False).to_numpy(zero_copy_only=False)
                n_conv += int(np.sum(ok & converted))
                if not ok.all():
                    bad.append(t.filter(pa.array(~ok)).select(["shard", "key", "reason", "level", "source"]))
                shards.update(pc.unique(t.column("shard")).to_pylist())
                sources.update(s for s in pc.unique(t.column("source")).to_pylist() if s)
    except BaseException:
        store.close()
        raise
    store.finish()
    sid_all = np.concatenate(sids) if sids else np.empty(0, np.int64)
    del sids
    lab_all = np.concatenate(labels) if labels else np.empty(0, np.int32)
    del labels
    lab_all = lab_all.astype(label_dtype(int(lab_all.max()) + 1 if len(lab_all) else 1), copy=False)
    order = np.argsort(sid_all, kind="stable")
    bad_t = pa.concat_tables(bad) if bad else pa.table(
        {c: pa.array([], type=pa.string()) for c in ("shard", "key", "reason", "level", "source")})
    return Identity(sid_all[order], lab_all[order], n_read, n_conv, bad_t, sorted(shards), sorted(sources), store)


def truth_by_sid(path: str, sids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth aligned to ``sids`` (int64 (N,), sorted ascending): ``(poison bool (N,), cover bool (N,))``.

    Reads parquet (by record batches) or csv with columns ``shard, key, poison`` (+ optional ``cover``).
    Samples the truth does not list count as clean; truth rows matching no sample are reported.

    Raises:
        DataError: the file lacks the columns, or none of its rows matches a sample.
    """
    import pandas as pd

    from ctray.data.shards import sample_ids
    from ctray.errors import DataError

    try:
        if path.endswith(".parquet"):
            import io

            pf = pq.ParquetFile(io.BytesIO(cio.read_bytes(path)) if cio.is_remote(path) else path)
            names = set(pf.schema_arrow.names)
            parts: Iterator[Any] = (b.to_pandas() for b in pf.iter_batches(batch_size=_BATCH))
        else:
            df = pd.read_csv(path)
            names = set(df.columns)
            parts = iter([df])
    except Exception as e:
        raise DataError(f"cannot read truth file {path}: {e}") from e
    missing = {"shard", "key", "poison"} - names
    if missing:
        raise DataError(f"truth file {path} lacks columns {sorted(missing)} (needs shard, key, poison[, cover])")
    has_cover = "cover" in names
    n = len(sids)
    poison, cover = np.zeros(n, bool), np.zeros(n, bool)
    total = matched = 0
    for df in parts:
        total += len(df)
        ts = sample_ids(df["shard"].astype(str).tolist(), df["key"].astype(str).tolist())
        pos = np.clip(np.searchsorted(sids, ts), 0, max(0, n - 1))
        hit = (pos < n) & (sids[pos] == ts) if n else np.zeros(len(ts), bool)
        matched += int(hit.sum())
        poison[pos[hit]] = df["poison"].to_numpy(bool)[hit]
        if has_cover:
            cover[pos[hit]] = df["cover"].to_numpy(bool)[hit]
    if matched == 0:
        raise DataError(f"truth file {path}: none of its {total} rows matches a usable sample (shard, key) of the run")
    if matched < total:
        log.warning("truth: %d of %d rows match no usable sample (quarantined or absent)", total - matched, total)
    return poison, cover


def _column(v: Any, ix: np.ndarray) -> pa.Array:
    """Rows ``ix`` of a driver column: an array, or ``(codes int (N,), labels)`` for a dictionary-encoded
    string column (e.g. ``flagged_by``: one byte a sample on the driver, strings only in the file)."""
    if isinstance(v, tuple):
        codes, labels = v
        return pa.DictionaryArray.from_arrays(pa.array(codes[ix]), pa.array(list(labels), pa.string()))
    return pa.array(v[ix])


def write_scores(path: str, store: IdentityStore, index: SampleIndex,
                 columns: dict[str, np.ndarray], n_real: int, want_names: np.ndarray) -> dict[int, tuple[str, str, str]]:
    """Write ``scores.parquet`` by streaming the identity store: one row group per stored batch of
    usable rows, ``shard, key`` from the store, every ``columns[c]`` (driver arrays in the driver's
    sample order, first ``n_real`` entries real samples) gathered by sample id.

    Args:
        path: the output (local or remote; a remote file is written locally, then uploaded once).
        store: the identity strings.
        index: the driver's order (:class:`~ctray.core.index.SampleIndex` of its ``sids``).
        columns: name -> (N,) array in the driver's order, or ``(codes, labels)`` (a dictionary-encoded
            string column).
        n_real: driver entries that are real samples (canaries follow them and are not written).
        want_names: sample ids whose ``(shard, key)`` the caller needs (flagged, top keys).

    Returns:
        ``{sid: (shard, key, source)}`` for ``want_names``.
    """
    want = np.unique(np.asarray(want_names, dtype=np.int64))
    names: dict[int, tuple[str, str, str]] = {}
    local = path if not cio.is_remote(path) else os.path.join(store.dir, "scores.parquet")
    tmp = local + ".partial"
    writer: pq.ParquetWriter | None = None
    written = 0
    try:
        for rb in store.batches(("shard", "key", "sid", "ok", "source")):
            ok = rb.column("ok").to_numpy(zero_copy_only=False).astype(bool)
            if not ok.any():
                continue
            b = rb.filter(pa.array(ok))
            s = b.column("sid").to_numpy()
            idx = index.positions_of_known(s)
            real = idx < n_real
            tbl = {"shard": b.column("shard"), "key": b.column("key")}
            t = pa.table(tbl).filter(pa.array(real)) if not real.all() else pa.table(tbl)
            ix = idx[real]
            for c, v in columns.items():
                t = t.append_column(c, _column(v, ix))
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema)
            writer.write_table(t)
            written += t.num_rows
            hit = np.flatnonzero(np.isin(s, want) & real)
            if len(hit):  # Python strings only for the rows asked for (not the whole batch)
                h = b.select(["shard", "key", "source"]).take(pa.array(hit))
                for i, sh, ke, so in zip(s[hit], *(h.column(c).to_pylist() for c in ("shard", "key", "source")),
                                         strict=True):
                    names[int(i)] = (sh, ke, so or "")
        if writer is None:  # no usable sample: an empty table with the columns
            empty = {"shard": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                     **{c: _column(v, np.zeros(0, np.int64)) for c, v in columns.items()}}
            pq.write_table(pa.table(empty), tmp)
        else:
            writer.close()
            writer = None
        os.replace(tmp, local)
        if local != path:
            fs, p = cio._fs(path)
            with open(local, "rb") as src, fs.open_output_stream(p) as dst:
                shutil.copyfileobj(src, dst, 8 * 2**20)
            os.remove(local)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    log.debug("scores.parquet: %d rows", written)
    return names
