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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ctray import io as cio
from ctray._version import __version__
from ctray.config import DATA_RESOURCE_KEYS, Config, load_config
from ctray.engine.cluster import ensure_ray, scaling
from ctray.errors import ConfigError, DataError, RunDirMismatchError

log = logging.getLogger(__name__)


@dataclass
class DetectResult:
    """What a detection run produced. ``flagged_keys`` lists ``(shard, key)`` of flagged samples."""

    run_dir: str
    n_read: int
    n_usable: int
    n_quarantined: int
    n_flagged: int
    flagged_keys: list[tuple[str, str]]
    cleansed_classes: list[int]
    metrics: dict[str, Any] | None
    seconds: dict[str, float] = field(default_factory=dict)
    canary: dict[str, Any] | None = None  # with canary.rate > 0: count, target, recall, outside flag rate
    weak_classes: list[int] = field(default_factory=list)  # cleansed with LR < decide.weak_lr


# --------------------------------------------------------------------------------------------- data


def resolve_inputs(cfg: Config) -> tuple[list[str], list[str], Any, int | None]:
    """Expand the shard specs and settle the image spec (config > manifest > data)."""
    from ctray.data.shards import ImageSpec, expand_shards, probe_spec

    if not cfg.io.train:
        raise ConfigError("no train shards: give --train (io.train)")
    if not cfg.io.clean:
        raise ConfigError("no clean reserve: give --clean (io.clean); CT needs a small trusted set (specs/ct.md §1.2)")
    train = expand_shards(cfg.io.train)
    clean = expand_shards(cfg.io.clean)
    probed, n_cls = probe_spec(train)
    h = cfg.data.image_size or probed.height
    w = cfg.data.image_size or probed.width
    c = cfg.data.channels or probed.channels
    spec = ImageSpec(h, w, c, on_mode=cfg.data.on_mode, on_size=cfg.data.on_size)  # type: ignore[arg-type]
    return train, clean, spec, (cfg.data.num_classes or n_cls)


def choose_preset(train_spec: list[str], use_gpu: bool = False) -> tuple[str, str]:
    """Pick a preset from the data (image size, classes, sample count; the manifest when present,
    else an estimate from the first shard)."""
    from ctray.config import auto_preset
    from ctray.data.shards import expand_shards, iter_shard, probe_spec, read_manifest

    paths = expand_shards(train_spec)
    spec, n_cls = probe_spec(paths)
    man = read_manifest(paths) or {}
    n = int(man.get("counts", {}).get("train", 0))
    if not n:
        n = sum(1 for _ in iter_shard(paths[0], paths[0], None, None)) * len(paths)
    return auto_preset(max(spec.height, spec.width), int(n_cls or man.get("num_classes") or 10), n, use_gpu)


