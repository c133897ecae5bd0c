"""Export the cleansed data set of a finished run as WebDataset shards (``ctray export``).

Each input shard of the run is streamed once with the project's one tar reader
(:func:`ctray.data.shards._tar_members`), its members grouped into samples exactly as
:func:`~ctray.data.shards.iter_shard` groups them, and the raw member bytes of every selected sample are
copied into one output shard of the same name (``OUT/<shard id>``): nothing is decoded or re-encoded, and
``.cls``, ``.json``, ``.txt`` and any other members travel unchanged. Because the output keeps the
input's shard ids and keys (except keys that are unsafe as paths, below), ``(shard, key)`` of an exported
sample is its identity in the run.

Accounting, per input shard: every sample read is kept, removed (flagged) or quarantined, and the
three numbers must equal the run's own (``scores.parquet`` + ``quarantine.parquet``); a sample that is in
neither table, a scored sample that is missing, or a ``.cls`` label that differs from the run's means the
input changed since the run, and the export fails naming the shard and key.

Memory: a task holds one shard's rows of ``scores.parquet`` (read with a row filter; ``detect`` sorts the
file by shard, so Parquet's row-group statistics skip the row groups of other shards) and one sample's
members at a time; the driver holds per-shard counts only.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Literal

from ctray import io as cio
from ctray._version import __version__
from ctray.data.shards import MAX_MEMBER_BYTES, _size_of
from ctray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Which = Literal["kept", "flagged"]
WHICH: tuple[str, ...] = ("kept", "flagged")

# Output tar members: regular files, 0644, this fixed mtime (2000-01-01 UTC, not 0: some extractors warn
# on 1970 dates), owner "ctray". Same samples in the same order give byte-identical shards.
MTIME = 946684800
# Ray tasks take a quarter CPU, as the project's other Ray Data/Train helpers do: a whole CPU per copy
# task can deadlock a 2-CPU box beside other Ray work (ray-notes §5.1), and a copy is I/O bound.
TASK_CPUS = 0.25
# At most this many shard tasks in flight: bounds the driver's pending refs and the worker temp space.
MAX_IN_FLIGHT = 64

# Characters that make a member name unsafe on some extractor: control characters, and the backslash
# (a path separator on Windows).
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class ShardExport:
    """What the export did with one input shard.

    Attributes:
        shard: the shard id (the run's ``shard`` column).
        input: the input path/URI.
        output: the output shard, relative to the output directory; None when no sample was selected
            (no empty tar is written).
        read: samples read (``kept + removed + quarantined``).
        kept, removed, quarantined: usable unflagged, usable flagged, and quarantined samples.
        written: samples written (``kept`` or ``removed``, by mode).
        shard_failures: shard-level failures (not a tar, empty, truncated), as in the run.
        renamed: ``{original key: key written}`` for keys that were unsafe as member names.
    """

    shard: str
    input: str
    output: str | None = None
    read: int = 0
    kept: int = 0
    removed: int = 0
    quarantined: int = 0
    written: int = 0
    shard_failures: int = 0
    renamed: dict[str, str] = field(default_factory=dict)


@dataclass
class ExportResult:
    """The outcome of :func:`export_run`.

    Attributes:
        out: the output directory (local absolute path or URI).
        manifest: path/URI of ``manifest.json`` (written last).
        which: ``"kept"`` or ``"flagged"``: which samples were written.
        read, kept, removed, quarantined, written, shard_failures, renamed: totals over the shards
            (``read = kept + removed + quarantined``; ``renamed`` counts renamed keys).
        shards: per input shard, in shard-id order.
        seconds: wall time.
    """

    out: str
    manifest: str
    which: str
    read: int
    kept: int
    removed: int
    quarantined: int
    written: int
    shard_failures: int
    renamed: int
    shards: list[ShardExport]
    seconds: float


# ------------------------------------------------------------------------------------------ names


def safe_key(key: str) -> str | None:
    """``key`` when it is safe as a member path inside an extraction directory, else None.

    Unsafe: empty, absolute (``/x``, ``C:x``), any ``.``/``..``/empty path component, a control
    character or a backslash.
    """
    if not key or key.startswith("/") or _DRIVE.match(key) or _BAD_CHARS.search(key):
        return None
    if any(p in ("", ".", "..") for p in key.split("/")):
        return None
    return key


def replacement_key(key: str) -> str:
    """The deterministic key written for an unsafe ``key``: ``renamed-<16 hex digits of BLAKE2b(key)>``."""
    h = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    return f"renamed-{h}"


def _safe_ext(ext: str) -> str:
    """A member's extension (the basename after its first '.', never holding '/') with control characters
    and backslashes replaced by '_'."""
    return _BAD_CHARS.sub("_", ext)


def _ext_of(name: str) -> str:
    """The extension as written in the member name (case kept, unlike ``_split_name``'s lookup form)."""
    b = posixpath.basename(name)
    return b.split(".", 1)[1] if "." in b else ""


# --------------------------------------------------------------------------------------- run dir


def _fs(path: str) -> tuple[Any, str]:
    from pyarrow import fs as pafs

    if cio.is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _read_run(run_dir: str) -> dict[str, Any]:
    """run.json of a finished run, after checking the directory and the tables exist.

    Raises:
        DataError: no such directory, no run.json (unfinished run), no scores/quarantine table.
    """
    from pyarrow import fs as pafs

    fs, p = _fs(run_dir)
    try:
        info = fs.get_file_info(p.rstrip("/"))
    except OSError as e:
        raise DataError(f"cannot reach run directory {run_dir}: {e}") from e
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"run directory {run_dir} does not exist")
    if info.type != pafs.FileType.Directory and not cio.is_remote(run_dir):
        raise DataError(f"run directory {run_dir} is not a directory")
    run_json = cio.join(run_dir, "run.json")
    if not cio.exists(run_json):
        raise DataError(f"run directory {run_dir} has no run.json: the run is unfinished (still running, or it "
                        f"stopped early); finish it first (re-running ctray detect with the same --out resumes)")
    try:
        run = cio.read_json(run_json)
    except ValueError as e:
        raise DataError(f"{run_json} is not valid JSON: {e}") from e
    if not run.get("finished") or not isinstance(run.get("train"), list):
        raise DataError(f"{run_json} has no 'finished' time or 'train' shard list: not a finished ctray run")
    for name in ("scores.parquet", "quarantine.parquet"):
        if not cio.exists(cio.join(run_dir, name)):
            raise DataError(f"run directory {run_dir} has run.json but no {name}")
    return run


def _check_inputs(paths: list[str], run_dir: str) -> None:
    """Every input shard of the run still exists: one listing per directory, not one request per shard.

    Raises:
        DataError: naming the first missing shards.
    """
    from pyarrow import fs as pafs

    by_dir: dict[str, list[str]] = collections.defaultdict(list)
    for p in paths:
        by_dir[p.rsplit("/", 1)[0] if cio.is_remote(p) else os.path.dirname(os.path.abspath(p))].append(p)
    missing: list[str] = []
    for d, ps in by_dir.items():
        try:
            fs, dp = _fs(d)
            found = {i.path for i in fs.get_file_info(pafs.FileSelector(dp, recursive=False, allow_not_found=True))
                     if i.type == pafs.FileType.File}
        except OSError as e:
            raise DataError(f"input shards of run {run_dir} are not reachable: cannot list {d}: {e}") from e
        missing.extend(p for p in ps if (p.split("://", 1)[1] if cio.is_remote(p) else p) not in found)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} input shard(s) of run {run_dir} no longer exist: "
                        f"{', '.join(missing[:3])}{more}")


