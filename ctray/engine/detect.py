"""The detection driver: ``detect(config) -> DetectResult`` (DESIGN.md §1).

A straight line: read D and R through Ray Data (bad input -> quarantine rows); per round one Ray Train
fit (f_base with round 0, then pretraining + confusion training); score ALL of D through Ray Data;
distill in the NumPy core; after the final round, per-class PCA (map_groups) + likelihood-ratio test;
write the run directory. Each round is checkpointed; re-running with the same run directory resumes.
Only per-sample scalars reach the driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctray import io as cio
from ctray._version import __version__
from ctray.config import DATA_RESOURCE_KEYS, Config, load_config
from ctray.engine.cluster import ensure_ray, scaling, train_data_config
from ctray.engine.ground import (
    cache_budget,
    choose_preset,
    estimate_samples,
    load_npy,
    load_npz,
    resolve_inputs,
    save_npy,
    save_npz,
)
from ctray.engine.results import DetectResult
from ctray.errors import ConfigError, CtrayError, DataError, RunDirMismatchError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- run


def detect(cfg: Config, on_round: Callable[[dict[str, Any]], None] | None = None) -> DetectResult:
    """Run Confusion Training over ``cfg.io.train`` with the reserve ``cfg.io.clean``; write ``cfg.io.out``.

    Args:
        cfg: the resolved config.
        on_round: optional callback, called after each round run here (not for rounds resumed from
            disk) with a dict: ``round``, ``rounds``, ``final`` (bool), ``kept``, ``kept_canaries``,
            ``canary_kept_share`` (kept canaries / canaries, None without canaries) and
            ``poison_kept_share`` (kept truth poison / poison, None without truth); the final call
            (after the decision and the outputs) adds ``n_flagged``, ``flag_rate`` (flagged real
            samples / real samples), ``canary_recall`` (None without canaries), ``cleansed`` and
            ``metrics`` (with truth). ``ctray sweep`` reports these to Ray Tune.

    Returns:
        A :class:`DetectResult`; the run directory holds scores.parquet (one row per usable sample,
        ``score`` in [0, 1], higher = more suspicious), quarantine.parquet, shards.parquet,
        decisions.json, rounds.json, metrics.json (with truth), config.yaml, run.json, report.html.

    Raises:
        ConfigError / DataError: bad config or unusable input (named); ConfigError also when another
        live run holds the run directory (:class:`ctray.engine.rundir.RunLock`).
    """
    from ctray.engine.rundir import RunLock, prepare_run_dir

    # everything a user can get wrong is checked before Ray starts (seconds, not a cluster start-up)
    cfg.validate()
    if not cfg.io.out:
        raise ConfigError("no run directory: give --out (io.out)")
    t_start = time.time()
    inputs = resolve_inputs(cfg)
    out = prepare_run_dir(cfg.io.out)
    with RunLock(out):
        return _detect_locked(cfg, on_round, out, inputs, t_start)


@dataclass
class _Run:
    """One detection run's state, passed from phase to phase (the driver's per-sample arrays are in the
    driver's order: real samples by id, then canaries)."""

    cfg: Config
    out: str
    t_start: float
    train_paths: list[str]
    clean_paths: list[str]
    spec: Any
    n_cls: int | None
    state: dict[str, Any]
    secs: dict[str, float] = field(default_factory=dict)
    # set by _read
    cached: bool = False
    ident: Any = None
    r_usable: Any = None
    d_final: Any = None
    d_usable: Any = None
    can_usable: Any = None
    cplan: Any = None
    sids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int16))
    lab_dt: Any = np.int16
    C: int = 0
    n_real: int = 0
    index: Any = None
    truth: tuple[np.ndarray, np.ndarray] | None = None
    # set by _resume and the rounds
    round_losses: list[np.ndarray] = field(default_factory=list)
    rounds_info: list[dict[str, Any]] = field(default_factory=list)
    keep: np.ndarray | None = None
    fbase_ckpt: str | None = None
    fbase_from: str = ""  # "trained", "cache" (io.phase_cache), "given" (base.checkpoint), "resumed"
    base0_ckpt: str | None = None  # round 0's pretrained model from the phase cache (its directory)
    base0_from: str = "trained"
    phase_cache: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> where round 0 publishes it
    leases: list[Any] = field(default_factory=list)  # claims held while this run trains those (phasecache.Lease)
    prev_ckpt: str | None = None
    final_scores: dict[str, np.ndarray] | None = None
    agg: Any = None
    scaling_cfg: Any = None  # Ray Train's ScalingConfig and the torch threads per worker (cluster.scaling)
    threads: int = 1
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # driver memory after each phase (MB)

    def mark(self, phase: str) -> None:
        """Record this process's resident memory after ``phase`` (run.json ``driver_memory_mb``), after
        giving the C heap's free pages back (:func:`ctray.memory.release_free_memory`)."""
        from ctray.memory import release_free_memory

        release_free_memory()
        m = _process_memory()
        if m:
            self.memory[phase] = m
            log.debug("driver memory after %s: %s", phase, m)

    @property
    def N(self) -> int:  # noqa: N802 - the paper's name for |D|
        return len(self.sids)

    @property
    def pretrain_epochs(self) -> list[int]:
        """Each round's pretraining epochs at this N (``ct.pretrain_ref_n``; the config's when unset)."""
        from ctray.core.cost import scaled_pretrain_epochs

        return scaled_pretrain_epochs(self.cfg.ct.pretrain_epochs, self.N, self.cfg.ct.pretrain_ref_n)

    @property
    def n_can(self) -> int:
        return self.N - self.n_real

    @property
    def state_path(self) -> str:
        return cio.join(self.out, "state.json")

    @property
    def storage(self) -> str:
        return os.path.abspath(cio.join(self.out, "train")) if not cio.is_remote(self.out) else cio.join(self.out, "train")


def _detect_locked(cfg: Config, on_round: Callable[[dict[str, Any]], None] | None, out: str,
                   inputs: tuple[list[str], list[str], Any, int | None], t_start: float) -> DetectResult:
    """:func:`detect` once the inputs are resolved and the run directory is ``out``, locked: read, resume,
    the rounds, the decision, the outputs."""
    train_paths, clean_paths, spec, n_cls = inputs
    run = _Run(cfg, out, t_start, train_paths, clean_paths, spec, n_cls, _load_state(cfg, out, train_paths, clean_paths))
    ensure_ray(cfg)
    run.mark("start")
    _read(run)
    run.mark("read")
    if run.pretrain_epochs != list(cfg.ct.pretrain_epochs):
        log.info("ct.pretrain_ref_n=%d: pretraining epochs %s at N = %d (given %s for N = %d)", cfg.ct.pretrain_ref_n,
                 run.pretrain_epochs, run.N, list(cfg.ct.pretrain_epochs), cfg.ct.pretrain_ref_n)
    run.scaling_cfg, run.threads = scaling(cfg)
    _resume(run)
    _supplied_fbase(run)
    _cached_phases(run)
    try:
        for r in range(len(run.state["rounds"]), cfg.ct.rounds):
            _round(run, r, on_round)
            run.mark(f"round {r + 1}")
    finally:
        _release_leases(run)  # on failure too: a waiting run then claims the key and trains
    if run.final_scores is None:  # every round was done before: rescore the final model for the decision
        assert run.prev_ckpt is not None  # rounds >= 1 (validated) and all were done: the resume loop set it
        run.final_scores, run.agg = _final_pass(run, run.prev_ckpt, "final rescoring pass")
        run.final_scores.pop("loss")
    outcome = _decide(run)
    run.mark("decide")
    result, final_info = _write_outputs(run, outcome)
    del outcome
    _report(run)
    if on_round is not None:
        on_round(final_info)
    return result