def _fingerprint(cfg: Config, train: list[str], clean: list[str]) -> str:
    d = cfg.to_dict()
    d.pop("io", None)
    d.pop("bench", None)  # the baselines' knobs do not change CT's result: a bench rerun resumes CT
    d.pop("sweep", None)  # tuning knobs and the shard tables' settings do not change what a round computes
    d.pop("aggregate", None)
    d["scale"] = {}  # the worker layout may change between attempts without changing the result's meaning
    d["data"] = {k: v for k, v in d["data"].items() if k not in DATA_RESOURCE_KEYS}  # as may the scoring resources
    blob = json.dumps({"cfg": d, "train": train, "clean": clean}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_truth(path: str, shards: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth aligned to ``(shards, keys)``: ``(poison bool (N,), cover bool (N,))``.

    Accepts parquet or csv with columns ``shard, key, poison`` (+ optional ``cover``). Samples the truth
    does not list count as clean; truth rows matching no sample are reported.
    """
    import pandas as pd

    try:
        df = cio.read_parquet(path).to_pandas() if path.endswith(".parquet") else pd.read_csv(path)
    except Exception as e:
        raise DataError(f"cannot read truth file {path}: {e}") from e
    missing = {"shard", "key", "poison"} - set(df.columns)
    if missing:
        raise DataError(f"truth file {path} lacks columns {sorted(missing)} (needs shard, key, poison[, cover])")
    idx = {(s, k): i for i, (s, k) in enumerate(zip(shards.tolist(), keys.tolist(), strict=True))}
    poison = np.zeros(len(keys), bool)
    cover = np.zeros(len(keys), bool)
    matched = 0
    has_cover = "cover" in df.columns
    for row in df.itertuples(index=False):
        i = idx.get((str(row.shard), str(row.key)))
        if i is None:
            continue
        matched += 1
        poison[i] = bool(row.poison)
        if has_cover:
            cover[i] = bool(row.cover)
    if matched == 0:
        raise DataError(f"truth file {path}: none of its {len(df)} rows matches a sample (shard, key) of the run;"
                        f" first run shard ids: {sorted(set(shards.tolist()))[:3]}")
    if matched < len(df):
        log.warning("truth: %d of %d rows match no usable sample (quarantined or absent)", len(df) - matched, len(df))
    return poison, cover


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
        ConfigError / DataError: bad config or unusable input (named).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from ctray.core.decide import WEAK_EVIDENCE_NOTE, Decision, decide, flag_samples, likelihood_ratios
    from ctray.core.distill import distill, keep_count
    from ctray.core.shardstats import GroupStats
    from ctray.data.reader import TRAIN_COLUMNS, read_shards, usable
    from ctray.engine.aggregate import (
        feed_aggregator,
        flagged_by_group,
        scoring_view,
        start_aggregator,
        with_sources,
        write_group_tables,
    )
    from ctray.engine.canary import canary_dataset, plan_canaries
    from ctray.engine.score import PROJECT_CPUS, class_projections, collect_scores, score_dataset
    from ctray.training.loop import CONFUSED, FBASE, train_loop_per_worker

    cfg.validate()
    if not cfg.io.out:
        raise ConfigError("no run directory: give --out (io.out)")
    t_start = time.time()
    secs: dict[str, float] = {}
    out = cfg.io.out if cio.is_remote(cfg.io.out) else os.path.abspath(cfg.io.out)
    cio.makedirs(out)
    ensure_ray()
    train_paths, clean_paths, spec, n_cls = resolve_inputs(cfg)

    # ---- read D once (materialized: every round scores all of it) and R
    t = time.monotonic()
    ds_all = with_sources(read_shards(train_paths, spec, n_cls, num_cpus=cfg.data.read_cpus, strict=cfg.data.strict),
                          cfg.data.read_cpus).materialize()
    ident = collect_scores(ds_all, ("shard", "key", "sid", "label", "ok", "reason", "level", "note", "source"))
    # one deterministic sample order for every output and tie-break: (shard, key), not block arrival
    by_name = np.lexsort((ident["key"].astype(str), ident["shard"].astype(str)))
    ident = {k: v[by_name] for k, v in ident.items()}
    ok = ident["ok"].astype(bool)
    ds_r = read_shards(clean_paths, spec, n_cls, num_cpus=cfg.data.read_cpus, strict=cfg.data.strict).materialize()
    r_ident = collect_scores(ds_r, ("ok", "label", "reason"))
    secs["read"] = time.monotonic() - t
    sample_rows = ident["level"] == "sample"
    n_read = int(sample_rows.sum())
    n_quar = int((~ok & sample_rows).sum())
    log.info("read %d train samples from %d shards: %d usable, %d quarantined, %d shard failures (%.1fs)",
             n_read, len(train_paths), int(ok.sum()), n_quar, int((~sample_rows).sum()), secs["read"])
    if int(ok.sum()) == 0:
        raise DataError(f"no usable train sample in {len(train_paths)} shards (see quarantine reasons)")
    if int(r_ident["ok"].sum()) == 0:
        raise DataError(f"no usable sample in the clean reserve {clean_paths[:3]}")
    if int((~r_ident["ok"].astype(bool)).sum()):
        log.warning("clean reserve: %d samples quarantined", int((~r_ident["ok"].astype(bool)).sum()))
    sids = ident["sid"][ok].astype(np.int64)
    if len(np.unique(sids)) != len(sids):
        raise DataError("two usable samples share one (shard, key) id; shard ids must be unique")
    labels = ident["label"][ok].astype(np.int64)
    shards_ok, keys_ok = ident["shard"][ok].astype(str), ident["key"][ok].astype(str)
    C = int(n_cls or max(int(labels.max()), int(r_ident["label"][r_ident["ok"].astype(bool)].max())) + 1)
    if C < 2:
        raise DataError("CT needs at least 2 classes")
    # the usable rows with the scoring columns, materialized ONCE (canaries included): every round's
    # training and scoring pass reads these blocks instead of re-filtering all read rows, and the read rows
    # (quarantined ones included, whose identities are already in `ident`) are released
    d_final = scoring_view(ds_all, cfg.data.read_cpus)  # + shard, source for the shard/source tables
    # defender canaries (sweep): appended after the real samples; every array below covers both, every
    # user-facing output only the first n_real entries
    n_real = len(sids)
    cplan = plan_canaries(sids, labels, shards_ok, keys_ok, C, cfg.canary.rate, cfg.canary.min_count,
                          cfg.canary.target, cfg.seed)
    if cplan is not None:
        can = canary_dataset(ds_all, cplan, cfg.data.read_cpus)
        d_final = d_final.union(scoring_view(can, cfg.data.read_cpus))
        sids = np.concatenate([sids, cplan.sids])
        labels = np.concatenate([labels, np.full(len(cplan), cplan.target, np.int64)])
        if len(np.unique(sids)) != len(sids):
            raise DataError("a canary id collides with a sample id; change seed")
    d_final = d_final.materialize()
    del ds_all
    d_usable = d_final.select_columns(list(TRAIN_COLUMNS), num_cpus=PROJECT_CPUS)
    n_can = len(sids) - n_real
    N = len(sids)
    order = np.argsort(sids)
    sorted_sids = sids[order]

    def align(s: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Values ``v`` keyed by sids ``s`` -> the driver's sample order."""
        pos = np.searchsorted(sorted_sids, s)
        outv = np.empty(N, dtype=v.dtype)
        outv[order[pos]] = v
        return outv

    r_usable = usable(ds_r).materialize()
    del ds_r
    cfg_d = cfg.to_dict()
    scaling_cfg, threads = scaling(cfg)
    cfg_d["scale"]["torch_threads"] = threads

    # ---- resume state
    fp = _fingerprint(cfg, train_paths, clean_paths)
    state_path = cio.join(out, "state.json")
    state: dict[str, Any] = {"fingerprint": fp, "rounds": []}
    if cio.exists(state_path):
        old = cio.read_json(state_path)
        if old.get("fingerprint") != fp:
            raise RunDirMismatchError(f"run directory {out} holds a run with another config or inputs "
                              f"(fingerprint {old.get('fingerprint')} != {fp}); use a new --out")
        state = old
        if state["rounds"]:
            log.info("resuming %s: %d of %d rounds already done", out, len(state["rounds"]), cfg.ct.rounds)
    storage = os.path.abspath(cio.join(out, "train")) if not cio.is_remote(out) else cio.join(out, "train")
    round_losses: list[np.ndarray] = []
    keep: np.ndarray | None = None
    rounds_info: list[dict[str, Any]] = []
    fbase_ckpt = prev_ckpt = None
    for rs in state["rounds"]:
        saved = _load_npz(cio.join(out, rs["losses"]))
        _check_scored(saved["sid"], sorted_sids, f"{rs['losses']} (round {rs['info']['round']})")
        round_losses.append(align(saved["sid"], saved["loss"]))
        fbase_ckpt = state["fbase_ckpt"]
        prev_ckpt = rs["ckpt"]
        keep = _load_npy(cio.join(out, rs["kept"])) if rs.get("kept") else None
        rounds_info.append(rs["info"])

    truth = load_truth(cfg.io.truth, shards_ok, keys_ok) if cfg.io.truth else None
    if truth is not None and n_can:
        truth = (np.r_[truth[0], np.zeros(n_can, bool)], np.r_[truth[1], np.zeros(n_can, bool)])
    n_poison = int(truth[0].sum()) if truth is not None else 0

    def final_pass(ckpt_dir: str) -> tuple[Any, Any]:
        """Score all of D (+ canaries) with the final model, features kept in the object store, while
        each block's per-shard/per-source partials stream to a fresh aggregator actor."""
        agg = start_aggregator(C, cfg.aggregate.bins, cfg.aggregate.top_k)
        sc_ds = score_dataset(d_final, ckpt_dir, CONFUSED, cfg.ct.arch, spec.channels, C, spec.height, cfg.data,
                              with_features=True, passthrough=("shard", "source"))
        sc_ds = feed_aggregator(sc_ds, agg, C, cfg.aggregate.bins, cfg.aggregate.top_k, cfg.data.read_cpus)
        return sc_ds.materialize(), agg

    def share(n: int, of: int) -> float | None:
        return n / of if of else None

    final_scores: dict[str, np.ndarray] | None = None
    agg = None
    for r in range(len(state["rounds"]), cfg.ct.rounds):
        t = time.monotonic()
        ckpt = cio.join(out, "checkpoints", f"round_{r}")
        # in-round checkpoints only with worker processes: local mode has no worker to lose (ray-notes §4)
        every = cfg.scale.checkpoint_every if cfg.scale.num_workers > 0 else None
        job = {"cfg": cfg_d, "num_classes": C, "round": r, "train_fbase": fbase_ckpt is None,
               "fbase_ckpt": fbase_ckpt, "prev_base_ckpt": prev_ckpt, "keep": keep, "ckpt_dir": ckpt,
               "checkpoint_every": every}
        # A failed worker group is restarted up to max_failures times; the loop then continues from the
        # latest in-round checkpoint (ctray.training.loop). num_to_keep=1: only the latest is ever read.
        # The two ignores: ray.train.torch rebinds TorchTrainer to the Train V2 class at import (V2 is on by
        # default), whose loop may return a value (result.return_value); mypy sees only the V1 declaration
        trainer = TorchTrainer(
            train_loop_per_worker,  # type: ignore[arg-type]
            train_loop_config=job, scaling_config=scaling_cfg,
            datasets={"train": d_usable, "reserve": r_usable},
            run_config=ray.train.RunConfig(
                name=f"round-{r}", storage_path=storage,
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
        if fbase_ckpt is None:
            fbase_ckpt = ckpt
            state["fbase_ckpt"] = ckpt
        prev_ckpt = ckpt
        final = r == cfg.ct.rounds - 1
        # ---- score ALL of D with confused_r
        t2 = time.monotonic()
        if final:
            scored, agg = final_pass(ckpt)  # features stay in the object store for the per-class PCA
        else:
            scored = score_dataset(d_usable, ckpt, CONFUSED, cfg.ct.arch, spec.channels, C, spec.height, cfg.data)
        sc = collect_scores(scored)
        _check_scored(sc["sid"], sorted_sids, f"scoring pass of round {r + 1}")
        losses = align(sc["sid"], sc["loss"])
        round_losses.append(losses)
        score_s = time.monotonic() - t2
        info: dict[str, Any] = {"round": r, "train_seconds": round(fit_s, 2), "score_seconds": round(score_s, 2),
                                "n_train_set": int(inner.get("n_dr", 0)), "phase_seconds": inner.get("times", {}),
                                "resumed_from": inner.get("resumed_from")}
        rs = {"ckpt": ckpt, "losses": f"rounds/round_{r}_losses.npz"}
        _save_npz(cio.join(out, rs["losses"]), sid=sc["sid"], loss=sc["loss"])
        if not final:
            keep_n = keep_count(cfg.ct.keep_ratio[r], N)
            kept_idx = distill(losses, labels, keep_n, cfg.ct.floor_k[r], C)
            keep = sids[kept_idx]
            rs["kept"] = f"rounds/round_{r}_kept.npy"
            _save_npy(cio.join(out, rs["kept"]), keep)
            info["kept"] = int(len(kept_idx))
            if n_can:
                info["kept_canaries"] = int((kept_idx >= n_real).sum())
            if truth is not None:
                info["kept_poison"] = int(truth[0][kept_idx].sum())
            log.info("round %d/%d: train %.1fs, score %.1fs, kept %d of %d%s", r + 1, cfg.ct.rounds, fit_s, score_s,
                     len(kept_idx), N, f" ({info['kept_poison']} poison)" if truth is not None else "")
        else:
            t3 = time.monotonic()
            proj = class_projections(scored, C, cfg.data.read_cpus)
            _check_scored(proj["sid"], sorted_sids, "final projection pass")
            final_scores = {"pred": align(sc["sid"], sc["pred"]), "prob": align(sc["sid"], sc["prob"]),
                            "proj_x": align(proj["sid"], proj["proj_x"]), "proj_y": align(proj["sid"], proj["proj_y"])}
            info["decide_seconds"] = round(time.monotonic() - t3, 2)
            info["kept"] = None
            log.info("round %d/%d (final): train %.1fs, score %.1fs", r + 1, cfg.ct.rounds, fit_s, score_s)
        rs["info"] = info
        rounds_info.append(info)
        state["rounds"].append(rs)
        cio.write_json(state_path, state)
        if on_round is not None and not final:
            on_round({"round": r, "rounds": cfg.ct.rounds, "final": False, "kept": info["kept"],
                      "kept_canaries": info.get("kept_canaries"),
                      "canary_kept_share": share(info.get("kept_canaries", 0), n_can),
                      "poison_kept_share": share(info.get("kept_poison", 0), n_poison)})

    if final_scores is None:  # every round was done before: rescore the final model for the decision
        assert prev_ckpt is not None  # rounds >= 1 (validated) and all were done: the resume loop set it
        scored, agg = final_pass(prev_ckpt)
        sc = collect_scores(scored)
        proj = class_projections(scored, C, cfg.data.read_cpus)
        _check_scored(sc["sid"], sorted_sids, "final rescoring pass")
        _check_scored(proj["sid"], sorted_sids, "final projection pass")
        final_scores = {"pred": align(sc["sid"], sc["pred"]), "prob": align(sc["sid"], sc["prob"]),
                        "proj_x": align(proj["sid"], proj["proj_x"]), "proj_y": align(proj["sid"], proj["proj_y"])}

    # ---- decision
    preds = final_scores["pred"]
    if cfg.decide.flag_budget > 0:  # Ember variant: flag the lowest-loss fraction of the final model
        n_flag = int(N * cfg.decide.flag_budget)
        flagged = np.zeros(N, bool)
        flagged[np.argsort(round_losses[-1], kind="stable")[:n_flag]] = True
        lr = np.ones(C)
        cleansed = np.zeros(C, bool)
    else:
        P2 = np.stack([final_scores["proj_x"], final_scores["proj_y"]], 1).astype(np.float64)
        lr = likelihood_ratios(P2, labels, preds, C)
        cleansed = decide(lr, cfg.decide.threshold_max, cfg.decide.threshold_any)
        flagged = flag_samples(labels, preds, cleansed)
    n = n_real  # user-facing outputs: real samples only (canaries are the last n_can entries)
    dec = Decision.from_outcome(lr, cleansed, flagged[:n], labels[:n], preds[:n], cfg.decide.threshold_max,
                                cfg.decide.threshold_any, cfg.decide.weak_lr)
    weak = dec.weak
    score = final_scores["prob"].astype(np.float64)
    log.info("decision: cleansed classes %s, flagged %d of %d", np.flatnonzero(cleansed).tolist(),
             int(flagged[:n].sum()), n)
    for c in np.flatnonzero(weak):
        log.warning("class %d cleansed on weak evidence: likelihood ratio %.3g < decide.weak_lr %g; %s (report.html)",
                    c, lr[c], cfg.decide.weak_lr, WEAK_EVIDENCE_NOTE)
    canary_info = None
    if cplan is not None:
        canary_info = {"count": n_can, "target": cplan.target, "rate": cfg.canary.rate,
                       "flagged": int(flagged[n:].sum()), "recall": float(flagged[n:].mean()),
                       "outside_flag_rate": float(flagged[:n].mean()),
                       "kept_per_round": [ri.get("kept_canaries") for ri in rounds_info]}
        log.info("canaries: %d of %d flagged (recall %.3f); flag rate outside them %.4f", canary_info["flagged"],
                 n_can, canary_info["recall"], canary_info["outside_flag_rate"])

    # ---- outputs
    from ctray.core.metrics import detection_metrics

    cols: dict[str, Any] = {"shard": shards_ok, "key": keys_ok, "label": labels[:n], "score": score[:n],
                            "flagged": flagged[:n], "pred": preds[:n]}
    for i, rl in enumerate(round_losses):
        cols[f"round_loss_{i}"] = rl[:n].astype(np.float32)
    cols["proj_x"], cols["proj_y"] = final_scores["proj_x"][:n], final_scores["proj_y"][:n]
    metrics: dict[str, Any] | None = None
    if truth is not None:
        cols["truth_poison"], cols["truth_cover"] = truth[0][:n], truth[1][:n]
        metrics = {"ct": detection_metrics(flagged[:n], truth[0][:n], score[:n])}
        rounds_poison = [ri.get("kept_poison") for ri in rounds_info]
        metrics["rounds_kept_poison"] = rounds_poison
    # ---- optional extra column: activation statistics of f_base (BadActs transfer; ctray.engine.defenses)
    if cfg.act.in_detect:
        from ctray.engine.defenses import activation_scores

        t_act = time.monotonic()
        act = activation_scores(cio.join(state["fbase_ckpt"], FBASE), train_paths, clean_paths, cfg)
        act_pos = {(s_, k_): i for i, (s_, k_)
                   in enumerate(zip(act.shard.tolist(), act.key.tolist(), strict=True))}
        at = np.array([act_pos[(s_, k_)] for s_, k_ in zip(shards_ok.tolist(), keys_ok.tolist(), strict=True)])
        cols["score_act"], cols["flagged_act"] = act.score[at], act.flagged[at]
        secs["act"] = time.monotonic() - t_act
        if metrics is not None:
            metrics["act"] = {**detection_metrics(act.flagged[at], truth[0], act.score[at]),  # type: ignore[index]
                              "threshold": act.threshold}
    cio.write_parquet(cio.join(out, "scores.parquet"), pa.table(cols))
    bad = ~ok
    cio.write_parquet(cio.join(out, "quarantine.parquet"), pa.table({
        "shard": ident["shard"][bad].astype(str), "key": ident["key"][bad].astype(str),
        "reason": ident["reason"][bad].astype(str), "level": ident["level"][bad].astype(str)}))
    # ---- per-shard / per-source tables from the aggregator (+ the read's quarantine counts)
    assert agg is not None  # final_pass ran: in the last round or in the rescoring above
    by_shard, by_source, agg_info = ray.get(agg.result.remote())
    ray.kill(agg)
    k_ = (C, cfg.aggregate.bins, cfg.aggregate.top_k)
    bad_rows, failed_rows = ~ok & sample_rows, ~sample_rows
    src_all = ident["source"].astype(str)
    has_src = src_all != ""
    by_shard = by_shard.merge(GroupStats.from_read(ident["shard"].astype(str), bad_rows, failed_rows, *k_))
    by_source = by_source.merge(GroupStats.from_read(src_all[has_src], bad_rows[has_src], failed_rows[has_src], *k_))
    sources_ok = src_all[ok]
    if cfg.decide.flag_budget > 0:
        shard_fl = flagged_by_group(by_shard, shards_ok, flagged[:n])
        source_fl = flagged_by_group(by_source, sources_ok, flagged[:n])
    else:
        shard_fl, source_fl = by_shard.flagged(cleansed), by_source.flagged(cleansed)
    agg_info["consistent"] = bool(int(by_shard.usable.sum()) == n and int(shard_fl.sum()) == int(flagged[:n].sum()))
    if not agg_info["consistent"]:
        log.error("shard aggregation disagrees with the per-sample results (usable %d vs %d, flagged %d vs %d)",
                  int(by_shard.usable.sum()), n, int(shard_fl.sum()), int(flagged[:n].sum()))
    top_ids = np.unique(np.concatenate([by_shard.top_id, by_source.top_id]))
    pos = order[np.clip(np.searchsorted(sorted_sids, top_ids), 0, N - 1)]
    key_of = {int(t): (str(shards_ok[i]), str(keys_ok[i])) for t, i in zip(top_ids, pos, strict=True)
              if i < n and sids[i] == t}
    agg_info.update(write_group_tables(out, by_shard, by_source, shard_fl, source_fl, cfg.aggregate.alpha, key_of))
    cio.write_json(cio.join(out, "decisions.json"), dec.to_json())
    if canary_info is not None:
        cio.write_json(cio.join(out, "canary.json"), canary_info)
    cio.write_json(cio.join(out, "rounds.json"), [
        {"round": ri["round"], "kept": ri.get("kept"), "kept_poison": ri.get("kept_poison"),
         "seconds": ri["train_seconds"] + ri["score_seconds"], **ri} for ri in rounds_info])
    secs["total"] = time.time() - t_start
    secs["rounds"] = sum(ri["train_seconds"] + ri["score_seconds"] for ri in rounds_info)
    if metrics is not None:
        metrics["seconds"] = secs
        cio.write_json(cio.join(out, "metrics.json"), metrics)
    cio.write_bytes(cio.join(out, "config.yaml"), cfg.to_yaml().encode())
    cio.write_json(cio.join(out, "run.json"), {
        "version": __version__, "started": t_start, "finished": time.time(), "train": train_paths,
        "clean": clean_paths, "preset": cfg.preset, "num_classes": C, "image_shape": list(spec.shape),
        "seconds": secs, "aggregate": agg_info, "counts": {"read": n_read, "usable": n, "quarantined": n_quar,
                                    "shard_failures": int((~sample_rows).sum()),
                                    "converted": int((ident["note"][ok].astype(str) != "").sum()),
                                    "flagged": int(flagged[:n].sum()), "canaries": n_can}})
    try:
        from ctray.report import write_report

        write_report(out)  # a remote run directory is staged locally and the page uploaded
    except Exception:  # the report is a view; a plotting failure must not lose the run's results
        log.exception("report.html could not be written; results are in %s", out)
    fl = np.flatnonzero(flagged[:n])
    if on_round is not None:
        on_round({"round": cfg.ct.rounds - 1, "rounds": cfg.ct.rounds, "final": True, "kept": None,
                  "kept_canaries": None, "canary_kept_share": None, "poison_kept_share": None,
                  "n_flagged": int(len(fl)), "flag_rate": float(len(fl) / n),
                  "canary_recall": canary_info["recall"] if canary_info else None,
                  "cleansed": np.flatnonzero(cleansed).tolist(), "metrics": metrics["ct"] if metrics else None})
    return DetectResult(run_dir=out, n_read=n_read, n_usable=n, n_quarantined=n_quar, n_flagged=int(len(fl)),
                        flagged_keys=[(shards_ok[i], keys_ok[i]) for i in fl],
                        cleansed_classes=np.flatnonzero(cleansed).tolist(), weak_classes=np.flatnonzero(weak).tolist(), metrics=metrics, seconds=secs,
                        canary=canary_info)


def _check_scored(got: np.ndarray, sorted_sids: np.ndarray, what: str) -> None:
    """Every usable sample exactly once: a Ray Data task retried after a failure must neither drop nor
    repeat rows (Ray Data replaces a failed task's output; this guards that contract).

    Raises:
        RuntimeError: naming the pass and how many ids are missing, repeated or unknown.
    """
    got = np.sort(np.asarray(got, dtype=np.int64))
    if len(got) == len(sorted_sids) and np.array_equal(got, sorted_sids):
        return
    uniq, counts = np.unique(got, return_counts=True)
    missing = int(len(np.setdiff1d(sorted_sids, uniq, assume_unique=True)))
    unknown = int(len(np.setdiff1d(uniq, sorted_sids, assume_unique=True)))
    repeated = int((counts > 1).sum())
    raise RuntimeError(f"{what}: got {len(got)} rows for {len(sorted_sids)} usable samples ({missing} missing, "
                       f"{repeated} repeated, {unknown} unknown sample ids); refusing to write scores")


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz at a local path or URI (read into memory: no temporary file)."""
    import io

    with np.load(io.BytesIO(cio.read_bytes(path))) as z:
        return {k: z[k] for k in z.files}


def _load_npy(path: str) -> np.ndarray:
    import io

    return np.load(io.BytesIO(cio.read_bytes(path)))


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, allow_pickle=True, **arrays)  # its default, named so mypy does not bind **arrays to it
    cio.write_bytes(path, buf.getvalue())


def _save_npy(path: str, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    cio.write_bytes(path, buf.getvalue())


def run_detect(preset: str | None, overrides: dict[str, Any], config_file: str | None = None) -> DetectResult:
    """CLI helper: resolve the preset (auto when none) and run."""
    if not preset and not config_file:
        train = overrides.get("io.train") or []
        name, why = choose_preset(train, bool(overrides.get("scale.use_gpu", False)))
        log.info("no --preset given: using %r (%s)", name, why)
        preset = name
    return detect(load_config(preset, overrides, config_file))