def _prepare_out(out: str) -> None:
    """Create ``out``; it must be new or empty (never the run directory or an input directory)."""
    from pyarrow import fs as pafs

    fs, p = _fs(out)
    try:
        info = fs.get_file_info(p.rstrip("/"))
        if info.type == pafs.FileType.File:
            raise ConfigError(f"export output {out} is a file; give a new or empty directory")
        if info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(p.rstrip("/"), recursive=False))
            if entries:
                raise ConfigError(f"export output {out} is not empty ({len(entries)} entries, e.g. "
                                  f"{entries[0].base_name}); give a new or empty directory")
        fs.create_dir(p, recursive=True)
    except OSError as e:
        raise DataError(f"cannot create export output {out}: {e}") from e


def _shard_rows(path: str, shard: str, columns: list[str]) -> Any:
    """The rows of one shard of a run table (pyarrow Table), read with a row filter."""
    import pyarrow.parquet as pq

    fs, p = _fs(path)
    return pq.read_table(p, columns=columns, filters=[("shard", "==", shard)], filesystem=fs)


def _num_rows(path: str) -> int:
    import pyarrow.parquet as pq

    fs, p = _fs(path)
    with fs.open_input_file(p) as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


# ------------------------------------------------------------------------------------------ shard


class _Out:
    """One output shard, written to a temporary file and moved into place (local: rename in the same
    directory; remote: one upload of the finished file) only by :meth:`commit`."""

    def __init__(self, final: str):
        self.final = final
        if cio.is_remote(final):
            fd, self.tmp = tempfile.mkstemp(prefix="ctray-export-", suffix=".partial")
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            self.tmp = os.path.join(os.path.dirname(final),
                                    f".{os.path.basename(final)}.partial-{uuid.uuid4().hex[:8]}")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = MTIME
        info.mode = 0o644
        info.type = tarfile.REGTYPE
        info.uid = info.gid = 0
        info.uname = info.gname = "ctray"
        self.tar.addfile(info, io.BytesIO(data))

    def commit(self) -> None:
        self.tar.close()
        if cio.is_remote(self.final):
            from pyarrow import fs as pafs

            fs, p = _fs(self.final)
            pafs.copy_files(self.tmp, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            os.remove(self.tmp)
        else:
            os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.tar.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def _samples(f: BinaryIO, max_member: int) -> Iterator[tuple[str, list[tuple[str, bytes | None]]] | Exception]:
    """``(key, [(member name, bytes), ...])`` per sample in tar order, grouped as
    :func:`~ctray.data.shards.iter_shard` groups them (a new sample starts when the key changes or an
    extension repeats). A damaged tar ends with the exception: before it, the sample in progress is yielded
    when the damage lies in the next sample's member (it is complete), as the run's reader does. Keys are
    the run's (:func:`~ctray.data.shards._safe_key`); a link or device member has ``None`` bytes (the run
    quarantined its sample, so it is never written)."""
    from ctray.data.shards import _safe_key, _split_name, _tar_members

    cur: str | None = None
    exts: set[str] = set()
    members: list[tuple[str, bytes | None]] = []
    try:
        for name, data in _tar_members(f, max_member, _size_of(f)):
            key, ext = _split_name(name)
            if key != cur or ext in exts:
                if cur is not None:
                    yield _safe_key(cur), members
                cur, exts, members = key, set(), []
            exts.add(ext)
            members.append((name, data))
    except (tarfile.TarError, EOFError, ValueError) as e:
        nxt = getattr(e, "member", None)
        if cur is not None and nxt is not None and _split_name(nxt)[0] != cur:
            yield _safe_key(cur), members
        yield e
        return
    if cur is not None:
        yield _safe_key(cur), members


def _label_of(members: list[tuple[str, bytes | None]]) -> int | None:
    from ctray.data.shards import _split_name

    for name, data in members:
        if _split_name(name)[1] == "cls":
            try:
                return int((data or b"").decode("utf-8", "replace").strip())
            except ValueError:
                return None
    return None


def export_shard(path: str, shard: str, run_dir: str, out: str, which: Which = "kept",
                 max_member: int = MAX_MEMBER_BYTES) -> ShardExport:
    """Export one input shard of a run (one Ray task, or one loop step without Ray).

    Args:
        path: the input shard's path/URI as recorded in run.json.
        shard: its shard id (the run's ``shard`` column).
        run_dir: the finished run directory.
        out: the output directory; the shard goes to ``out/<shard>``.
        which: ``"kept"`` writes usable unflagged samples, ``"flagged"`` the flagged ones.

    Returns:
        The shard's counts; ``output`` is None when nothing was selected.

    Raises:
        DataError: the shard is unreadable now, or its samples do not match the run's tables (input
            changed since the run), naming the shard and key.
    """
    from ctray.data.shards import R_DUP, open_input

    sc = _shard_rows(cio.join(run_dir, "scores.parquet"), shard, ["key", "label", "flagged"])
    scored = {k: (int(lab), bool(fl)) for k, lab, fl in zip(
        sc.column("key").to_pylist(), sc.column("label").to_pylist(), sc.column("flagged").to_pylist(), strict=True)}
    del sc
    qt = _shard_rows(cio.join(run_dir, "quarantine.parquet"), shard, ["key", "level", "reason"])
    q_left: collections.Counter[str] = collections.Counter()
    q_dups: collections.Counter[str] = collections.Counter()  # later occurrences of a key (R_DUP)
    q_shard = 0
    for k, lev, reason in zip(qt.column("key").to_pylist(), qt.column("level").to_pylist(),
                              qt.column("reason").to_pylist(), strict=True):
        if lev == "shard":
            q_shard += 1
        elif reason == R_DUP:
            q_dups[k] += 1
        else:
            q_left[k] += 1
    del qt

    res = ShardExport(shard=shard, input=path)
    parts = shard.split("/")
    if any(p in ("", ".", "..") for p in parts) or _BAD_CHARS.search(shard):
        raise DataError(f"shard id {shard!r} of run {run_dir} is not a safe relative path; cannot name its output")
    final = cio.join(out, *parts)
    target: _Out | None = None
    seen: set[str] = set()
    written: set[str] = set()
    n_scored = 0

    def changed(key: str, why: str) -> DataError:
        return DataError(f"input shard {path} (shard {shard!r}) changed since run {run_dir}: key {key!r} {why}")

    try:
        try:
            f = open_input(path)
        except OSError as e:
            raise DataError(f"input shard {path} of run {run_dir} is not readable: {e}") from e
        try:
            for item in _samples(f, max_member):
                if isinstance(item, Exception):
                    res.shard_failures += 1
                    break
                key, members = item
                res.read += 1
                first = key not in seen
                seen.add(key)
                if first and key in scored:
                    label, flagged = scored[key]
                    n_scored += 1
                    got = _label_of(members)
                    if got != label:
                        raise changed(key, f"has label {got}, the run read {label}")
                    if flagged:
                        res.removed += 1
                    else:
                        res.kept += 1
                    if flagged != (which == "flagged"):
                        continue
                    new_key = safe_key(key)
                    exts = [_ext_of(n) for n, _ in members]
                    if new_key is None or any(_safe_ext(x) != x for x in exts):
                        new_key = new_key or replacement_key(key)
                        res.renamed[key] = new_key
                    if new_key in written:
                        raise DataError(f"shard {shard!r}: key {key!r} would be written as {new_key!r}, which "
                                        f"another sample of the shard already uses")
                    written.add(new_key)
                    if target is None:
                        target = _Out(final)
                    for (_, data), x in zip(members, exts, strict=True):
                        if data is None:  # cannot happen for a scored sample (the run quarantined it)
                            raise changed(key, "has a link or device member, which the run did not read")
                        target.add(f"{new_key}.{_safe_ext(x)}" if x else new_key, data)
                    res.written += 1
                elif not first and q_dups[key] > 0:
                    q_dups[key] -= 1
                    res.quarantined += 1
                elif q_left[key] > 0:
                    q_left[key] -= 1
                    res.quarantined += 1
                else:
                    raise changed(key, "is in neither scores.parquet nor quarantine.parquet")
        finally:
            f.close()
        if res.read == 0 and res.shard_failures == 0:
            res.shard_failures = 1  # an empty shard: one shard-level row in the run, as here
        if n_scored != len(scored):
            missing = next(k for k in scored if k not in seen)
            raise changed(missing, f"is in scores.parquet but not in the shard ({len(scored) - n_scored} missing)")
        left = [k for k, c in (q_left + q_dups).items() if c > 0]
        if left:
            raise changed(left[0], f"is quarantined in the run but not in the shard ({len(left)} such keys)")
        if res.shard_failures != q_shard:
            raise DataError(f"input shard {path} (shard {shard!r}) changed since run {run_dir}: the run recorded "
                            f"{q_shard} shard-level failure(s), the export found {res.shard_failures}")
        if target is not None:
            target.commit()
            res.output = shard
            target = None
    finally:
        if target is not None:
            target.abort()
    return res


# ------------------------------------------------------------------------------------------ driver


def _export_all(order: list[str], ids: dict[str, str], run_dir: str, out: str, which: Which, use_ray: bool,
                progress_every_s: float, max_member: int = MAX_MEMBER_BYTES) -> list[ShardExport]:
    """Run :func:`export_shard` for every input shard, in this process or as Ray tasks."""
    from ctray.progress import Progress

    prog = Progress(log, f"export {which}", len(order), unit="shards", every_s=progress_every_s)
    results: list[ShardExport] = []
    # One code path, two schedulers: export_shard is the whole per-shard job. With Ray (a cluster, many
    # shards) each shard is one task, so the copy runs where the CPUs and the network are; without it
    # (a laptop, a few shards) a plain loop avoids Ray's start-up, which costs more than copying a few
    # shards (the copy is I/O bound: no decoding).
    if use_ray:
        import ray

        opts: dict[str, Any] = {"num_cpus": TASK_CPUS, "max_retries": 2}
        if any(not cio.is_remote(x) for x in (out, run_dir, *order)):
            # local paths exist on this node only: run the tasks here
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=False)
        task = ray.remote(export_shard).options(**opts)
        pending: list[Any] = []
        todo = iter(order)
        try:
            while True:
                for p in todo:
                    pending.append(task.remote(p, ids[p], run_dir, out, which, max_member))  # type: ignore[call-arg]
                    if len(pending) >= MAX_IN_FLIGHT:
                        break
                if not pending:
                    break
                done, pending = ray.wait(pending, num_returns=1)
                for r in ray.get(done):
                    results.append(r)
                    _note(r)
                    prog.update()
        except BaseException:
            for ref in pending:  # one shard failed: stop the others (each cleans up its temporary file)
                ray.cancel(ref)
            if pending:  # let them end before the caller clears the output
                ray.wait(pending, num_returns=len(pending), timeout=30)
            raise
    else:
        for p in order:
            r = export_shard(p, ids[p], run_dir, out, which, max_member)
            results.append(r)
            _note(r)
            prog.update()
    prog.close()
    return results