def _report(run: _Run) -> None:
    """report.html, after the driver dropped its per-sample arrays (written to scores.parquet by now), so
    the run's memory peak is not the report's pass on top of them."""
    import gc

    from ctray.memory import release_free_memory
    from ctray.report import write_report

    run.final_scores, run.round_losses, run.truth = None, [], None
    run.sids = run.labels = np.empty(0, np.int64)
    run.index = run.keep = None
    gc.collect()
    release_free_memory()
    try:
        write_report(run.out)  # a remote run directory is staged locally and the page uploaded
    except Exception:  # the report is a view; a plotting failure must not lose the run's results
        log.exception("report.html could not be written; results are in %s", run.out)
    assert run.ident is not None
    run.ident.store.close()


def _load_state(cfg: Config, out: str, train_paths: list[str], clean_paths: list[str]) -> dict[str, Any]:
    """The resume state of ``out`` (rounds done), or a fresh one; checked before Ray starts.

    Raises:
        DataError: state.json is unreadable (named, with how to recover).
        RunDirMismatchError: it belongs to another config or other inputs.
    """
    fp = _fingerprint(cfg, train_paths, clean_paths)
    state_path = cio.join(out, "state.json")
    if not cio.exists(state_path):
        return {"fingerprint": fp, "rounds": []}
    try:
        old = cio.read_json(state_path)
        if not isinstance(old, dict) or not isinstance(old.get("rounds"), list):
            raise ValueError("not a ctray resume state (no list of rounds)")
    except (OSError, ValueError) as e:
        raise DataError(f"the resume state {state_path} is unreadable ({e}); it records which rounds are done: "
                        "delete it to recompute every round in this run directory, or give a new --out") from None
    if old.get("fingerprint") != fp:
        raise RunDirMismatchError(f"run directory {out} holds a run with another config or inputs "
                                  f"(fingerprint {old.get('fingerprint')} != {fp}); use a new --out")
    if old["rounds"]:
        log.info("resuming %s: %d of %d rounds already done", out, len(old["rounds"]), cfg.ct.rounds)
    return old


def _read(run: _Run) -> None:
    """Read D and R (bad input -> quarantine rows); the identity pass; canaries; the driver's order.

    The memory model (data.cache_bytes): decoded D is cached in the object store only when it fits the
    budget (twice: the read rows and the scoring view coexist while the view is built); otherwise nothing
    of D is held and every pass re-reads and re-decodes the shards."""
    from ctray.core.budget import decoded_bytes, fits
    from ctray.core.index import SampleIndex, label_dtype
    from ctray.data.reader import TRAIN_COLUMNS, read_shards, usable
    from ctray.engine.aggregate import scoring_view, with_sources
    from ctray.engine.canary import canary_dataset, plan_canaries
    from ctray.engine.identity import preserve_order, read_identity, truth_by_sid
    from ctray.engine.score import PROJECT_CPUS, collect_scores

    cfg, spec = run.cfg, run.spec
    t = time.monotonic()
    n_est = estimate_samples(run.train_paths)
    budget = cache_budget(cfg)
    run.cached = fits(2 * n_est, spec.shape, budget)
    log.info("D: about %d samples of %s (%.0f MB decoded); %s (data.cache_bytes: %.0f MB)", n_est, spec.shape,
             decoded_bytes(n_est, spec.shape) / 1e6,
             "cached in the object store" if run.cached else "streamed from the shards in every pass", budget / 1e6)
    ds_all = with_sources(read_shards(run.train_paths, spec, run.n_cls, num_cpus=cfg.data.read_cpus,
                                      strict=cfg.data.strict), cfg.data.read_cpus)
    if run.cached:
        with preserve_order():
            ds_all = ds_all.materialize()
    # identity pass: ids and labels on the driver (sorted by id: the driver's sample order and tie-break,
    # the same on every run), identity strings to a local Parquet store, quarantined rows' reasons
    ident = run.ident = read_identity(ds_all, cfg.data.read_cpus)
    ds_r = read_shards(run.clean_paths, spec, run.n_cls, num_cpus=cfg.data.read_cpus, strict=cfg.data.strict).materialize()
    r_ident = collect_scores(ds_r, ("ok", "label", "reason"))
    run.secs["read"] = time.monotonic() - t
    log.info("read %d train samples from %d shards: %d usable, %d quarantined, %d shard failures (%.1fs)",
             ident.n_read, len(run.train_paths), ident.n_usable, ident.n_quarantined, ident.n_shard_failures,
             run.secs["read"])
    if ident.n_usable == 0:
        raise DataError(f"no usable train sample in {len(run.train_paths)} shards (see quarantine reasons)")
    r_ok = r_ident["ok"].astype(bool)
    if int(r_ok.sum()) == 0:
        raise DataError(f"no usable sample in the clean reserve {run.clean_paths[:3]}")
    if int((~r_ok).sum()):
        log.warning("clean reserve: %d samples quarantined", int((~r_ok).sum()))
    sids, labels = ident.sids, ident.labels  # the driver's order: ids ascending (+ canaries appended below)
    if len(sids) > 1 and bool(np.any(sids[1:] == sids[:-1])):
        raise DataError("two usable samples share one (shard, key) id; shard ids must be unique")
    C = run.C = int(run.n_cls or max(int(labels.max()), int(r_ident["label"][r_ok].max())) + 1)
    if C < 2:
        raise DataError("CT needs at least 2 classes")
    run.lab_dt = label_dtype(C)
    labels = labels.astype(run.lab_dt, copy=False)
    # the usable rows with the scoring columns: every round's training and scoring pass reads these (cached:
    # the blocks of a materialized view, and the read rows are released; streamed: a re-read of the shards)
    d_final = scoring_view(ds_all, cfg.data.read_cpus)  # + shard, source for the shard/source tables
    # defender canaries (sweep): appended after the real samples; every array below covers both, every
    # user-facing output only the first n_real entries
    run.n_real = len(sids)
    run.cplan = plan_canaries(sids, labels, None, None, C, cfg.canary.rate, cfg.canary.min_count,
                              cfg.canary.target, cfg.seed, names=ident.store.names)
    if run.cplan is not None:
        can = canary_dataset(ds_all, run.cplan, cfg.data.read_cpus)
        d_final = d_final.union(scoring_view(can, cfg.data.read_cpus))
        # the canaries' training columns (materialized: 0.2% of D or so)
        run.can_usable = scoring_view(can, cfg.data.read_cpus).select_columns(list(TRAIN_COLUMNS),
                                                                              num_cpus=PROJECT_CPUS)
        sids = np.concatenate([sids, run.cplan.sids])
        labels = np.concatenate([labels, np.full(len(run.cplan), run.cplan.target, run.lab_dt)])
        if len(np.unique(sids)) != len(sids):
            raise DataError("a canary id collides with a sample id; change seed")
    run.d_final = d_final.materialize() if run.cached else d_final
    del ds_all
    run.d_usable = run.d_final.select_columns(list(TRAIN_COLUMNS), num_cpus=PROJECT_CPUS)
    run.sids, run.labels = sids, labels
    # Driver memory per sample (data.* budgets do not cover it; README "Memory model"): sid 8 B, label 2 B,
    # a float32 loss per round, the final pred/prob/projections 14 B, flags and truth 3 B; every pass writes
    # into preallocated arrays by sample id (ColumnFiller), never a list of batches or an aligned copy
    run.index = SampleIndex(sids)
    run.r_usable = usable(ds_r).materialize()
    if cfg.io.truth:
        p, c = truth_by_sid(cfg.io.truth, ident.sids)
        run.truth = (np.r_[p, np.zeros(run.n_can, bool)], np.r_[c, np.zeros(run.n_can, bool)]) if run.n_can else (p, c)


