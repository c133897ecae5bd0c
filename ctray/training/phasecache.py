"""A cache of finished CT phases shared by the runs of a sweep: f_base and round 0's pretrained model.

f_base (the base model that labels the reserve's confusion batches) and base_0 (round 0's pretraining on
all of D) are the two phases that cost passes over all of D, and they depend on the data and on a few
config fields (:func:`fbase_fields`, :func:`base0_fields`: ``base.*`` or the pretraining fields, the seed,
the canaries planted in D, the input normalisation, the worker layout) that a sweep of CT's confusion
knobs does not vary. So the first run that needs one trains it and publishes it here; every later run
with the same key copies it into its own run directory and trains none.

Layout under the cache root (a local directory or an ``s3://`` / ``gs://`` URI, e.g. the sweep's
``OUT/cache``)::

    <kind>/<key>/blob-<uuid>.pt   the weights (a ctray model file), written first
    <kind>/<key>/entry.json       {key, blob, sha256, bytes, created, fields}: written last, one PUT

(``kind`` = ``fbase`` or ``base0``.)

An entry exists only once its ``entry.json`` does, and a reader checks the blob's SHA-256 against it, so a
writer killed mid-write (before or during either file) leaves nothing another run can read: at most an
orphan blob, which :func:`evict` removes once it is an hour old. Two writers of one key both write whole
entries of the same meaning; the last ``entry.json`` wins and each names its own blob.

Runs at once (a sweep's concurrent trials, on any node) coordinate through :class:`Claims`, one named
actor per cache root that the sweep starts: the first run to miss claims the key and trains; the others
wait for the entry. A claim is a lease the trainer renews every ``LEASE_S / 4`` s; a trainer that dies
without releasing it (SIGKILL, a lost node) stops renewing, and after ``LEASE_S`` the next run claims
the key and trains. Without the actor (plain ``ctray detect`` with ``io.phase_cache``) runs only look up
and publish.

Bound: after each publish the entries beyond ``max_bytes`` are removed, oldest first (never the one just
written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from ctray import io as cio

log = logging.getLogger(__name__)

#: Seconds a claim lives without renewal.
LEASE_S = 120.0
#: Age after which a blob without an entry is an orphan of a killed writer.
ORPHAN_S = 3600.0
ENTRY = "entry.json"
KIND_FBASE = "fbase"
KIND_BASE0 = "base0"
#: The phases the cache holds, in the order round 0 trains them.
KINDS = (KIND_FBASE, KIND_BASE0)
#: Ray namespace of the claims actors.
NAMESPACE = "ctray"


@dataclass
class Entry:
    """A published phase: ``blob`` (path or URI of the weights), ``sha256`` (hex of its bytes), ``bytes``,
    ``created`` (Unix seconds), ``fields`` (what the key was made of, for a person reading the cache)."""

    key: str
    blob: str
    sha256: str
    bytes: int
    created: float
    fields: dict[str, Any]


def _shard_sizes(paths: list[str]) -> list[int | None]:
    """Each shard's size in bytes (None if missing), one batched metadata call per filesystem (thousands
    of object-store shards must not cost thousands of sequential requests)."""
    from pyarrow import fs as pafs

    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(p.split("://", 1)[0] if cio.is_remote(p) else "", []).append(i)
    out: list[int | None] = [None] * len(paths)
    for idx in groups.values():
        fs, _ = cio._fs(paths[idx[0]])
        # a URI's path in its filesystem is what follows the scheme (FileSystem.from_uri's second value)
        rel = [paths[i].split("://", 1)[1] if cio.is_remote(paths[i]) else os.path.abspath(paths[i]) for i in idx]
        for i, info in zip(idx, fs.get_file_info(rel), strict=True):
            out[i] = int(info.size) if info.type == pafs.FileType.File else None
    return out


def _common_fields(cfg: Any, train: list[str], clean: list[str]) -> dict[str, Any]:
    """What every phase of round 0 depends on: the data (shard paths and sizes, the reserve included: the
    normalisation and class count are the run's), the seed, the canaries planted in D, the data settings,
    the N-proportional phases' batch scaling and the worker layout. Left out on purpose: thread counts,
    memory budgets and scoring resources (they do not change what a phase learns)."""
    from ctray._version import __version__
    from ctray.config import DATA_RESOURCE_KEYS

    d = cfg.to_dict()
    data = {k: v for k, v in d["data"].items() if k not in DATA_RESOURCE_KEYS
            and k not in ("cache_bytes", "worker_cache_bytes")}
    return {"version": __version__, "train": list(train), "train_bytes": _shard_sizes(list(train)),
            "clean": list(clean), "clean_bytes": _shard_sizes(list(clean)), "seed": d["seed"], "canary": d["canary"],
            "data": data, "batch_scale": d["ct"].get("batch_scale", 1), "warmup_epochs": d["ct"].get("warmup_epochs"),
            "workers": d["scale"]["num_workers"], "use_gpu": d["scale"]["use_gpu"]}


def fbase_fields(cfg: Any, train: list[str], clean: list[str]) -> dict[str, Any]:
    """Everything f_base's weights depend on: :func:`_common_fields` and ``base.*``."""
    d = cfg.to_dict()
    return {**_common_fields(cfg, train, clean), "base": {k: v for k, v in d["base"].items() if k != "checkpoint"}}


def base0_fields(cfg: Any, train: list[str], clean: list[str]) -> dict[str, Any]:
    """Everything round 0's pretrained model (base_0, trained on all of D from CT's seeded init) depends
    on: :func:`_common_fields`, CT's architecture and the pretraining fields of round 0 (not f_base: its
    predictions only enter the confusion phase)."""
    ct = cfg.to_dict()["ct"]
    pre = {k: ct[k] for k in ("arch", "pretrain_lr", "pretrain_momentum", "pretrain_batch_size",
                              "pretrain_weight_decay")}
    pre["pretrain_epochs_0"] = ct["pretrain_epochs"][0]
    pre["pretrain_ref_n"] = ct.get("pretrain_ref_n", 0)  # with N (the shard sizes): round 0's epochs
    pre["reserve_in_pretrain"] = ct["reserve_in_pretrain_from"] <= 0
    return {**_common_fields(cfg, train, clean), "kind": KIND_BASE0, "pretrain": pre}


def key_of(fields: dict[str, Any]) -> str:
    """The cache key of ``fields``: 24 hex digits of their SHA-256 (sorted JSON)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def lookup(root: str, kind: str, key: str) -> Entry | None:
    """The entry of ``key``, or None when there is none or it is unreadable (logged)."""
    path = cio.join(root, kind, key, ENTRY)
    try:
        d = cio.read_json(path)
    except (FileNotFoundError, OSError):
        return None
    except ValueError as e:  # a partial entry cannot exist (one PUT), but a hand-edited one can
        log.warning("phase cache: %s is not valid JSON (%s): ignored", path, e)
        return None
    try:
        return Entry(key=d["key"], blob=cio.join(root, kind, key, d["blob"]), sha256=d["sha256"], bytes=int(d["bytes"]),
                     created=float(d["created"]), fields=d.get("fields", {}))
    except (KeyError, TypeError, ValueError) as e:
        log.warning("phase cache: %s lacks %s: ignored", path, e)
        return None


def read_blob(entry: Entry) -> bytes | None:
    """The entry's weights, or None when the blob is gone or its bytes are not the entry's (logged)."""
    try:
        raw = cio.read_bytes(entry.blob)
    except (FileNotFoundError, OSError) as e:
        log.warning("phase cache: %s cannot be read (%s): a miss", entry.blob, e)
        return None
    if hashlib.sha256(raw).hexdigest() != entry.sha256:
        log.warning("phase cache: %s does not have the bytes its entry names (sha256): a miss", entry.blob)
        return None
    return raw


def publish(root: str, kind: str, key: str, raw: bytes, fields: dict[str, Any], max_bytes: int = 0,
            _after_blob: Any = None) -> Entry:
    """Add ``raw`` (the phase's weights) as the entry of ``key``: the blob first, ``entry.json`` last.
    Then :func:`evict` down to ``max_bytes`` (0 = unbounded). ``_after_blob`` is a test hook called
    between the two writes."""
    name = f"blob-{uuid.uuid4().hex}.pt"
    cio.write_bytes(cio.join(root, kind, key, name), raw)
    if _after_blob is not None:
        _after_blob()
    entry = Entry(key=key, blob=cio.join(root, kind, key, name), sha256=hashlib.sha256(raw).hexdigest(),
                  bytes=len(raw), created=time.time(), fields=fields)
    cio.write_json(cio.join(root, kind, key, ENTRY), {**asdict(entry), "blob": name})  # blob: relative in the file
    log.info("phase cache: published %s %s (%.1f MB)", kind, key, len(raw) / 1e6)
    if max_bytes > 0:
        evict(root, kind, max_bytes, keep=key)
    return entry


def evict(root: str, kind: str, max_bytes: int, keep: str | None = None) -> list[str]:
    """Remove entries of ``kind``, oldest first, until their blobs total at most ``max_bytes`` (``keep``
    stays whatever its size), and blobs no entry names that are older than :data:`ORPHAN_S` (a killed
    writer's). Returns the removed keys."""
    from pyarrow import fs as pafs

    fs, base = cio._fs(cio.join(root, kind))
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (FileNotFoundError, OSError):
        return []
    files: dict[str, list[Any]] = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            rel = info.path[len(base.rstrip("/")) + 1:]
            if "/" in rel:
                files.setdefault(rel.split("/", 1)[0], []).append(info)
    now = time.time()
    live: list[tuple[float, str, int]] = []
    for k, group in files.items():
        e = lookup(root, kind, k)
        named = e.blob.rsplit("/", 1)[-1] if e is not None else None
        for info in group:
            nm = info.path.rsplit("/", 1)[-1]
            mtime = info.mtime.timestamp() if info.mtime is not None else now
            if nm.startswith("blob-") and nm != named and now - mtime > ORPHAN_S:
                fs.delete_file(info.path)
        if e is not None:
            live.append((e.created, k, e.bytes))
    total = sum(b for _, _, b in live)
    removed: list[str] = []
    for _, k, b in sorted(live):
        if total <= max_bytes:
            break
        if k == keep:
            continue
        fs.delete_dir(f"{base.rstrip('/')}/{k}")
        total -= b
        removed.append(k)
        log.info("phase cache: evicted %s %s (%.1f MB) to stay within %.1f MB", kind, k, b / 1e6, max_bytes / 1e6)
    return removed


# ------------------------------------------------------------------------------------------ claims


class Claims:
    """Who is computing which key now (a Ray actor: :func:`start_claims`). ``claim`` grants a key to
    one owner at a time; a claim not renewed for ``lease_s`` seconds may be taken over."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, float]] = {}

    def claim(self, key: str, owner: str, lease_s: float = LEASE_S) -> bool:
        now = time.monotonic()
        cur = self._held.get(key)
        if cur is None or cur[0] == owner or now - cur[1] > lease_s:
            self._held[key] = (owner, now)
            return True
        return False

    def renew(self, key: str, owner: str) -> bool:
        cur = self._held.get(key)
        if cur is None or cur[0] != owner:
            return False
        self._held[key] = (owner, time.monotonic())
        return True

    def release(self, key: str, owner: str) -> None:
        if self._held.get(key, ("",))[0] == owner:
            del self._held[key]

    def holder(self, key: str) -> str | None:
        cur = self._held.get(key)
        return cur[0] if cur is not None else None


def claims_name(root: str) -> str:
    return "ctray-phase-claims-" + hashlib.sha256(root.encode()).hexdigest()[:16]


def start_claims(root: str) -> Any:
    """The claims actor of ``root`` (started if absent; it lives as long as the caller's job): the sweep
    driver starts it so that every trial finds it by name."""
    import ray

    return ray.remote(num_cpus=0)(Claims).options(name=claims_name(root), namespace=NAMESPACE,
                                                    get_if_exists=True).remote()


def find_claims(root: str) -> Any:
    """The claims actor of ``root``, or None (no sweep started one)."""
    import ray

    if not ray.is_initialized():  # no Ray here, so no sweep either (and do not start one to ask)
        return None
    try:
        return ray.get_actor(claims_name(root), namespace=NAMESPACE)
    except ValueError:
        return None


class Lease:
    """A granted claim, renewed by a daemon thread until :meth:`release`."""

    def __init__(self, claims: Any, key: str, owner: str, lease_s: float = LEASE_S) -> None:
        self.claims, self.key, self.owner = claims, key, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, args=(lease_s / 4,), daemon=True,
                                        name=f"phase-cache-lease-{key[:8]}")
        self._thread.start()

    def _renew(self, every: float) -> None:
        import ray

        while not self._stop.wait(every):
            try:
                ray.get(self.claims.renew.remote(self.key, self.owner))
            except Exception as e:  # the sweep's driver is gone: nobody waits on this claim any more
                log.warning("phase cache: cannot renew the claim on %s: %s", self.key, e)
                return

    def release(self) -> None:
        import ray

        self._stop.set()
        try:
            ray.get(self.claims.release.remote(self.key, self.owner))
        except Exception as e:
            log.warning("phase cache: cannot release the claim on %s: %s", self.key, e)


def acquire(root: str, kind: str, key: str, *, poll_s: float = 2.0, lease_s: float = LEASE_S,
            timeout_s: float | None = None) -> tuple[Entry | None, bytes | None, Lease | None]:
    """Find the entry of ``key`` or the right to compute it.

    Returns ``(entry, blob, None)`` on a hit; ``(None, None, lease)`` when this caller must compute and
    publish the phase and then ``lease.release()`` (also on failure); ``(None, None, None)`` when there
    is no claims actor (compute, publish; nobody waits). While another owner holds the claim it waits,
    polling every ``poll_s``, until the entry appears or the claim lapses (``lease_s`` without renewal).
    """
    import ray

    claims = find_claims(root)
    owner = uuid.uuid4().hex
    t0 = time.monotonic()
    said = False
    while True:
        e = lookup(root, kind, key)
        raw = read_blob(e) if e is not None else None
        if e is not None and raw is not None:
            return e, raw, None
        if claims is None:
            return None, None, None
        if ray.get(claims.claim.remote(key, owner, lease_s)):
            return None, None, Lease(claims, key, owner, lease_s)
        if not said:
            log.info("phase cache: another run is computing %s %s; waiting for it", kind, key)
            said = True
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"phase cache: {kind} {key} still claimed after {timeout_s:.0f}s")
        time.sleep(poll_s)