def _clear(out: str, names: list[str]) -> None:
    """Remove the output shards ``names`` (relative to ``out``) that exist; errors are logged, not raised."""
    try:
        fs, p = _fs(out)
        for n in names:
            target = f"{p.rstrip('/')}/{n}"
            if fs.get_file_info(target).is_file:
                fs.delete_file(target)
    except OSError as e:
        log.warning("export failed and %s could not be cleared: %s", out, e)


def export_run(run_dir: str, out: str, *, which: Which = "kept", use_ray: bool = False,
               progress_every_s: float = 10.0) -> ExportResult:
    """Write the kept (or the flagged) samples of a finished run as WebDataset shards.

    One output shard per input shard, named by the input's shard id (``OUT/train-000000.tar``; inputs
    from several directories keep their relative subdirectory), holding the selected samples' members
    byte for byte in their input order. Shards with no selected sample are not written. Keys that are
    unsafe as paths (``../x``, ``/x``, control characters, backslashes) are written as
    ``renamed-<hash>`` and listed in the manifest. ``manifest.json`` is written last.

    Args:
        run_dir: a finished run directory (local or ``s3://`` / ``gs://``), with run.json.
        out: a new or empty output directory (local or ``s3://`` / ``gs://``).
        which: ``"kept"`` (usable and not flagged: the cleansed set) or ``"flagged"``.
        use_ray: one Ray task per shard (attaches to the running Ray, else starts one); default: a loop in
            this process. Ray workers need the object store's credentials in their environment (the
            cluster's, or a runtime_env) for remote inputs or outputs.
        progress_every_s: seconds between progress log lines (shards done, rate, ETA).

    Returns:
        An :class:`ExportResult` with totals, per-shard counts and the manifest path.

    Raises:
        DataError: missing or unfinished run directory, unreachable input shards, or input that changed
            since the run (names the path, shard and key).
        ConfigError: ``which`` is unknown, or ``out`` is not new/empty.
    """
    from ctray.data.shards import shard_ids

    if which not in WHICH:
        raise ConfigError(f"export: which must be one of {WHICH}, got {which!r}")
    t0 = time.monotonic()
    run_dir = run_dir if cio.is_remote(run_dir) else os.path.abspath(run_dir)
    out = out if cio.is_remote(out) else os.path.abspath(out)
    run = _read_run(run_dir)
    # local paths absolute (run.json holds them as detect was given them, relative to its working
    # directory); Ray workers have another one. Shard ids are the same either way (shard_ids uses abspath).
    paths = [str(p) if cio.is_remote(str(p)) else os.path.abspath(str(p)) for p in run["train"]]
    if not paths:
        raise DataError(f"{cio.join(run_dir, 'run.json')} lists no train shards")
    ids = shard_ids(paths)
    _check_inputs(paths, run_dir)
    _prepare_out(out)
    order = sorted(paths, key=lambda p: ids[p])
    try:
        # the run's member cap (data.max_member_bytes), so the export parses each shard as the run did
        results = _export_all(order, ids, run_dir, out, which, use_ray, progress_every_s,
                              int(run.get("max_member_bytes") or MAX_MEMBER_BYTES))
    except BaseException:
        _clear(out, [ids[p] for p in order])  # a failed export leaves no shard behind (out was new or empty)
        raise
    results.sort(key=lambda r: r.shard)


    tot = {k: sum(getattr(r, k) for r in results)
           for k in ("read", "kept", "removed", "quarantined", "written", "shard_failures")}
    n_renamed = sum(len(r.renamed) for r in results)
    n_written = sum(r.output is not None for r in results)
    _check_totals(run_dir, run, tot)
    manifest_path = cio.join(out, "manifest.json")
    manifest = {"source": "export", "run_dir": run_dir, "mode": which, "ctray_version": __version__,
                "num_classes": run.get("num_classes"), "image_shape": run.get("image_shape"),
                "counts": {**tot, "renamed": n_renamed, "shards_read": len(results),
                           "shards_written": n_written},
                "shards": [r.output for r in results if r.output is not None],
                "per_shard": [asdict(r) for r in results]}
    cio.write_json(manifest_path, manifest)  # last: a directory without it is incomplete
    secs = time.monotonic() - t0
    log.info("export %s: read %d samples (%d kept, %d removed, %d quarantined); wrote %d samples in %d shards "
             "to %s (%.1fs)", which, tot["read"], tot["kept"], tot["removed"], tot["quarantined"], tot["written"],
             n_written, out, secs)
    return ExportResult(out=out, manifest=manifest_path, which=which, read=tot["read"], kept=tot["kept"],
                        removed=tot["removed"], quarantined=tot["quarantined"], written=tot["written"],
                        shard_failures=tot["shard_failures"], renamed=n_renamed, shards=results, seconds=secs)


def _note(r: ShardExport) -> None:
    log.debug("export: %s: read %d, kept %d, removed %d, quarantined %d", r.shard, r.read, r.kept, r.removed,
              r.quarantined)
    for k, v in r.renamed.items():
        log.warning("export: shard %s: key %r is unsafe as a member name; written as %r", r.shard, k, v)


def _check_totals(run_dir: str, run: dict[str, Any], tot: dict[str, int]) -> None:
    """The shards' sums equal the run's tables and counts (catches rows of shards the run does not list).

    Raises:
        DataError: naming the count that differs.
    """
    n_scores = _num_rows(cio.join(run_dir, "scores.parquet"))
    if tot["kept"] + tot["removed"] != n_scores:
        raise DataError(f"export of {run_dir}: the shards hold {tot['kept'] + tot['removed']} scored samples, "
                        f"scores.parquet has {n_scores} rows")
    counts = run.get("counts") or {}
    want = {"read": counts.get("read"), "quarantined": counts.get("quarantined"), "removed": counts.get("flagged"),
            "shard_failures": counts.get("shard_failures")}
    for k, v in want.items():
        if v is not None and int(v) != tot[k]:
            raise DataError(f"export of {run_dir}: {k} = {tot[k]} over the shards, run.json counts {v}")
