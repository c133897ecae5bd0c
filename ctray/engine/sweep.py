"""``ctray sweep``: Ray Tune over CT's knobs, scored by canaries (no truth) or by F1 (with truth).

Shape (Tune's current API, ray-notes §3d/§7): a driver FUNCTION per trial, wrapped by
``ray.tune.Tuner(ray.tune.with_resources(fn, {"cpu": 0.01}))``. A trial does not train in its own
process: Ray Train refuses ``ray.train.report`` inside a Tune session, which the local-mode loop
calls. So each trial starts one Ray task that runs :func:`ctray.engine.detect.detect` (holding
``sweep.trial_cpus`` CPUs for its local-mode training; outside the trial's placement group, so its Ray
Data ops see the cluster) and streams one report per CT round back through a queue; the trial hands
each to ``ray.tune.report``. ASHA compares trials at every round:

- rounds before the last report a proxy: the share of the canaries (without truth) or of the
  truth poison (with ``--truth``) that the distillation kept; CT should keep poison, so higher is better;
- the last round reports the objective: with truth, F1 of the flagged set; without, the canary
  objective ``canary_recall - sweep.flag_weight * (flag rate outside the canaries)``.

Resources on one machine: each trial holds 0.01 CPU, its CT task ``trial_cpus``; Data ops (read,
scoring) are sized to fit the rest, so Train and Data cannot starve each other (ray-notes §5.1). On a
cluster set ``sweep.max_concurrent`` and, for multi-worker trials, ``scale.num_workers``.

Outputs under ``--out``: ``trials.parquet`` (one row per trial + the ``baseline`` row: the preset
unchanged), ``best.yaml`` (``ctray detect --config best.yaml`` reruns the best trial's settings),
``objective.png`` (objective over each searched parameter), ``trials/<id>/`` (each trial's run
directory) and ``tune/`` (Tune's own state).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from ctray.config import DATA_RESOURCE_KEYS, Config, load_config, parse_overrides
from ctray.errors import ConfigError

log = logging.getLogger(__name__)

#: The search space when no ``--space`` file is given. ``scale: true`` multiplies the preset's
#: per-round values (so one space fits every preset); a scalar for a per-round list sets every round.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "ct.lam": {"uniform": [10, 40]},  # confusion factor, one value for every round (paper: 15-30)
    "ct.lr": {"loguniform": [0.5, 2.0], "scale": True},  # confusion lr, x the preset's per-round lr
    "ct.iters": {"choice": [0.5, 1.0, 1.5], "scale": True},  # confusion iterations per round
    "ct.batch_factor": {"choice": [1, 2, 4]},  # a mixed (inspection) step every b-th step
    "ct.pretrain_epochs": {"choice": [0.5, 1.0, 1.5], "scale": True},
    "ct.keep_ratio": {"choice": [0.5, 1.0, 2.0], "scale": True},  # distillation: kept fraction per round
}
_KINDS = ("uniform", "loguniform", "choice", "randint")
#: Keys the sweep sets for its own machinery: never copied into best.yaml.
_MACHINE_PREFIXES = ("io.", "sweep.", "canary.", "scale.")  # io.phase_cache included
_MACHINE_KEYS = tuple(f"data.{k}" for k in DATA_RESOURCE_KEYS)


@dataclass
class SweepResult:
    """What a sweep produced.

    Attributes:
        out_dir: the sweep directory.
        objective: ``"f1"`` (with truth) or ``"canary"`` (canary recall - flag_weight x outside flag rate).
        trials: one dict per row of ``trials.parquet`` (trials, then the baseline when run).
        best: the best finished trial's row.
        warning: non-empty when the objective could not rank the trials: with the canary objective, no
            finished trial isolated a single canary, so the scores only reward flagging less; best.yaml
            then holds the preset unchanged (see :func:`uninformative_canaries`).
        baseline: the baseline row (the preset unchanged), or None.
        best_config: path of ``best.yaml``.
        plot: path of ``objective.png``.
        seconds: wall time of the sweep.
    """

    out_dir: str
    objective: str
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    baseline: dict[str, Any] | None
    best_config: str
    plot: str
    seconds: float = 0.0
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    # empty, or why the objective could not rank the trials (then best.yaml keeps the preset unchanged)
    warning: str = ""
    # runs (trials + baseline) by how they got f_base / round 0's pretraining (phase_reuse)
    reuse: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- space


def load_space(space: str | dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """A search space from a YAML file, a dict, or None (:data:`DEFAULT_SPACE`), checked.

    Each entry is ``key: {KIND: ARGS[, scale: true]}`` with KIND one of ``uniform [lo, hi]``,
    ``loguniform [lo, hi]``, ``choice [v1, v2, ...]`` (values may be lists, e.g. whole keep-ratio
    schedules), ``randint [lo, hi)``. ``key`` is any config field (``ct.lam``), or one entry of a
    per-round list (``ct.lam.5``).

    Raises:
        ConfigError: unreadable file, or an entry that is not of that form (named).
    """
    if space is None:
        data: Any = DEFAULT_SPACE
    elif isinstance(space, dict):
        data = space
    else:
        try:
            with open(space) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read the search space {space}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"search space {space} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"the search space must be a non-empty mapping key -> {{kind: args}}, got {data!r}")
    out: dict[str, dict[str, Any]] = {}
    for key, spec in data.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"search space {key}: expected {{kind: args}} with kind in {_KINDS}, got {spec!r}")
        kinds = [k for k in spec if k in _KINDS]
        extra = set(spec) - set(_KINDS) - {"scale"}
        if len(kinds) != 1 or extra:
            raise ConfigError(f"search space {key}: give exactly one of {_KINDS} (+ optional scale), got {sorted(spec)}")
        kind, args = kinds[0], spec[kinds[0]]
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ConfigError(f"search space {key}: choice needs a non-empty list, got {args!r}")
        elif not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, int | float) for a in args)
                  and args[0] < args[1]):
            raise ConfigError(f"search space {key}: {kind} needs [low, high] with low < high, got {args!r}")
        elif kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"search space {key}: loguniform needs low > 0, got {args!r}")
        out[str(key)] = {kind: args, "scale": bool(spec.get("scale", False))}
    return out


def _domain(spec: dict[str, Any]) -> Any:
    import ray.tune

    if "uniform" in spec:
        return ray.tune.uniform(*spec["uniform"])
    if "loguniform" in spec:
        return ray.tune.loguniform(*spec["loguniform"])
    if "randint" in spec:
        return ray.tune.randint(int(spec["randint"][0]), int(spec["randint"][1]))
    return ray.tune.choice(spec["choice"])


def _current(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        if isinstance(obj, list) and part.isdigit():
            obj = obj[int(part)]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise ConfigError(f"search space key {key!r}: {part!r} is not a config field")
    return obj


def _scaled(x: Any, v: float, key: str) -> Any:
    if isinstance(x, bool):
        raise ConfigError(f"search space {key}: scale applies to numbers, not booleans")
    if isinstance(x, int):
        return max(1 if x >= 1 else 0, int(round(x * v)))
    y = float(x) * v
    return min(1.0, y) if "keep_ratio" in key.split(".") else y


def space_overrides(space: dict[str, dict[str, Any]], values: dict[str, Any], base: Config) -> dict[str, Any]:
    """Turn one trial's sampled ``values`` into config overrides against the ``base`` config.

    A ``scale`` entry multiplies the base value (each entry of a per-round list; integers are rounded
    and stay >= 1, keep ratios stay <= 1); a scalar for a list field sets every entry.
    """
    ov: dict[str, Any] = {}
    for key, spec in space.items():
        v = values[key]
        cur = _current(base, key)
        if spec["scale"]:
            if not isinstance(v, int | float):
                raise ConfigError(f"search space {key}: scale needs numeric values, got {v!r}")
            ov[key] = [_scaled(x, v, key) for x in cur] if isinstance(cur, list) else _scaled(cur, v, key)
        elif isinstance(cur, list) and not isinstance(v, list):
            ov[key] = [v] * len(cur)
        else:
            ov[key] = v
    return ov


# ------------------------------------------------------------------------------------------ resources


def plan_resources(cfg: Config, user_keys: set[str], baseline: bool) -> tuple[int, float, dict[str, Any]]:
    """Size the sweep for the cluster Ray reports: ``(max concurrent trials, CPUs of each CT task,
    overrides for every trial)``.

    Defaults (each only when the user did not set the key): local-mode training
    (``scale.num_workers=0``), ``torch_threads`` = CPUs / concurrent runs, and Data ops (read,
    scoring tasks) at 45% of the CPUs left per run (a scoring and a read task of every run fit at once) after the trials' and tasks' shares, so Data can
    always run beside the training (the 2-CPU deadlock, ray-notes §5.1).
    """
    import ray

    from ctray.engine.cluster import alive_node_shapes

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    sw = cfg.sweep
    conc = sw.max_concurrent or max(1, min(sw.num_samples, int(cpus)))
    runs = conc + (1 if baseline else 0)
    ov: dict[str, Any] = {}
    local = cfg.scale.num_workers == 0 or "scale.num_workers" not in user_keys
    if "scale.num_workers" not in user_keys:
        ov["scale.num_workers"] = 0
    if "scale.torch_threads" not in user_keys:
        # the trials' share of the cluster's CPUs, at most one node's worth (a trial is one process); the
        # loop also caps it at the cores of the machine the trial lands on. Not the driver's machine.
        node = max((s.resources or {}).get("CPU", 0.0) for s in alive_node_shapes(ray.nodes()))
        ov["scale.torch_threads"] = max(1, int(min(node, cpus) // runs))
    task_cpus = sw.trial_cpus if local else 0.01
    share = max(0.05, (cpus - runs * (task_cpus + 0.01)) / runs)
    # a run's scoring task and one upstream task must fit at the same time in EVERY run, or each run's
    # scoring holds the last CPU share while its own read/usable tasks wait (measured: 2 trials + the
    # baseline on 2 CPUs hung with 0.9 * share per op); hence half of the share per op
    for key, cur in (("data.score_cpus", cfg.data.score_cpus), ("data.read_cpus", cfg.data.read_cpus)):
        if key not in user_keys:
            ov[key] = round(min(cur, 0.45 * share), 3)
    log.info("sweep resources: %.0f CPUs, %d trials at once (+ baseline: %s), %.2f CPU per CT task, Data ops %s",
             cpus, conc, baseline, task_cpus, {k: v for k, v in ov.items() if k.startswith("data.")})
    return conc, task_cpus, ov


# ---------------------------------------------------------------------------------------------- trial


def _run_detect(preset: str, overrides: dict[str, Any], queue: Any) -> dict[str, Any]:
    """The body of one CT run (a Ray task): detect with per-round reports into ``queue``."""
    from ctray.engine.detect import detect

    cfg = load_config(preset, overrides)
    res = detect(cfg, on_round=queue.put if queue is not None else None)
    return {"run_dir": res.run_dir, "n_usable": res.n_usable, "n_flagged": res.n_flagged, "metrics": res.metrics,
            "canary": res.canary,
            "cleansed": res.cleansed_classes, "seconds": res.seconds.get("total")}


def trial_metrics(info: dict[str, Any], objective: str, flag_weight: float) -> dict[str, Any]:
    """Tune metrics of one round report of :func:`ctray.engine.detect.detect`'s ``on_round``.

    ``score`` is what ASHA compares (higher = better): the kept share of canaries / truth poison
    after a non-final round, the objective after the final one.
    """
    from ctray.engine.canary import canary_objective

    nan = float("nan")
    m: dict[str, Any] = {"round": int(info["round"]), "final": bool(info["final"])}
    if not info["final"]:
        proxy = info["poison_kept_share"] if objective == "f1" else info["canary_kept_share"]
        m["score"] = float(proxy) if proxy is not None else 0.0
        m["objective"] = nan
        return m
    ct = info.get("metrics") or {}
    if objective == "f1":
        obj = float(ct.get("f1") or 0.0)
    else:
        obj = canary_objective(info["canary_recall"] or 0.0, info["flag_rate"], flag_weight)
    m.update(score=obj, objective=obj, flag_rate=float(info["flag_rate"]), n_flagged=int(info["n_flagged"]),
             canary_recall=nan if info.get("canary_recall") is None else float(info["canary_recall"]),
             cleansed=json.dumps(info.get("cleansed", [])))
    for k in ("tpr", "fpr", "precision", "f1"):
        m[k] = float(ct[k]) if ct.get(k) is not None else nan
    return m


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: start the CT task, forward its round reports to Tune, cancel it if stopped."""
    import ray
    import ray.tune
    from ray.util.queue import Empty, Queue

    tid = ray.tune.get_context().get_trial_id()
    base = load_config(ctx["preset"], ctx["overrides"])
    ov = {**ctx["overrides"], **space_overrides(ctx["space"], config, base),
          "io.out": os.path.join(ctx["out"], "trials", tid)}
    queue = Queue(actor_options={"num_cpus": 0})
    # "DEFAULT": outside this trial's placement group, so the task's Ray Data ops use the cluster
    ref = ray.remote(max_retries=0)(_run_detect).options(num_cpus=ctx["task_cpus"], scheduling_strategy="DEFAULT"
                                                         ).remote(ctx["preset"], ov, queue)
    done = False
    try:
        while not done:
            try:
                info = queue.get(timeout=2.0)
            except Empty:
                if ray.wait([ref], timeout=0)[0] and queue.empty():
                    ray.get(ref)  # raises the run's error; a run that ended without a final report is a bug
                    raise RuntimeError(f"trial {tid}: the CT run ended without its final report") from None
                continue
            done = bool(info["final"])
            ray.tune.report(trial_metrics(info, ctx["objective"], ctx["flag_weight"]))
        ray.get(ref)
    finally:
        if not done:  # stopped by ASHA or failed: do not leave the CT task running
            ray.cancel(ref, force=True)


