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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ctray import io as cio
from ctray._version import __version__
from ctray.config import Config, load_config
from ctray.errors import ConfigError, DataError

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


# ---------------------------------------------------------------------------------------------- ray


def ensure_ray() -> None:
    """Attach to a running cluster (``RAY_ADDRESS`` / ``ray start``) or start a local one."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(log_to_driver=True, logging_level=logging.WARNING)
    # Ray's helper processes (e.g. Train's placement-group cleaner) call a bare ray.init(): point them at
    # this cluster, or they fail when another local Ray runs on the same machine.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False


def _scaling(cfg: Config) -> tuple[Any, int]:
    """ScalingConfig with fractional CPUs so Ray Data keeps room (the 2-CPU deadlock, ray-notes §5.1)."""
    import ray
    import ray.train

    s = cfg.scale
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if s.num_workers == 0:  # local mode: the loop runs in this process
        return ray.train.ScalingConfig(num_workers=0), s.torch_threads or max(1, os.cpu_count() or 1)
    per = s.cpus_per_worker or max(0.25, min(float(os.cpu_count() or 1), (cpus - 0.5) / s.num_workers))
    threads = s.torch_threads or max(1, int(round(per)))
    res = {"CPU": per}
    if s.use_gpu:
        res["GPU"] = s.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=res), threads


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
    d["scale"] = {}  # the worker layout may change between attempts without changing the result's meaning
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


def detect(cfg: Config) -> DetectResult:
    """Run Confusion Training over ``cfg.io.train`` with the reserve ``cfg.io.clean``; write ``cfg.io.out``.

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

    from ctray.core.decide import decide, flag_samples, likelihood_ratios
    from ctray.core.distill import distill, keep_count
    from ctray.data.reader import read_shards, usable
    from ctray.engine.score import class_projections, collect_scores, score_dataset
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
    ds_all = read_shards(train_paths, spec, n_cls, num_cpus=cfg.data.read_cpus, strict=cfg.data.strict).materialize()
    ident = collect_scores(ds_all, ("shard", "key", "sid", "label", "ok", "reason", "level", "note"))
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
    N = len(sids)
    order = np.argsort(sids)
    sorted_sids = sids[order]

    def align(s: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Values ``v`` keyed by sids ``s`` -> the driver's sample order."""
        pos = np.searchsorted(sorted_sids, s)
        outv = np.empty(N, dtype=v.dtype)
        outv[order[pos]] = v
        return outv

    d_usable = usable(ds_all)
    r_usable = usable(ds_r)
    cfg_d = cfg.to_dict()
    scaling, threads = _scaling(cfg)
    cfg_d["scale"]["torch_threads"] = threads

    # ---- resume state
    fp = _fingerprint(cfg, train_paths, clean_paths)
    state_path = cio.join(out, "state.json")
    state: dict[str, Any] = {"fingerprint": fp, "rounds": []}
    if cio.exists(state_path):
        old = cio.read_json(state_path)
        if old.get("fingerprint") != fp:
            raise ConfigError(f"run directory {out} holds a run with another config or inputs "
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
        round_losses.append(align(np.load(_local(cio.join(out, rs["losses"])))["sid"],
                                  np.load(_local(cio.join(out, rs["losses"])))["loss"]))
        fbase_ckpt = state["fbase_ckpt"]
        prev_ckpt = rs["ckpt"]
        keep = np.load(_local(cio.join(out, rs["kept"]))) if rs.get("kept") else None
        rounds_info.append(rs["info"])

    truth = load_truth(cfg.io.truth, shards_ok, keys_ok) if cfg.io.truth else None
    final_scores: dict[str, np.ndarray] | None = None
    for r in range(len(state["rounds"]), cfg.ct.rounds):
        t = time.monotonic()
        ckpt = cio.join(out, "checkpoints", f"round_{r}")
        job = {"cfg": cfg_d, "num_classes": C, "round": r, "train_fbase": fbase_ckpt is None,
               "fbase_ckpt": fbase_ckpt, "prev_base_ckpt": prev_ckpt, "keep": keep, "ckpt_dir": ckpt}
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=job, scaling_config=scaling,
            datasets={"train": d_usable, "reserve": r_usable},
            run_config=ray.train.RunConfig(name=f"round-{r}", storage_path=storage,
                                           failure_config=ray.train.FailureConfig(max_failures=2)))
        result = trainer.fit()
        if not cio.exists(cio.join(ckpt, CONFUSED)):
            raise RuntimeError(f"round {r}: training wrote no checkpoint to {ckpt}")
        fit_s = time.monotonic() - t
        inner = result.return_value or {}
        if fbase_ckpt is None:
            fbase_ckpt = ckpt
            state["fbase_ckpt"] = ckpt
        prev_ckpt = ckpt
        final = r == cfg.ct.rounds - 1
        # ---- score ALL of D with confused_r
        t2 = time.monotonic()
        scored = score_dataset(d_usable, ckpt, CONFUSED, cfg.ct.arch, spec.channels, C, spec.height, cfg.data,
                               with_features=final)
        if final:
            scored = scored.materialize()  # features stay in the object store for the per-class PCA
        sc = collect_scores(scored)
        losses = align(sc["sid"], sc["loss"])
        round_losses.append(losses)
        score_s = time.monotonic() - t2
        info: dict[str, Any] = {"round": r, "train_seconds": round(fit_s, 2), "score_seconds": round(score_s, 2),
                                "n_train_set": int(inner.get("n_dr", 0)), "phase_seconds": inner.get("times", {})}
        rs: dict[str, Any] = {"ckpt": ckpt, "losses": f"rounds/round_{r}_losses.npz"}
        _save_npz(cio.join(out, rs["losses"]), sid=sc["sid"], loss=sc["loss"])
        if not final:
            keep_n = keep_count(cfg.ct.keep_ratio[r], N)
            kept_idx = distill(losses, labels, keep_n, cfg.ct.floor_k[r], C)
            keep = sids[kept_idx]
            rs["kept"] = f"rounds/round_{r}_kept.npy"
            _save_npy(cio.join(out, rs["kept"]), keep)
            info["kept"] = int(len(kept_idx))
            if truth is not None:
                info["kept_poison"] = int(truth[0][kept_idx].sum())
            log.info("round %d/%d: train %.1fs, score %.1fs, kept %d of %d%s", r + 1, cfg.ct.rounds, fit_s, score_s,
                     len(kept_idx), N, f" ({info['kept_poison']} poison)" if truth is not None else "")
        else:
            t3 = time.monotonic()
            proj = class_projections(scored, C, cfg.data.read_cpus)
            final_scores = {"pred": align(sc["sid"], sc["pred"]), "prob": align(sc["sid"], sc["prob"]),
                            "proj_x": align(proj["sid"], proj["proj_x"]), "proj_y": align(proj["sid"], proj["proj_y"])}
            info["decide_seconds"] = round(time.monotonic() - t3, 2)
            info["kept"] = None
            log.info("round %d/%d (final): train %.1fs, score %.1fs", r + 1, cfg.ct.rounds, fit_s, score_s)
        rs["info"] = info
        rounds_info.append(info)
        state["rounds"].append(rs)
        cio.write_json(state_path, state)

    if final_scores is None:  # every round was done before: rescore the final model for the decision
        scored = score_dataset(d_usable, prev_ckpt, CONFUSED, cfg.ct.arch, spec.channels, C, spec.height, cfg.data,
                               with_features=True).materialize()
        sc = collect_scores(scored)
        proj = class_projections(scored, C, cfg.data.read_cpus)
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
    score = final_scores["prob"].astype(np.float64)
    decisions = {
        "classes": [{"class": c, "n": int((labels == c).sum()), "n_isolated": int(((labels == c) & (preds == c)).sum()),
                     "lr": float(lr[c]), "cleansed": bool(cleansed[c])} for c in range(C)],
        "threshold_max": cfg.decide.threshold_max, "threshold_any": cfg.decide.threshold_any,
        "n_flagged": int(flagged.sum()),
    }
    log.info("decision: cleansed classes %s, flagged %d of %d", np.flatnonzero(cleansed).tolist(), int(flagged.sum()), N)

    # ---- outputs
    from ctray.core.metrics import detection_metrics

    cols: dict[str, Any] = {"shard": shards_ok, "key": keys_ok, "label": labels, "score": score, "flagged": flagged,
                            "pred": preds}
    for i, rl in enumerate(round_losses):
        cols[f"round_loss_{i}"] = rl.astype(np.float32)
    cols["proj_x"], cols["proj_y"] = final_scores["proj_x"], final_scores["proj_y"]
    metrics = None
    if truth is not None:
        cols["truth_poison"], cols["truth_cover"] = truth
        metrics = {"ct": detection_metrics(flagged, truth[0], score)}
        rounds_poison = [ri.get("kept_poison") for ri in rounds_info]
        metrics["rounds_kept_poison"] = rounds_poison
    # ---- optional extra column: activation statistics of f_base (BadActs transfer; ctray.engine.defenses)
    if cfg.act.in_detect:
        from ctray.engine.defenses import activation_scores

        t_act = time.monotonic()
        act = activation_scores(cio.join(state["fbase_ckpt"], FBASE), train_paths, clean_paths, cfg)
        pos = {(s_, k_): i for i, (s_, k_) in enumerate(zip(act.shard.tolist(), act.key.tolist(), strict=True))}
        at = np.array([pos[(s_, k_)] for s_, k_ in zip(shards_ok.tolist(), keys_ok.tolist(), strict=True)])
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
    _write_shards_table(out, ident, ok, flagged, score, shards_ok)
    cio.write_json(cio.join(out, "decisions.json"), decisions)
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
        "seconds": secs, "counts": {"read": n_read, "usable": N, "quarantined": n_quar,
                                    "shard_failures": int((~sample_rows).sum()),
                                    "converted": int((ident["note"][ok].astype(str) != "").sum()),
                                    "flagged": int(flagged.sum())}})
    if not cio.is_remote(out):
        try:
            from ctray.report import write_report

            write_report(out)
        except Exception:  # the report is a view; a plotting failure must not lose the run's results
            log.exception("report.html could not be written; results are in %s", out)
    fl = np.flatnonzero(flagged)
    return DetectResult(run_dir=out, n_read=n_read, n_usable=N, n_quarantined=n_quar, n_flagged=int(flagged.sum()),
                        flagged_keys=[(shards_ok[i], keys_ok[i]) for i in fl],
                        cleansed_classes=np.flatnonzero(cleansed).tolist(), metrics=metrics, seconds=secs)