def _resume(run: _Run) -> None:
    """Load the rounds already done. A damaged file of a done round (losses, kept set, checkpoint) is
    never used: that round and the later ones are recomputed (their checkpoints and Train storage
    discarded first)."""
    from ctray.core.index import ColumnFiller
    from ctray.models.checkpoint import read_checkpoint
    from ctray.training.loop import CONFUSED, FBASE

    state, out = run.state, run.out
    for i, rs in enumerate(state["rounds"]):
        try:
            saved = load_npz(cio.join(out, rs["losses"]))
            filler = ColumnFiller(run.index, {"loss": np.float32})
            filler.add(saved["sid"], saved)
            losses_i = filler.finish(f"{rs['losses']} (round {rs['info']['round']})")["loss"]
            del saved, filler
            keep_i = load_npy(cio.join(out, rs["kept"])) if rs.get("kept") else None
            if keep_i is not None and (keep_i.dtype != np.int64 or not np.all(run.index.positions(keep_i)[1])):
                raise ValueError(f"{rs['kept']} does not hold this run's sample ids")
            read_checkpoint(cio.join(rs["ckpt"], CONFUSED))
            if i == 0:
                read_checkpoint(cio.join(state["fbase_ckpt"], FBASE))
        except (OSError, ValueError, KeyError, EOFError, RuntimeError, CtrayError, zipfile.BadZipFile) as e:
            log.warning("resume: round %d's files are damaged (%s): recomputing rounds %d..%d", i + 1,
                        f"{type(e).__name__}: {e}"[:300], i + 1, run.cfg.ct.rounds)
            _discard_rounds(out, run.storage, range(i, run.cfg.ct.rounds))
            state["rounds"] = state["rounds"][:i]
            if i == 0:
                state.pop("fbase_ckpt", None)
            cio.write_json(run.state_path, state)
            break
        run.round_losses.append(losses_i)
        run.fbase_ckpt = state["fbase_ckpt"]
        run.prev_ckpt = rs["ckpt"]
        run.keep = keep_i
        run.rounds_info.append(rs["info"])


def fbase_sample(sids: np.ndarray, n_real: int, max_samples: int, seed: int) -> np.ndarray | None:
    """The sample ids f_base trains on (``base.max_samples``): a seeded uniform sample of
    ``max_samples`` of the ``n_real`` real samples (the first ``n_real`` of ``sids``) plus every canary (the
    entries after them), sorted; None (all of D) when ``max_samples`` is 0 or at least ``n_real``."""
    if not max_samples or max_samples >= n_real:
        return None
    pick = np.random.default_rng([int(seed), 0xFBA5E]).choice(n_real, size=int(max_samples), replace=False)
    return np.sort(np.concatenate([sids[pick], sids[n_real:]]).astype(np.int64))