# ---------------------------------------------------------------------------------------------- sweep


def sweep(train: str | list[str], clean: str | list[str], out: str, truth: str | None = None,
          num_samples: int | None = None, preset: str | None = None, space: str | dict[str, Any] | None = None,
          overrides: dict[str, Any] | list[str] | None = None) -> SweepResult:
    """Search CT's knobs with Ray Tune; the Python twin of ``ctray sweep``.

    Args:
        train: suspect shards (as ``ctray detect --train``).
        clean: the trusted clean reserve.
        out: the sweep directory (trials.parquet, best.yaml, objective.png, trials/, tune/).
        truth: optional ground truth (shard, key, poison): the objective becomes F1 of the flagged set.
            Without it the engine plants canaries (``sweep.canary_rate``) and optimises
            ``canary_recall - sweep.flag_weight * flag rate outside the canaries``.
        num_samples: trials (default ``sweep.num_samples``).
        preset: the preset the trials start from (default: chosen from the data, as ``ctray detect``).
        space: a YAML file or dict (see :func:`load_space`); None = :data:`DEFAULT_SPACE`.
        overrides: ``key=value`` strings or a dict, applied to every trial (e.g. ``{"ct.iters": [20] * 6}``);
            ``sweep.*`` keys tune the sweep itself.

    Returns:
        A :class:`SweepResult`.

    Raises:
        ConfigError / DataError: bad inputs, space or overrides (named); RuntimeError when no trial finished.
    """
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from ctray.engine.cluster import ensure_ray
    from ctray.engine.ground import choose_preset

    t0 = time.time()
    ov: dict[str, Any] = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    ov["io.train"] = [train] if isinstance(train, str) else list(train)
    ov["io.clean"] = [clean] if isinstance(clean, str) else list(clean)
    if truth:
        ov["io.truth"] = os.path.abspath(truth)
    if num_samples is not None:
        ov["sweep.num_samples"] = int(num_samples)
    if not preset:
        preset, why = choose_preset(ov["io.train"], bool(ov.get("scale.use_gpu", False)))
        log.info("no --preset given: using %r (%s)", preset, why)
    objective = "f1" if truth else "canary"
    user_keys = set(ov)
    cfg = load_config(preset, ov)
    if objective == "canary" and "canary.rate" not in user_keys:
        ov["canary.rate"] = cfg.sweep.canary_rate
    sp = load_space(space)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    ensure_ray()
    conc, task_cpus, res_ov = plan_resources(cfg, user_keys, cfg.sweep.baseline)
    ov.update(res_ov)
    cfg = load_config(preset, ov)
    # check the space against the config now, not in every trial: one sample of each key must resolve
    sample = {k: _domain(s).sample() for k, s in sp.items()}
    load_config(preset, {**ov, **space_overrides(sp, sample, cfg)})

    if cfg.sweep.share_phases and "io.phase_cache" not in user_keys:
        ov["io.phase_cache"] = os.path.join(out, "cache")  # f_base trained once, copied by every other run
    if ov.get("io.phase_cache"):
        from ctray.training.phasecache import start_claims

        claims = start_claims(ov["io.phase_cache"])  # lives as long as this driver; trials find it by name
        ray.get(claims.holder.remote(""))  # started before the first trial looks for it
    ctx = {"preset": preset, "overrides": ov, "space": sp, "out": out, "objective": objective,
           "flag_weight": cfg.sweep.flag_weight, "task_cpus": task_cpus}
    baseline_ref = None
    if cfg.sweep.baseline:
        b_ov = {**ov, "io.out": os.path.join(out, "baseline")}
        baseline_ref = ray.remote(max_retries=0)(_run_detect).options(num_cpus=task_cpus).remote(preset, b_ov, None)
    rounds = cfg.ct.rounds
    grace = cfg.sweep.grace_rounds or max(1, rounds // 2)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(ray.tune.with_parameters(_trial, ctx=ctx), {"cpu": 0.01}),
        param_space={k: _domain(s) for k, s in sp.items()},
        tune_config=ray.tune.TuneConfig(
            metric="score", mode="max", num_samples=cfg.sweep.num_samples,
            search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=conc),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=rounds, grace_period=min(grace, rounds),
                                    reduction_factor=cfg.sweep.reduction_factor)),
        run_config=ray.tune.RunConfig(name="tune", storage_path=out, verbose=0))
    log.info("sweep: %d trials (%d at once) over %s; objective %s; ASHA grace %d of %d rounds", cfg.sweep.num_samples,
             conc, sorted(sp), objective, grace, rounds)
    grid = tuner.fit()

    # by index: ResultGrid iterates only through the legacy __getitem__ protocol, which mypy does not know
    rows = [_trial_row(grid[i], sp, ctx, cfg) for i in range(len(grid))]
    rows.sort(key=lambda r: r["trial"])
    base_row = None
    if baseline_ref is not None:
        base_row = _baseline_row(baseline_ref, objective, cfg.sweep.flag_weight, sp)
        rows.append(base_row)
    finished = [r for r in rows if r["kind"] == "trial" and r["status"] == "done" and math.isfinite(r["objective"])]
    if not finished:
        _write_trials(out, rows)
        errs = [r["error"] for r in rows if r.get("error")]
        raise RuntimeError(f"no trial finished ({len(rows)} rows in {out}/trials.parquet); first error: "
                           f"{errs[0] if errs else 'none'}")
    best = max(finished, key=lambda r: (r["objective"], -rows.index(r)))
    warning = uninformative_canaries(objective, finished)
    if warning:
        log.warning("sweep: %s", warning)
        best = {**best, "overrides": "{}"}  # recommend nothing the objective could not justify
    _write_trials(out, rows)
    reuse = phase_reuse(rows)
    if ov.get("io.phase_cache"):
        log.info("sweep: phase cache %s: f_base trained by %d run(s), reused by %d; round 0's pretraining "
                 "trained by %d, reused by %d", ov["io.phase_cache"], reuse["fbase_trained"], reuse["fbase_cache"],
                 reuse["base0_trained"], reuse["base0_cache"])
    best_path = _write_best(out, preset, ov, best, objective, warning)
    plot = _plot(out, rows, sp, objective)
    secs = time.time() - t0
    log.info("sweep done in %.0fs: best %s = %.4f (trial %s)%s", secs, objective, best["objective"], best["trial"],
             f"; baseline {base_row['objective']:.4f}" if base_row and math.isfinite(base_row["objective"]) else "")
    return SweepResult(out_dir=out, objective=objective, trials=rows, best=best, baseline=base_row,
                       best_config=best_path, plot=plot, seconds=secs, space=sp, warning=warning, reuse=reuse)