def _local(path: str) -> str:
    if cio.is_remote(path):
        import tempfile

        tmp = tempfile.NamedTemporaryFile(delete=False, suffix=os.path.splitext(path)[1])
        tmp.write(cio.read_bytes(path))
        tmp.close()
        return tmp.name
    return path


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    cio.write_bytes(path, buf.getvalue())


def _save_npy(path: str, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    cio.write_bytes(path, buf.getvalue())


def _write_shards_table(out: str, ident: dict[str, np.ndarray], ok: np.ndarray, flagged: np.ndarray,
                        score: np.ndarray, shards_ok: np.ndarray) -> None:
    import pandas as pd

    allrows = pd.DataFrame({"shard": ident["shard"].astype(str), "ok": ok,
                            "sample": ident["level"].astype(str) == "sample"})
    g = allrows.groupby("shard").agg(samples=("sample", "sum"), usable=("ok", "sum"))
    g["quarantined"] = g["samples"] - g["usable"]
    s = pd.DataFrame({"shard": shards_ok, "flagged": flagged, "score": score}).groupby("shard").agg(
        flagged=("flagged", "sum"), mean_score=("score", "mean"))
    g = g.join(s, how="left").fillna({"flagged": 0}).reset_index().sort_values(["flagged", "shard"],
                                                                               ascending=[False, True])
    cio.write_parquet(cio.join(out, "shards.parquet"), pa.Table.from_pandas(g, preserve_index=False))


def run_detect(preset: str | None, overrides: dict[str, Any], config_file: str | None = None) -> DetectResult:
    """CLI helper: resolve the preset (auto when none) and run."""
    if not preset and not config_file:
        train = overrides.get("io.train") or []
        name, why = choose_preset(train, bool(overrides.get("scale.use_gpu", False)))
        log.info("no --preset given: using %r (%s)", name, why)
        preset = name
    return detect(load_config(preset, overrides, config_file))