def _supplied_fbase(run: _Run) -> None:
    """``base.checkpoint``: check the given f_base against this run (architecture, channels, classes, image
    size, normalisation) and copy it to ``checkpoints/round_0/fbase.pt``, where the rounds, the
    cross-class detector and ``ctray bench`` read it; round 0 then trains no f_base.

    Raises:
        DataError: the file is unreadable or not a checkpoint; ConfigError: it is another model.
    """
    from ctray.models import build_model
    from ctray.models.checkpoint import read_checkpoint
    from ctray.training.loop import FBASE

    path, cfg = run.cfg.base.checkpoint, run.cfg
    if not path or run.fbase_ckpt is not None:
        return
    ck = read_checkpoint(path)
    want = {"arch": cfg.base.arch, "in_channels": run.spec.channels, "num_classes": run.C,
            "image_size": run.spec.height, "mean": float(cfg.data.mean), "std": float(cfg.data.std)}
    if ck["spec"] is not None:
        got = {k: ck["spec"].get(k) for k in want}
        bad = {k: (got[k], v) for k, v in want.items() if (float(got[k]) if isinstance(v, float) else got[k]) != v}
        if bad:
            raise ConfigError(f"base.checkpoint {path} does not fit this run: " + ", ".join(
                f"{k} {g!r} (this run: {w!r})" for k, (g, w) in bad.items()))
    try:
        build_model(cfg.base.arch, run.spec.channels, run.C, run.spec.height).load_state_dict(ck["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"base.checkpoint {path}: its weights do not fit a {cfg.base.arch} for "
                          f"{run.spec.channels} channels, {run.C} classes, {run.spec.height} px: {str(e)[:300]}") from e
    dest = cio.join(run.out, "checkpoints", "round_0")
    cio.write_bytes(cio.join(dest, FBASE), cio.read_bytes(path))
    run.fbase_ckpt = run.state["fbase_ckpt"] = dest
    log.info("f_base: %s (base.checkpoint); round 0 trains none", path)


def _cached_phases(run: _Run) -> None:
    """``io.phase_cache``: for f_base and round 0's pretrained model (base_0), each in turn: reuse a
    published one whose inputs are this run's (copied into ``checkpoints/round_0/``; round 0 trains it
    not), or claim its key, wait while another run of the sweep trains it, and else train it in round 0
    and publish it when its phase ends (:mod:`ctray.training.phasecache`). Only before round 0."""
    from ctray.training import phasecache as pc
    from ctray.training.loop import BASE, FBASE

    cfg = run.cfg
    if run.fbase_ckpt is not None:
        run.fbase_from = run.fbase_from or ("given" if cfg.base.checkpoint else "resumed")
    else:
        run.fbase_from = "trained"
    if not cfg.io.phase_cache or run.state["rounds"]:
        return
    root = cfg.io.phase_cache
    dest = cio.join(run.out, "checkpoints", "round_0")
    for kind, fields_of, name in ((pc.KIND_FBASE, pc.fbase_fields, FBASE), (pc.KIND_BASE0, pc.base0_fields, BASE)):
        if kind == pc.KIND_FBASE and run.fbase_ckpt is not None:
            continue
        fields = fields_of(cfg, run.train_paths, run.clean_paths)
        key = pc.key_of(fields)
        entry, raw, lease = pc.acquire(root, kind, key)
        if entry is not None and raw is not None:
            cio.write_bytes(cio.join(dest, name), raw)
            if kind == pc.KIND_FBASE:
                run.fbase_ckpt = run.state["fbase_ckpt"] = dest
                run.fbase_from = "cache"
            else:
                run.base0_ckpt, run.base0_from = dest, "cache"
            log.info("%s: reused from the phase cache (%s, %.1f MB); round 0 trains none", kind, entry.blob,
                     entry.bytes / 1e6)
            continue
        if lease is not None:
            run.leases.append(lease)
        run.phase_cache[kind] = {"kind": kind, "root": root, "key": key, "fields": fields,
                                 "max_bytes": int(cfg.io.phase_cache_bytes)}
        log.info("%s: not in the phase cache (key %s); round 0 trains it and publishes it there", kind, key)


def _release_leases(run: _Run) -> None:
    for lease in run.leases:
        lease.release()
    run.leases = []


def _train_set(run: _Run, kept: np.ndarray | None) -> tuple[Any, np.ndarray]:
    """The round's training input (only D_r reaches the trainers: filtered by sample id before Ray
    Train's split) and its per-class counts."""
    from ctray.data.reader import read_shards, select_ids, usable

    cpus = run.cfg.data.read_cpus
    if kept is None:
        return run.d_usable, np.bincount(run.labels, minlength=run.C)
    counts = np.bincount(run.labels[run.index.positions_of_known(kept)], minlength=run.C)
    if run.cached:
        return select_ids(run.d_usable, kept, cpus), counts
    # streamed D: a fresh read that decodes only the kept samples (the read tasks skip the rest)
    d = usable(read_shards(run.train_paths, run.spec, run.n_cls, num_cpus=cpus, strict=run.cfg.data.strict,
                           keep=kept), num_cpus=cpus)
    if run.can_usable is not None:
        d = d.union(select_ids(run.can_usable, kept, cpus))
    return d, counts


def _canary_fit(run: _Run, ckpt: str) -> dict[str, float]:
    """The share of the canaries that round 0's f_base and base_0 (the model pretrained on all of D,
    before confusion) predict as the canary target, each in [0, 1]. A canary no model fits is a
    backdoor CT cannot isolate, whatever the knobs: the canary objective is then blind."""
    from ctray.engine.score import collect_scores, score_dataset
    from ctray.training.loop import BASE, FBASE

    cfg, spec, out = run.cfg, run.spec, {}
    assert run.cplan is not None
    for name, fname, arch in (("fbase", FBASE, cfg.base.arch), ("base0", BASE, cfg.ct.arch)):
        pred = collect_scores(score_dataset(run.can_usable, ckpt, fname, arch, spec.channels, run.C, spec.height,
                                            cfg.data), ("sid", "pred"))["pred"]
        out[name] = round(float(np.mean(pred == run.cplan.target)) if len(pred) else 0.0, 4)
    log.info("canaries fit after round 0: f_base %.3f, base_0 %.3f (share predicted as class %d)", out["fbase"],
             out["base0"], run.cplan.target)
    return out


def _publish_round0(run: _Run, ckpt: str) -> None:
    """After round 0's fit: make sure the phases it trained are in the phase cache (the loop publishes
    each when its phase ends; this covers a loop that could not), then let waiting runs go."""
    from ctray.training import phasecache as pc
    from ctray.training.loop import BASE, FBASE

    for kind, cache in run.phase_cache.items():
        try:
            if pc.lookup(cache["root"], kind, cache["key"]) is None:
                name = FBASE if kind == pc.KIND_FBASE else BASE
                pc.publish(cache["root"], kind, cache["key"], cio.read_bytes(cio.join(ckpt, name)), cache["fields"],
                           cache["max_bytes"])
        except OSError as e:
            log.warning("phase cache: %s could not be published to %s: %s", kind, cache["root"], e)
    _release_leases(run)


def _final_pass(run: _Run, ckpt_dir: str, what: str) -> tuple[dict[str, np.ndarray], Any]:
    """Score all of D (+ canaries) with the final model while each block's per-shard/per-source partials
    stream to a fresh aggregator actor and its per-class feature moments to class-partitioned reducers
    (:mod:`ctray.engine.classpca`); then the within-class 2-D projections of the features.
    Cached D: the scores and features are materialized once (the feeds run then) and projected from the
    object store. Streamed D: one pass yields the scalar columns and feeds the moments, a second pass
    rescores and projects; the features never sit anywhere. Returns ``(columns, agg)``: ``loss, pred,
    prob, proj_x, proj_y`` in the driver's order, each sample checked to come exactly once."""
    from ctray.core.index import ColumnFiller
    from ctray.engine.aggregate import feed_aggregator, start_aggregator
    from ctray.engine.classpca import class_axes, feed_reducers, start_reducers, stop_reducers
    from ctray.engine.score import collect_scores, project_features, score_dataset
    from ctray.training.loop import CONFUSED

    cfg, spec, C = run.cfg, run.spec, run.C
    agg = start_aggregator(C, cfg.aggregate.bins, cfg.aggregate.top_k)
    reducers = start_reducers(C)
    sc_ds = score_dataset(run.d_final, ckpt_dir, CONFUSED, cfg.ct.arch, spec.channels, C, spec.height, cfg.data,
                          with_features=True, passthrough=("shard", "source"))
    sc_ds = feed_aggregator(sc_ds, agg, C, cfg.aggregate.bins, cfg.aggregate.top_k, cfg.data.read_cpus)
    sc_ds = feed_reducers(sc_ds, reducers, C, cfg.data.read_cpus)
    fill = ColumnFiller(run.index, {"loss": np.float32, "pred": run.lab_dt, "prob": np.float32})
    pfill = ColumnFiller(run.index, {"proj_x": np.float32, "proj_y": np.float32})
    try:
        if run.cached:
            again = sc_ds.materialize()  # the feeds run once, here
            collect_scores(again, ("sid", "loss", "pred", "prob"), into=fill)
        else:
            collect_scores(sc_ds, ("sid", "loss", "pred", "prob"), into=fill)
            again = score_dataset(run.d_final, ckpt_dir, CONFUSED, cfg.ct.arch, spec.channels, C, spec.height,
                                  cfg.data, with_features=True)
        cols = fill.finish(what)
    except BaseException:
        stop_reducers(reducers)  # a long-lived driver (a sweep) must not keep a failed run's actors
        raise
    axes, means, _ = class_axes(reducers, C, 2)
    project_features(again, axes, means, cfg.data.read_cpus, into=pfill)
    return {**cols, **pfill.finish(f"{what} (projections)")}, agg


def _share(n: int, of: int) -> float | None:
    return n / of if of else None


def _round(run: _Run, r: int, on_round: Callable[[dict[str, Any]], None] | None) -> None:
    """Round ``r``: one Ray Train fit (f_base with round 0, then pretraining + confusion training) on D_r,
    a scoring pass over ALL of D, and (before the final round) the distillation of D_{r+1}."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ctray.core.distill import distill, keep_count
    from ctray.core.index import ColumnFiller
    from ctray.engine.score import collect_scores, score_dataset
    from ctray.training.loop import CONFUSED, train_loop_per_worker

    cfg, out, spec, C, N = run.cfg, run.out, run.spec, run.C, run.N
    t = time.monotonic()
    ckpt = cio.join(out, "checkpoints", f"round_{r}")
    # in-round checkpoints only with worker processes: local mode has no worker to lose (ray-notes §4)
    every = cfg.scale.checkpoint_every if cfg.scale.num_workers > 0 else None
    assert run.fbase_ckpt is not None or run.keep is None  # f_base trains in round 0, on all of D
    d_train, class_counts = _train_set(run, run.keep)
    cfg_d = cfg.to_dict()
    cfg_d["scale"]["torch_threads"] = run.threads
    cfg_d["ct"]["pretrain_epochs"] = run.pretrain_epochs
    job = {"cfg": cfg_d, "num_classes": C, "round": r, "train_fbase": run.fbase_ckpt is None,
           "fbase_ckpt": run.fbase_ckpt, "prev_base_ckpt": run.prev_ckpt, "keep": run.keep, "ckpt_dir": ckpt,
           "checkpoint_every": every, "checkpoint_seconds": 60.0 * cfg.scale.checkpoint_minutes,
           "checkpoint_async": cfg.scale.checkpoint_async, "n_total": N, "image_shape": list(spec.shape),
           "class_counts": class_counts.tolist(),
           "fbase_keep": fbase_sample(run.sids, run.n_real, cfg.base.max_samples, cfg.seed)
           if run.fbase_ckpt is None else None,
           "phase_cache": run.phase_cache if r == 0 else None, "base0_ckpt": run.base0_ckpt if r == 0 else None}
    # A failed worker group is restarted up to max_failures times; the loop then continues from the
    # latest in-round checkpoint (ctray.training.loop). num_to_keep=1: only the latest is ever read.
    # The two ignores: ray.train.torch rebinds TorchTrainer to the Train V2 class at import (V2 is on by
    # default), whose loop may return a value (result.return_value); mypy sees only the V1 declaration
    trainer = TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=job, scaling_config=run.scaling_cfg, dataset_config=train_data_config(),
        datasets={"train": d_train, "reserve": run.r_usable},
        run_config=ray.train.RunConfig(
            name=f"round-{r}", storage_path=run.storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scale.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    if not cio.exists(cio.join(ckpt, CONFUSED)):
        raise RuntimeError(f"round {r}: training wrote no checkpoint to {ckpt}")
    fit_s = time.monotonic() - t
    inner = result.return_value or {}  # type: ignore[attr-defined]
    if inner.get("resumed_from"):
        log.warning("round %d: Ray Train restarted the training workers after a failure; they resumed from "
                    "the checkpoint at %s (fit took %.1fs in all)", r + 1, inner["resumed_from"], fit_s)
    if run.fbase_ckpt is None:
        run.fbase_ckpt = ckpt
        run.state["fbase_ckpt"] = ckpt
    if r == 0:
        _publish_round0(run, ckpt)
    run.prev_ckpt = ckpt
    final = r == cfg.ct.rounds - 1
    # ---- score ALL of D with confused_r
    t2 = time.monotonic()
    if final:
        run.final_scores, run.agg = _final_pass(run, ckpt, f"scoring pass of round {r + 1}")
        losses = run.final_scores.pop("loss")
    else:
        filler = ColumnFiller(run.index, {"loss": np.float32})
        collect_scores(score_dataset(run.d_usable, ckpt, CONFUSED, cfg.ct.arch, spec.channels, C, spec.height,
                                     cfg.data), ("sid", "loss"), into=filler)
        losses = filler.finish(f"scoring pass of round {r + 1}")["loss"]
        del filler
    run.round_losses.append(losses)
    score_s = time.monotonic() - t2
    info: dict[str, Any] = {"round": r, "train_seconds": round(fit_s, 2), "score_seconds": round(score_s, 2),
                            "n_train_set": int(inner.get("n_dr", 0)), "phase_seconds": inner.get("times", {}),
                            "phase_steps": inner.get("steps", {}), "pretrain_epochs": run.pretrain_epochs[r],
                            "resumed_from": inner.get("resumed_from")}
    if job["train_fbase"]:  # f_base was trained in this fit: on how many samples (base.max_samples)
        info["fbase_samples"] = int(len(job["fbase_keep"])) if job["fbase_keep"] is not None else N
    elif r == 0:
        info["fbase_samples"] = None  # given (base.checkpoint), reused from the phase cache, or resumed
    if r == 0:
        info["fbase_from"] = run.fbase_from
        info["base0_from"] = run.base0_from
        if run.can_usable is not None:  # did the models learn the defender's backdoor at all? (docs/sweep.md)
            info["canary_fit"] = _canary_fit(run, ckpt)
    rs: dict[str, Any] = {"ckpt": ckpt, "losses": f"rounds/round_{r}_losses.npz"}
    save_npz(cio.join(out, rs["losses"]), sid=run.sids, loss=losses)
    truth = run.truth
    if not final:
        kept_idx = distill(losses, run.labels, keep_count(cfg.ct.keep_ratio[r], N), cfg.ct.floor_k[r], C)
        run.keep = run.sids[kept_idx]
        rs["kept"] = f"rounds/round_{r}_kept.npy"
        save_npy(cio.join(out, rs["kept"]), run.keep)
        info["kept"] = int(len(kept_idx))
        if run.n_can:
            info["kept_canaries"] = int((kept_idx >= run.n_real).sum())
        if truth is not None:
            info["kept_poison"] = int(truth[0][kept_idx].sum())
        log.info("round %d/%d: train %.1fs, score %.1fs, kept %d of %d%s", r + 1, cfg.ct.rounds, fit_s, score_s,
                 len(kept_idx), N, f" ({info['kept_poison']} poison)" if truth is not None else "")
    else:
        info["kept"] = None
        log.info("round %d/%d (final): train %.1fs, score %.1fs", r + 1, cfg.ct.rounds, fit_s, score_s)
    rs["info"] = info
    run.rounds_info.append(info)
    run.state["rounds"].append(rs)
    cio.write_json(run.state_path, run.state)
    if on_round is not None and not final:
        n_poison = int(truth[0].sum()) if truth is not None else 0
        on_round({"round": r, "rounds": cfg.ct.rounds, "final": False, "kept": info["kept"],
                  "kept_canaries": info.get("kept_canaries"),
                  "canary_kept_share": _share(info.get("kept_canaries", 0), run.n_can),
                  "poison_kept_share": _share(info.get("kept_poison", 0), n_poison)})


def _corroborate(run: _Run, preds: np.ndarray, lr: np.ndarray, cleansed: np.ndarray
                 ) -> tuple[np.ndarray | None, np.ndarray]:
    """decide.corroborate: weakly cleansed classes that earlier rounds do not corroborate are not cleansed.

    Returns the per-class corroboration (NaN where not evaluated; None when the check is off) and the
    vetoed classes. Counted rounds: all but the last two (their models train on the last distilled sets,
    which the isolated samples fill by construction); with fewer than three rounds nothing is vetoed.
    """
    from ctray.core.decide import corroborate, corroboration, weak_classes

    cfg, C = run.cfg, run.C
    bar = cfg.decide.corroborate
    if bar <= 0:
        return None, np.zeros(C, bool)
    weak = weak_classes(lr, cleansed, cfg.decide.weak_lr)
    rounds = run.round_losses[:max(len(run.round_losses) - 2, 0)]
    if not rounds:
        if weak.any():
            log.warning("decide.corroborate: %d rounds leave no earlier round to corroborate weak classes %s; "
                        "kept cleansed", len(run.round_losses), np.flatnonzero(weak).tolist())
        return np.full(C, np.nan), np.zeros(C, bool)
    corr = corroboration(rounds, run.labels, preds, np.flatnonzero(weak), C)
    vetoed = cleansed & ~corroborate(cleansed, weak, corr, bar)
    for c in np.flatnonzero(weak):
        if vetoed[c]:
            log.warning("class %d passed the likelihood-ratio test on weak evidence (LR %.3g) but earlier rounds do "
                        "not corroborate it (%.2f < decide.corroborate %g): not cleansed (decisions.json)",
                        c, lr[c], corr[c], bar)
        else:
            log.info("class %d: weak evidence (LR %.3g) corroborated by earlier rounds (%.2f >= %g)",
                     c, lr[c], corr[c], bar)
    return corr, vetoed


@dataclass
class _Outcome:
    """The final decision over the driver's arrays (canaries included; outputs use the first n_real)."""

    lr: np.ndarray
    cleansed: np.ndarray
    flagged: np.ndarray
    decision: Any
    canary: dict[str, Any] | None


def _decide(run: _Run) -> _Outcome:
    """Per-class likelihood-ratio test on the final projections (or the Ember flag budget)."""
    from ctray.core.decide import WEAK_EVIDENCE_NOTE, Decision, decide, flag_samples, likelihood_ratios

    cfg, C, N, n = run.cfg, run.C, run.N, run.n_real
    assert run.final_scores is not None
    preds = run.final_scores["pred"]
    if cfg.decide.flag_budget > 0:  # Ember variant: flag the lowest-loss fraction of the final model
        flagged = np.zeros(N, bool)
        flagged[np.argsort(run.round_losses[-1], kind="stable")[:int(N * cfg.decide.flag_budget)]] = True
        lr, cleansed = np.ones(C), np.zeros(C, bool)
        corr, vetoed = None, np.zeros(C, bool)
    else:
        P2 = np.stack([run.final_scores["proj_x"], run.final_scores["proj_y"]], 1)  # float32 (N, 2)
        lr = likelihood_ratios(P2, run.labels, preds, C)
        del P2
        cleansed = decide(lr, cfg.decide.threshold_max, cfg.decide.threshold_any)
        corr, vetoed = _corroborate(run, preds, lr, cleansed)
        cleansed = cleansed & ~vetoed
        flagged = flag_samples(run.labels, preds, cleansed)
    dec = Decision.from_outcome(lr, cleansed, flagged[:n], run.labels[:n], preds[:n], cfg.decide.threshold_max,
                                cfg.decide.threshold_any, cfg.decide.weak_lr, corroboration=corr, vetoed=vetoed,
                                corroborate=cfg.decide.corroborate)
    log.info("decision: cleansed classes %s, flagged %d of %d", np.flatnonzero(cleansed).tolist(),
             int(flagged[:n].sum()), n)
    for c in np.flatnonzero(dec.weak):
        log.warning("class %d cleansed on weak evidence: likelihood ratio %.3g < decide.weak_lr %g; %s (report.html)",
                    c, lr[c], cfg.decide.weak_lr, WEAK_EVIDENCE_NOTE)
    canary = None
    if run.cplan is not None:
        canary = {"count": run.n_can, "target": run.cplan.target, "rate": cfg.canary.rate,
                  "flagged": int(flagged[n:].sum()), "recall": float(flagged[n:].mean()),
                  "outside_flag_rate": float(flagged[:n].mean()),
                  "kept_per_round": [ri.get("kept_canaries") for ri in run.rounds_info],
                  # share predicted as the target by round 0's f_base and base_0 (None: a run resumed from
                  # a version that did not measure it)
                  "fit_after_round0": run.rounds_info[0].get("canary_fit") if run.rounds_info else None}
        log.info("canaries: %d of %d flagged (recall %.3f); flag rate outside them %.4f", canary["flagged"],
                 run.n_can, canary["recall"], canary["outside_flag_rate"])
    return _Outcome(lr, cleansed, flagged, dec, canary)


def _write_outputs(run: _Run, o: _Outcome) -> tuple[DetectResult, dict[str, Any]]:
    """scores.parquet (streamed from the identity store, so the identity strings are never all in
    memory), quarantine, shard/source tables, decisions, rounds, metrics, run.json. Returns the result and
    the final ``on_round`` record (the caller writes the report, then calls ``on_round``)."""
    import ray

    from ctray.core.metrics import detection_metrics
    from ctray.core.shardstats import GroupStats
    from ctray.engine.aggregate import flagged_by_group, write_group_tables
    from ctray.engine.identity import write_scores
    from ctray.training.loop import FBASE

    cfg, out, C, N, n, ident = run.cfg, run.out, run.C, run.N, run.n_real, run.ident
    assert run.final_scores is not None
    fs, ct_flagged, truth, secs = run.final_scores, o.flagged, run.truth, run.secs
    score = fs["prob"]  # float32: the confused model's probability of the given label
    # ---- the cross-class detector beside CT (ctray.engine.xclass): one decision, flagged = either
    xdec, flagged = None, ct_flagged
    xcols: dict[str, Any] = {}
    if cfg.xclass.enabled:
        from ctray.core.index import ColumnFiller, SampleIndex
        from ctray.core.xclass import FLAGGED_BY, flagged_by
        from ctray.engine.xclass import xclass_scores

        xfill = ColumnFiller(SampleIndex(run.sids[:n]), {"score_xclass": np.float32, "flagged_xclass": bool})
        xres = xclass_scores(cio.join(run.state["fbase_ckpt"], FBASE), run.train_paths, run.clean_paths, cfg,
                             into=xfill)
        xa = xfill.finish("cross-class pass")
        xdec, secs["xclass"] = xres.decision, xres.seconds
        x_fl = np.zeros(N, bool)
        x_fl[:n] = xa["flagged_xclass"] & (xa["score_xclass"] > xres.decision.tau_score) & xres.decision.attack
        flagged = ct_flagged | x_fl
        s_x = np.full(N, np.nan, np.float32)
        s_x[:n] = xa["score_xclass"]
        xcols = {"score_xclass": s_x, "flagged_by": (flagged_by(ct_flagged, x_fl), FLAGGED_BY)}
        del xa
    cols: dict[str, Any] = {"label": run.labels, "score": score, "flagged": flagged, "pred": fs["pred"], **xcols}
    for i, rl in enumerate(run.round_losses):
        cols[f"round_loss_{i}"] = rl.astype(np.float32, copy=False)
    cols["proj_x"], cols["proj_y"] = fs["proj_x"], fs["proj_y"]
    metrics: dict[str, Any] | None = None
    if truth is not None:
        cols["truth_poison"], cols["truth_cover"] = truth[0], truth[1]
        metrics = {"ct": detection_metrics(ct_flagged[:n], truth[0][:n], score[:n]),
                   "rounds_kept_poison": [ri.get("kept_poison") for ri in run.rounds_info]}
        if xdec is not None:  # the detector alone (its flags, its score) and the combined decision
            metrics["xclass"] = detection_metrics(x_fl[:n], truth[0][:n], s_x[:n])
            metrics["combined"] = detection_metrics(flagged[:n], truth[0][:n])  # two scores: no single ranking
    # ---- optional extra column: activation statistics of f_base (BadActs transfer; ctray.engine.activations)
    if cfg.act.in_detect:
        from ctray.data.shards import sample_ids
        from ctray.engine.activations import activation_scores

        t_act = time.monotonic()
        act = activation_scores(cio.join(run.state["fbase_ckpt"], FBASE), run.train_paths, run.clean_paths, cfg)
        a_sid = sample_ids(act.shard.tolist(), act.key.tolist())
        s_act, f_act = np.full(N, np.nan), np.zeros(N, bool)
        s_act[:n] = _by_sid(a_sid, act.score, run.sids[:n], np.nan)
        f_act[:n] = _by_sid(a_sid, act.flagged, run.sids[:n], False)
        cols["score_act"], cols["flagged_act"] = s_act, f_act
        secs["act"] = time.monotonic() - t_act
        if metrics is not None and truth is not None:
            metrics["act"] = {**detection_metrics(f_act[:n], truth[0][:n], s_act[:n]), "threshold": act.threshold}
    bad = ident.bad.sort_by([("shard", "ascending"), ("key", "ascending")])
    cio.write_parquet(cio.join(out, "quarantine.parquet"), bad.select(["shard", "key", "reason", "level"]))
    # ---- per-shard / per-source tables from the aggregator (+ the read's quarantine counts)
    assert run.agg is not None  # the final pass ran: in the last round or in the rescoring
    by_shard, by_source, agg_info = ray.get(run.agg.result.remote())
    ray.kill(run.agg)
    k_ = (C, cfg.aggregate.bins, cfg.aggregate.top_k)
    b_level = np.asarray(bad.column("level").to_pylist(), dtype=object)
    b_quar, b_fail = b_level == "sample", b_level != "sample"

    def read_counts(names: list[str], b_names: list[str], b_mask: np.ndarray) -> Any:
        """Every group once (zero counts) plus the bad rows of the groups: the read-side GroupStats."""
        z = np.zeros(len(names), bool)
        g = np.array(list(names) + [b for b, m in zip(b_names, b_mask, strict=True) if m], dtype=object)
        return GroupStats.from_read(g.astype(str), np.r_[z, b_quar[b_mask]], np.r_[z, b_fail[b_mask]], *k_)

    b_shards = [str(x) for x in bad.column("shard").to_pylist()]
    b_sources = [str(x or "") for x in bad.column("source").to_pylist()]
    by_shard = by_shard.merge(read_counts(ident.shards, b_shards, np.ones(len(b_shards), bool)))
    by_source = by_source.merge(read_counts(ident.sources, b_sources, np.array([x != "" for x in b_sources], bool)))
    top_ids = np.unique(np.concatenate([by_shard.top_id, by_source.top_id]))
    fl = np.flatnonzero(flagged[:n])
    names = write_scores(cio.join(out, "scores.parquet"), ident.store, run.index, cols, n,
                         np.concatenate([run.sids[fl], top_ids]))
    if cfg.decide.flag_budget > 0 or (xdec is not None and xdec.attack):  # flags not by whole classes
        fl_names = [names[int(x)] for x in run.sids[fl]]
        shard_fl = flagged_by_group(by_shard, np.array([x[0] for x in fl_names], dtype=str), np.ones(len(fl), bool))
        src = np.array([x[2] for x in fl_names], dtype=str)
        source_fl = flagged_by_group(by_source, src[src != ""], np.ones(int((src != "").sum()), bool))
    else:
        shard_fl, source_fl = by_shard.flagged(o.cleansed), by_source.flagged(o.cleansed)
    agg_info["consistent"] = bool(int(by_shard.usable.sum()) == n and int(shard_fl.sum()) == int(flagged[:n].sum()))
    if not agg_info["consistent"]:
        log.error("shard aggregation disagrees with the per-sample results (usable %d vs %d, flagged %d vs %d)",
                  int(by_shard.usable.sum()), n, int(shard_fl.sum()), int(flagged[:n].sum()))
    key_of = {int(t): names[int(t)][:2] for t in top_ids if int(t) in names}
    agg_info.update(write_group_tables(out, by_shard, by_source, shard_fl, source_fl, cfg.aggregate.alpha, key_of))
    cio.write_json(cio.join(out, "decisions.json"), {**o.decision.to_json(),
                                                     **({"xclass": xdec.to_json()} if xdec is not None else {})})
    if o.canary is not None:
        cio.write_json(cio.join(out, "canary.json"), o.canary)
    cio.write_json(cio.join(out, "rounds.json"), [
        {"round": ri["round"], "kept": ri.get("kept"), "kept_poison": ri.get("kept_poison"),
         "seconds": ri["train_seconds"] + ri["score_seconds"], **ri} for ri in run.rounds_info])
    secs["total"] = time.time() - run.t_start
    secs["rounds"] = sum(ri["train_seconds"] + ri["score_seconds"] for ri in run.rounds_info)
    if metrics is not None:
        metrics["seconds"] = secs
        cio.write_json(cio.join(out, "metrics.json"), metrics)
    cio.write_bytes(cio.join(out, "config.yaml"), cfg.to_yaml().encode())
    run.mark("outputs")
    counts = {"read": ident.n_read, "usable": n, "quarantined": ident.n_quarantined,
              "shard_failures": ident.n_shard_failures, "converted": ident.n_converted,
              "flagged": int(flagged[:n].sum()), "canaries": run.n_can}
    cio.write_json(cio.join(out, "run.json"), {
        "version": __version__, "started": run.t_start, "finished": time.time(), "train": run.train_paths,
        "clean": run.clean_paths, "preset": cfg.preset, "num_classes": C, "image_shape": list(run.spec.shape),
        "seconds": secs, "aggregate": agg_info, "max_member_bytes": run.spec.max_member_bytes,
        "driver_peak_rss_bytes": _peak_rss(), "driver_memory_mb": run.memory, "counts": counts})
    final_info = {"round": cfg.ct.rounds - 1, "rounds": cfg.ct.rounds, "final": True, "kept": None,
                  "kept_canaries": None, "canary_kept_share": None, "poison_kept_share": None,
                  "n_flagged": int(len(fl)), "flag_rate": float(len(fl) / n),
                  "canary_recall": o.canary["recall"] if o.canary else None,
                  "cleansed": np.flatnonzero(o.cleansed).tolist(), "metrics": metrics["ct"] if metrics else None}
    return DetectResult(run_dir=out, n_read=ident.n_read, n_usable=n, n_quarantined=ident.n_quarantined,
                        n_flagged=int(len(fl)), flagged_keys=[names[int(x)][:2] for x in run.sids[fl]],
                        cleansed_classes=np.flatnonzero(o.cleansed).tolist(),
                        weak_classes=np.flatnonzero(o.decision.weak).tolist(),
                        vetoed_classes=np.flatnonzero(o.decision.vetoed).tolist(), metrics=metrics, seconds=secs,
                        canary=o.canary, xclass=xdec.to_json() if xdec is not None else None), final_info


def _by_sid(src_sids: np.ndarray, values: np.ndarray, sids: np.ndarray, fill: Any) -> np.ndarray:
    """``values`` keyed by ``src_sids`` looked up for ``sids`` (``fill`` where absent)."""
    o = np.argsort(src_sids)
    ss = src_sids[o]
    pos = np.clip(np.searchsorted(ss, sids), 0, max(0, len(ss) - 1))
    hit = (ss[pos] == sids) if len(ss) else np.zeros(len(sids), bool)
    res = np.full(len(sids), fill, dtype=np.asarray(values).dtype if fill is not np.nan else np.float64)
    res[hit] = np.asarray(values)[o][pos[hit]]
    return res


def _fingerprint(cfg: Config, train: list[str], clean: list[str]) -> str:
    d = cfg.to_dict()
    d.pop("io", None)
    d.pop("bench", None)  # the baselines' knobs do not change CT's result: a bench rerun resumes CT
    d.pop("sweep", None)  # tuning knobs and the shard tables' settings do not change what a round computes
    d.pop("aggregate", None)
    d["scale"] = {}  # the worker layout may change between attempts without changing the result's meaning
    # fields added later leave the fingerprint at their defaults, so a run directory of an earlier version resumes
    for k in ("max_samples", "checkpoint"):
        if not d["base"].get(k):
            d["base"].pop(k, None)
    for k, default in (("batch_scale", 1), ("warmup_epochs", 2.0)):
        if d["ct"].get(k) == default:
            d["ct"].pop(k, None)
    if d["data"].get("score_precision") == "auto":
        d["data"].pop("score_precision", None)
    if d["base"].get("checkpoint"):  # a given f_base counts by its bytes, not by its path
        try:
            d["base"]["checkpoint"] = hashlib.sha256(cio.read_bytes(d["base"]["checkpoint"])).hexdigest()
        except OSError as e:
            raise DataError(f"base.checkpoint {d['base']['checkpoint']} cannot be read: {e}") from None
    d["data"] = {k: v for k, v in d["data"].items() if k not in DATA_RESOURCE_KEYS}  # as may the scoring resources
    blob = json.dumps({"cfg": d, "train": train, "clean": clean}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _discard_rounds(out: str, storage: str, rounds: range) -> None:
    """Delete the round checkpoints and Ray Train storage of ``rounds`` (a recomputed round must not
    resume from what it wrote before)."""
    from pyarrow import fs as pafs

    for r in rounds:
        for d in (cio.join(out, "checkpoints", f"round_{r}"), cio.join(storage, f"round-{r}")):
            fs, p = cio._fs(d)
            if fs.get_file_info(p).type == pafs.FileType.Directory:
                fs.delete_dir(p)


def _process_memory() -> dict[str, float]:
    """``{"rss", "anon", "arrow", "arrow_max"}`` MB of this process: /proc/self/status (Linux; {} elsewhere)
    and pyarrow's memory pool. ``anon`` is the private part: VmRSS also counts the object store's shared
    pages a reader maps."""
    try:
        with open("/proc/self/status") as f:
            kv = dict(line.split(":", 1) for line in f if ":" in line)
        out = {"rss": round(int(kv["VmRSS"].split()[0]) / 1024, 1), "anon": round(int(kv["RssAnon"].split()[0]) / 1024, 1)}
    except (OSError, KeyError, ValueError):
        return {}
    import pyarrow as pa

    # Arrow's pool: live bytes, and the pool's high-water mark (freed pages a pool keeps count in RSS only)
    out["arrow"] = round(pa.total_allocated_bytes() / 2**20, 1)
    out["arrow_max"] = round(pa.default_memory_pool().max_memory() / 2**20, 1)
    return out


def _peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux/macOS ``ru_maxrss``), None where unknown."""
    try:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)
    except (ImportError, OSError):
        return None


def run_detect(preset: str | None, overrides: dict[str, Any], config_file: str | None = None) -> DetectResult:
    """CLI helper: resolve the preset (auto when none) and run."""
    if not preset and not config_file:
        train = overrides.get("io.train") or []
        name, why = choose_preset(train, bool(overrides.get("scale.use_gpu", False)))
        log.info("no --preset given: using %r (%s)", name, why)
        preset = name
    return detect(load_config(preset, overrides, config_file))