def _no_round0() -> dict[str, Any]:
    """The :func:`_round0_info` of a run without a finished round 0."""
    nan = float("nan")
    return {"fbase_from": "", "base0_from": "", "canary_fit_fbase": nan, "canary_fit_base0": nan}


def _round0_info(run_dir: str) -> dict[str, Any]:
    """What a run directory says of its round 0 (rounds.json, or state.json for a run stopped early): how
    it got f_base and base_0 (``fbase_from``, ``base0_from``: ``trained``, ``cache``, ...; ``""`` when no
    round 0 finished) and, with canaries, the share of them each model fits after round 0
    (``canary_fit_fbase``, ``canary_fit_base0`` in [0, 1]; NaN without canaries or round 0)."""
    nan = float("nan")
    out = _no_round0()
    rounds: list[dict[str, Any]] = []
    try:
        with open(os.path.join(run_dir, "rounds.json")) as f:
            rounds = json.load(f)
    except (OSError, ValueError):  # a run stopped by ASHA has no rounds.json: its state.json has the rounds
        try:
            with open(os.path.join(run_dir, "state.json")) as f:
                rounds = [r.get("info") or {} for r in json.load(f).get("rounds", [])]
        except (OSError, ValueError, AttributeError):
            return out
    if rounds:
        r0 = rounds[0]
        out.update(fbase_from=str(r0.get("fbase_from", "")), base0_from=str(r0.get("base0_from", "")))
        fit = r0.get("canary_fit") or {}
        out.update(canary_fit_fbase=float(fit.get("fbase", nan)), canary_fit_base0=float(fit.get("base0", nan)))
    return out


def phase_reuse(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Count the runs (trials and baseline) by how they got each shared phase: ``{"fbase_trained",
    "fbase_cache", "base0_trained", "base0_cache"}`` (runs without a finished round 0, or with a given
    f_base, are in neither)."""
    out = {f"{p}_{h}": 0 for p in ("fbase", "base0") for h in ("trained", "cache")}
    for r in rows:
        for p in ("fbase", "base0"):
            k = f"{p}_{r.get(p + '_from', '')}"
            if k in out:
                out[k] += 1
    return out


def uninformative_canaries(objective: str, finished: list[dict[str, Any]]) -> str:
    """Why a canary-objective sweep cannot rank its trials, or ``""`` when it can.

    The canary objective is ``recall - flag_weight * outside flag rate``. When no finished trial isolated
    even one canary (every recall 0: the canaries were not learned, or confusion erased them), the
    objective only rewards flagging less, so the "best" trial is the one that flagged least, real
    poison included. Measured: a 4-trial sweep on 2,000 samples with 5% badnet picked a trial that
    flagged nothing over the preset that flagged all 100 poison (docs/sweep.md).

    Args:
        objective: ``"canary"`` or ``"f1"`` (the latter never warns).
        finished: rows of the finished trials, each with ``canary_recall`` (float, NaN when unknown).
    """
    if objective != "canary" or not finished:
        return ""
    rec = [r.get("canary_recall") for r in finished]
    if any(isinstance(x, int | float) and math.isfinite(x) and x > 0 for x in rec):
        return ""
    fits = [x for x in (r.get("canary_fit_base0") for r in finished) if isinstance(x, int | float) and math.isfinite(x)]
    if not fits:
        why = "they were not learned or did not survive confusion"
    elif max(fits) < 0.5:
        why = f"round 0's model fitted at most {max(fits):.0%} of them, so they were not learned"
    else:
        why = (f"round 0's model fitted up to {max(fits):.0%} of them: they were learned, then erased by "
               "confusion or not cleansed by the final test (canary.json: kept_per_round)")
    return (f"no finished trial isolated any canary (recall 0 in all {len(finished)}): the canary objective "
            "cannot rank the trials (it only rewards flagging less), so best.yaml keeps the preset unchanged. "
            f"{why[0].upper() + why[1:]}: raise sweep.canary_rate or canary.min_count, lengthen pretraining, or "
            "sweep with --truth on a planted copy of your data")


def _trial_row(r: Any, sp: dict[str, dict[str, Any]], ctx: dict[str, Any], cfg: Config) -> dict[str, Any]:
    m = r.metrics or {}
    nan = float("nan")
    status = "error" if r.error else ("done" if m.get("final") else "stopped")
    row: dict[str, Any] = {"trial": m.get("trial_id") or os.path.basename(r.path or ""), "kind": "trial",
                           "status": status, "objective": float(m.get("objective", nan)) if m.get("final") else nan,
                           "last_score": float(m.get("score", nan)), "rounds_done": int(m.get("round", -1)) + 1,
                           "seconds": float(m.get("time_total_s", nan))}
    for k in ("canary_recall", "flag_rate", "tpr", "fpr", "precision", "f1"):
        row[k] = float(m.get(k, nan)) if m.get(k) is not None else nan
    row["n_flagged"] = int(m.get("n_flagged", -1)) if m.get("final") else -1
    row["error"] = str(r.error)[:500] if r.error else ""
    row["run_dir"] = os.path.join(ctx["out"], "trials", row["trial"])
    row.update(_round0_info(row["run_dir"]))
    for k in sp:
        row[f"param:{k}"] = r.config.get(k) if r.config else None
    try:
        applied = space_overrides(sp, {k: row[f"param:{k}"] for k in sp}, load_config(ctx["preset"], ctx["overrides"]))
    except Exception:  # a trial without its config (failed before start)
        applied = {}
    row["overrides"] = json.dumps(applied)
    return row


def _baseline_row(ref: Any, objective: str, flag_weight: float, sp: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import ray

    from ctray.engine.canary import canary_objective

    nan = float("nan")
    row: dict[str, Any] = {"trial": "baseline", "kind": "baseline", "status": "done", "objective": nan,
                           "last_score": nan, "rounds_done": -1, "seconds": nan, "canary_recall": nan,
                           "flag_rate": nan, "tpr": nan, "fpr": nan, "precision": nan, "f1": nan, "n_flagged": -1,
                           "error": "", "run_dir": "", **_no_round0()}
    try:
        res = ray.get(ref)
    except Exception as e:
        log.error("baseline run failed: %s", e)
        row.update(status="error", error=str(e)[:500])
    else:
        ct = (res.get("metrics") or {}).get("ct") or {}
        can = res.get("canary") or {}
        flag_rate = float(can["outside_flag_rate"]) if can else res["n_flagged"] / max(1, res["n_usable"])
        row.update(run_dir=res["run_dir"], n_flagged=int(res["n_flagged"]), seconds=float(res["seconds"] or nan),
                   flag_rate=flag_rate, canary_recall=float(can["recall"]) if can else nan)
        for k in ("tpr", "fpr", "precision", "f1"):
            row[k] = float(ct[k]) if ct.get(k) is not None else nan
        row["objective"] = (row["f1"] if objective == "f1"
                            else canary_objective(row["canary_recall"], flag_rate, flag_weight) if can else nan)
        row["last_score"] = row["objective"]
        row["rounds_done"] = len(json.load(open(os.path.join(res["run_dir"], "rounds.json"))))
        row.update(_round0_info(res["run_dir"]))
    for k in sp:
        row[f"param:{k}"] = None
    row["overrides"] = "{}"
    return row


def _write_trials(out: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list[Any]] = {k: [r.get(k) for r in rows] for k in rows[0]}
    for k, v in cols.items():
        if k.startswith("param:"):  # scalars stay numbers; list-valued choices become JSON text
            if all(x is None or (isinstance(x, int | float) and not isinstance(x, bool)) for x in v):
                cols[k] = [float(x) if x is not None else None for x in v]
            else:
                cols[k] = [json.dumps(x) if x is not None else None for x in v]
    pq.write_table(pa.table(cols), os.path.join(out, "trials.parquet"))


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"ct.lam": v, "seed": 1}`` -> ``{"ct": {"lam": v}, "seed": 1}`` (no per-entry index keys:
    the caller folds ``ct.lam.5`` into ``ct.lam``)."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = v
    return out


def _write_best(out: str, preset: str, ov: dict[str, Any], best: dict[str, Any], objective: str,
                warning: str = "") -> str:
    """best.yaml: the preset, the user's non-machine overrides and the best trial's settings, with
    per-round index keys (``ct.lam.5``) folded into whole lists so ``load_config`` reads it back."""
    cfg = load_config(preset, {**ov, **json.loads(best["overrides"])})
    keys = [k for k in {**ov, **json.loads(best["overrides"])}
            if not k.startswith(_MACHINE_PREFIXES) and k not in _MACHINE_KEYS]
    flat: dict[str, Any] = {}
    for k in keys:
        parts = k.split(".")
        if parts[-1].isdigit():  # fold ct.lam.5 into ct.lam
            k = ".".join(parts[:-1])
        flat[k] = _current(cfg, k)
    doc = {"preset": preset, **_nest(flat)}
    path = os.path.join(out, "best.yaml")
    head = (f"# ctray sweep: best of the finished trials (trial {best['trial']}, {objective} = {best['objective']:.4f}).\n"
            f"# Rerun: ctray detect --train ... --clean ... --out RUN --config {path}\n")
    if warning:
        head = (f"# ctray sweep: NO RECOMMENDATION. {warning}.\n# This file is the preset with your overrides.\n"
                f"# Rerun: ctray detect --train ... --clean ... --out RUN --config {path}\n")
    with open(path, "w") as f:
        f.write(head + yaml.safe_dump(doc, sort_keys=False))
    return path


def _plot(out: str, rows: list[dict[str, Any]], sp: dict[str, dict[str, Any]], objective: str) -> str:
    """objective.png: the final objective of each finished trial over each searched parameter
    (list-valued choices by index), the baseline as a dashed line."""
    from matplotlib.figure import Figure

    done = [r for r in rows if r["kind"] == "trial" and r["status"] == "done" and math.isfinite(r["objective"])]
    base = next((r for r in rows if r["kind"] == "baseline" and math.isfinite(r["objective"])), None)
    keys = list(sp)
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * nrows), layout="constrained")
    n_stopped = sum(r["status"] == "stopped" for r in rows)
    fig.suptitle(f"{objective} objective per trial ({len(done)} finished, {n_stopped} stopped early by ASHA)")
    for i, k in enumerate(keys):
        ax = fig.add_subplot(nrows, cols, i + 1)
        vals = [r[f"param:{k}"] for r in done]
        y = [r["objective"] for r in done]
        if "choice" in sp[k] and any(isinstance(c, list) for c in sp[k]["choice"]):
            choices = [json.dumps(c) for c in sp[k]["choice"]]
            x: list[float] = [choices.index(json.dumps(v)) if json.dumps(v) in choices else -1 for v in vals]
            ax.set_xticks(range(len(choices)), [c[:18] for c in choices], fontsize=7, rotation=20)
        else:
            x = [float(v) for v in vals]
            if "loguniform" in sp[k]:
                ax.set_xscale("log")
        ax.scatter(x, y, color="#c44e52", zorder=3)
        if base is not None:
            ax.axhline(base["objective"], color="#555", linestyle="--", linewidth=1, label="preset unchanged")
            ax.legend(fontsize=7)
        ax.set_xlabel(k + (" (x preset)" if sp[k]["scale"] else ""))
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    path = os.path.join(out, "objective.png")
    fig.savefig(path, dpi=100)
    return path
