"""``ctray bench``: CT against the baseline detectors, on one data set or a grid of attacks.

One *cell* = one data set (an attack planted on a base set, or the clean base set itself: ``none``).
Per cell, in ``OUT/<attack>/``:

- ``ct/``: a CT run directory (:func:`ctray.engine.detect.detect`; resumes like ``ctray detect``). Its
  round-0 ``fbase.pt`` is the base model every baseline uses, so all methods see the same f_base.
  Without ``ct`` among the methods, f_base is trained alone to ``fbase.pt`` (:func:`train_model`).
- ``scores/<method>.parquet``: per sample ``shard, key, label, score, flagged`` of each baseline.
- ``methods/<method>.json``: the method's row (metrics, seconds, parameters used) and per-class details.
- ``retrain/<method>.pt`` + ``.json`` (``retrain``): a fresh model trained with f_base's recipe on the
  samples the method kept, and its clean accuracy / attack success rate on the cell's test shards. The
  ``no-defense`` reference is f_base itself (trained on every sample with the same recipe).
- ``cell.json``: the fingerprint of what the cell's numbers depend on; a rerun with other settings is
  refused (use a new ``OUT``), a rerun with the same settings skips every finished method.

Top level: ``bench.parquet`` (one row per attack x method), ``bench.md`` (the table, CT vs the best
baseline per attack), ``bench.png``. Grid cells are independent: with room for more than one (see
``bench.parallel``) they run as Ray tasks, each holding ``bench.cell_cpus`` CPUs and running its own
CT fits (local mode) and Ray Data scoring; otherwise one after the other in the driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctray import io as cio
from ctray.config import DATA_RESOURCE_KEYS, Config, load_config
from ctray.engine.baselines import METHODS as BASELINE_METHODS
from ctray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Detection methods ``bench`` compares, in table order.
# "act": the activation-statistics score (BadActs transfer, ctray.engine.defenses) on the same f_base;
# "xclass": the cross-class detector (ctray.engine.xclass) on the same f_base, and "ct+xclass" the decision
# `ctray detect` makes with both (rows "ct" are always CT's own flags)
METHODS = ("ct",) + BASELINE_METHODS + ("act", "xclass", "ct+xclass")
XCLASS_METHODS = ("xclass", "ct+xclass")
#: The retraining reference row: f_base, trained on every sample (acc / asr without any defense).
NO_DEFENSE = "no-defense"
#: Columns of bench.parquet, in order.
COLUMNS = ("attack", "method", "tpr", "fpr", "precision", "f1", "auroc", "auprc", "flag_rate", "n", "n_poison",
           "n_flagged", "seconds", "acc", "asr", "params")
#: Differences at or below these are reported as a tie in bench.md: F1 (with poison), flag rate (without:
#: 0.0005 = 5 samples in 10,000).
TIE = 0.005
TIE_FLAG_RATE = 0.0005


@dataclass
class BenchResult:
    """What a bench run produced.

    Attributes:
        out: the bench directory.
        rows: one dict per attack x method with :data:`COLUMNS` (``acc``/``asr`` None without
            retraining; ``params`` a JSON string of what the method used).
        parquet, markdown, plot: paths of ``bench.parquet``, ``bench.md``, ``bench.png``.
        seconds: wall time of this call.
    """

    out: str
    rows: list[dict[str, Any]]
    parquet: str
    markdown: str
    plot: str
    seconds: float
    cells: list[str] = field(default_factory=list)

    def table(self) -> Any:
        """The rows as a pandas DataFrame (the content of bench.parquet)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(COLUMNS))


# ------------------------------------------------------------------------------------------- cells


def _glob(pattern: str) -> list[str]:
    import glob

    return sorted(glob.glob(pattern))


def _cell_config(cell: dict[str, Any], settings: dict[str, Any]) -> Config:
    ov: dict[str, Any] = {"io.train": cell["train"], "io.clean": cell["clean"], "io.out": os.path.join(cell["out"], "ct")}
    if cell.get("truth"):
        ov["io.truth"] = cell["truth"]
    ov.update(settings["overrides"])
    # the CT run computes the cross-class detector only when a row needs it
    ov.setdefault("xclass.enabled", bool(set(settings["methods"]) & set(XCLASS_METHODS)))
    return load_config(settings["preset"], ov)


_RESULT_SECTIONS = ("seed", "data", "base", "ct", "decide", "bench", "act", "xclass")


def _fingerprint(cfg: Config, cell: dict[str, Any], settings: dict[str, Any]) -> str:
    full = cfg.to_dict()
    # only what changes a cell's rows: later config sections (other features) and resource knobs must
    # not make a finished grid unresumable
    d = {k: full[k] for k in _RESULT_SECTIONS if k in full}
    d["io"] = {"train": cfg.io.train, "clean": cfg.io.clean, "truth": cfg.io.truth}
    d["data"] = {k: v for k, v in d["data"].items() if k not in DATA_RESOURCE_KEYS}
    d["bench"] = {k: v for k, v in d["bench"].items() if k not in ("parallel", "cell_cpus")}
    blob = json.dumps({"cfg": d, "poison": cell.get("poison"), "test": cell.get("test"),
                       "triggered": cell.get("triggered")}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def _row(attack: str, method: str, metrics: dict[str, Any], seconds: float | None, params: dict[str, Any]
         ) -> dict[str, Any]:
    row = {k: metrics.get(k) for k in ("tpr", "fpr", "precision", "f1", "auroc", "auprc", "flag_rate", "n",
                                        "n_poison", "n_flagged")}
    row.update({"attack": attack, "method": method, "seconds": None if seconds is None else round(float(seconds), 2),
                "acc": None, "asr": None, "params": json.dumps(_json_safe(params), sort_keys=True)})
    return {k: row[k] for k in COLUMNS}


def _truth_mask(truth: str | None, shards: np.ndarray, keys: np.ndarray) -> np.ndarray:
    from ctray.engine.ground import load_truth

    if not truth:
        return np.zeros(len(keys), bool)
    return load_truth(truth, shards, keys)[0]


def _ct_flags(sc: Any) -> np.ndarray:
    """CT's own flags from a run's scores table: ``flagged`` is the run's decision, which also holds the
    cross-class detector's flags when it ran (``flagged_by`` says which)."""
    if "flagged_by" in sc.columns:
        return sc["flagged_by"].astype(str).isin(["ct", "ct+xclass"]).to_numpy()
    return sc["flagged"].to_numpy(bool)


def run_cell(cell: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Run (or resume) one cell; return its rows (see the module docstring for the layout).

    Args:
        cell: ``name, out, train, clean, truth, test, triggered`` and, for grid cells, ``poison``:
            ``{base, attack, rate, target, seed}`` (the data set is made first when absent).
        settings: ``methods, preset, overrides, retrain``.

    Raises:
        ConfigError: the cell directory holds results made with other settings.
    """
    import pyarrow as pa

    from ctray.core.metrics import detection_metrics

    name, out = cell["name"], cell["out"]
    t_cell = time.monotonic()
    cio.makedirs(out)
    p = cell.get("poison")
    if p and not os.path.exists(os.path.join(p["data"], "truth.parquet")):
        from ctray.data.poison import poison_dataset

        log.info("bench %s: planting %s at rate %g (target %d) -> %s", name, p["attack"], p["rate"], p["target"], p["data"])
        poison_dataset(p["base"], p["data"], p["attack"], rate=p["rate"], target=p["target"], seed=p["seed"],
                       options=p.get("options") or {})
    cfg = _cell_config(cell, settings)
    fp = _fingerprint(cfg, cell, settings)
    marker = os.path.join(out, "cell.json")
    if os.path.exists(marker):
        old = cio.read_json(marker)
        if old.get("fingerprint") != fp:
            raise ConfigError(f"{out} holds bench results made with other settings (fingerprint "
                              f"{old.get('fingerprint')} != {fp}); use a new --out")
    else:
        cio.write_json(marker, {"fingerprint": fp, "cell": cell, "preset": cfg.preset})

    methods = list(settings["methods"])
    retrain = bool(settings["retrain"])

    def mpath(kind: str, m: str, ext: str) -> str:
        return os.path.join(out, kind, f"{m}.{ext}")

    missing = [m for m in methods if not os.path.exists(mpath("methods", m, "json"))]
    ct_dir = os.path.join(out, "ct")
    fbase = os.path.join(ct_dir, "checkpoints", "round_0", "fbase.pt") if "ct" in methods else os.path.join(out, "fbase.pt")
    if missing:
        log.info("bench %s: running %s", name, ", ".join(missing))
    if "ct" in missing:
        from ctray.engine.detect import detect

        res = detect(cfg)
        sc = cio.read_parquet(os.path.join(ct_dir, "scores.parquet")).to_pandas()
        poison = _truth_mask(cell.get("truth"), sc["shard"].to_numpy(str), sc["key"].to_numpy(str))
        met = detection_metrics(_ct_flags(sc), poison, sc["score"].to_numpy(float))
        row = _row(name, "ct", met, res.seconds.get("total"),
                   {"preset": cfg.preset, "cleansed": res.cleansed_classes})
        cio.write_json(mpath("methods", "ct", "json"), {"row": row})
        if res.xclass is not None:  # the same run's cross-class detector, alone and with CT
            by = sc["flagged_by"].astype(str)
            x_fl = by.isin(["xclass", "ct+xclass"]).to_numpy()
            xsec = res.seconds.get("xclass")
            for m, fl, score, secs in (("xclass", x_fl, sc["score_xclass"].to_numpy(float), xsec),
                                       ("ct+xclass", sc["flagged"].to_numpy(bool), None, res.seconds.get("total"))):
                cio.write_parquet(mpath("scores", m, "parquet"), pa.table({
                    "shard": sc["shard"].to_numpy(str), "key": sc["key"].to_numpy(str), "label": sc["label"].to_numpy(),
                    "score": sc["score_xclass"].to_numpy(float) if score is not None else sc["score"].to_numpy(float),
                    "flagged": fl}))
                row = _row(name, m, detection_metrics(fl, poison, score), secs, {"decision": res.xclass})
                cio.write_json(mpath("methods", m, "json"), {"row": row})
    missing = [m for m in methods if not os.path.exists(mpath("methods", m, "json"))]
    if set(missing) & set(XCLASS_METHODS):
        raise ConfigError(f"bench {name}: the methods {sorted(set(missing) & set(XCLASS_METHODS))} come from the "
                          "CT run's cross-class detector: add ct to the methods (and keep xclass.enabled)")
    base_missing = [m for m in missing if m != "ct"]
    if base_missing or (retrain and not os.path.exists(fbase)):
        if not os.path.exists(fbase):
            if "ct" in methods:
                raise RuntimeError(f"the CT run in {ct_dir} left no {fbase}")
            from ctray.engine.train import train_model

            log.info("bench %s: training f_base alone (ct is not among the methods)", name)
            train_model(cfg, fbase, extra={"bench": name, "role": "fbase"})
    if "act" in base_missing:
        from ctray.engine.activations import activation_scores

        a = activation_scores(fbase, cfg.io.train, cfg.io.clean, cfg)  # flag rule: score > threshold (FRR act.frr)
        cio.write_parquet(mpath("scores", "act", "parquet"), pa.table({
            "shard": a.shard, "key": a.key, "label": a.label, "score": a.score, "flagged": a.flagged}))
        row = _row(name, "act", detection_metrics(a.flagged, _truth_mask(cell.get("truth"), a.shard, a.key), a.score),
                   a.seconds, {"frr": cfg.act.frr, "threshold": a.threshold, "mode": cfg.act.mode,
                               "n_fit": a.n_fit, "n_calib": a.n_calib})
        cio.write_json(mpath("methods", "act", "json"), {"row": row})
        base_missing = [m for m in base_missing if m != "act"]
    if base_missing:
        from ctray.engine.baselines import run_baselines

        rate = None
        if cell.get("truth"):
            rate = float(cio.read_parquet(cell["truth"]).to_pandas()["poison"].astype(bool).mean())
        run = run_baselines(cfg, fbase, base_missing, poison_rate=rate)
        poison = _truth_mask(cell.get("truth"), run.shards, run.keys)
        for m, r in run.results.items():
            cio.write_parquet(mpath("scores", m, "parquet"), pa.table({
                "shard": run.shards, "key": run.keys, "label": run.labels, "score": r.score, "flagged": r.flagged}))
            row = _row(name, m, detection_metrics(r.flagged, poison, r.score), r.seconds, r.params)
            cio.write_json(mpath("methods", m, "json"), {"row": row, "info": _json_safe(r.info)})

    rows = [cio.read_json(mpath("methods", m, "json"))["row"] for m in methods]
    if retrain:
        from ctray.engine.train import evaluate, train_model

        test, trig = cell.get("test") or [], cell.get("triggered") or []
        if not test and not trig:
            raise ConfigError(f"bench {name}: --retrain needs test shards (none found for {cell['train']}); "
                              "give --test / --triggered")
        ref_row = _row(name, NO_DEFENSE, {}, None, {"model": "f_base (every sample, f_base's recipe)"})
        for m in [NO_DEFENSE] + methods:
            jp = mpath("retrain", m, "json")
            if not os.path.exists(jp):
                if m == NO_DEFENSE:
                    ckpt, n_train, secs = fbase, None, None
                else:
                    src = os.path.join(ct_dir, "scores.parquet") if m == "ct" else mpath("scores", m, "parquet")
                    sc = cio.read_parquet(src).to_pandas()
                    sc = sc[_ct_flags(sc)] if m == "ct" else sc[sc["flagged"].astype(bool)]
                    keys = list(zip(sc["shard"].astype(str), sc["key"].astype(str), strict=True))
                    ckpt = mpath("retrain", m, "pt")
                    log.info("bench %s: retraining without the %d samples %s flagged", name, len(keys), m)
                    try:
                        tr = train_model(cfg, ckpt, exclude=keys, extra={"bench": name, "method": m})
                    except DataError as e:  # e.g. a method that flagged every sample: no model to report
                        log.warning("bench %s: no retraining for %s: %s", name, m, e)
                        cio.write_json(jp, {"acc": None, "asr": None, "error": str(e)})
                        tr = None
                    n_train, secs = (tr.n_train, tr.seconds) if tr else (0, None)
                if not os.path.exists(jp):
                    ev = evaluate(ckpt, test or None, trig or None, data_cfg=cfg.data)
                    cio.write_json(jp, {"acc": ev.acc, "asr": ev.asr, "n_test": ev.n_test,
                                        "n_triggered": ev.n_triggered, "n_train": n_train, "train_seconds": secs,
                                        "model": ckpt})
            ev_d = cio.read_json(jp)
            target = ref_row if m == NO_DEFENSE else next(r for r in rows if r["method"] == m)
            target["acc"], target["asr"] = ev_d["acc"], ev_d["asr"]
        rows = [ref_row] + rows
    log.info("bench %s: done in %.1fs", name, time.monotonic() - t_cell)
    return rows


# ------------------------------------------------------------------------------------------- grid


def _auto_parallel(cfg: Config) -> int:
    import ray

    if cfg.bench.parallel:
        return cfg.bench.parallel
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    per_cell = cfg.bench.cell_cpus + cfg.data.score_cpus + cfg.data.read_cpus
    return max(1, int(cpus // per_cell))


def _run_cell_task(cell: dict[str, Any], settings: dict[str, Any], level: int) -> list[dict[str, Any]]:
    """:func:`run_cell` in a Ray task: ctray's log lines reach the driver at the driver's level."""
    lg = logging.getLogger("ctray")
    if not lg.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        lg.addHandler(h)
        lg.setLevel(level)
    return run_cell(cell, settings)


def _run_cells(cells: list[dict[str, Any]], settings: dict[str, Any], parallel: int, cell_cpus: float
               ) -> list[list[dict[str, Any]]]:
    """Cells inline (``parallel <= 1``) or as Ray tasks, at most ``parallel`` at once; results in cell order."""
    if parallel <= 1 or len(cells) <= 1:
        return [run_cell(c, settings) for c in cells]
    import ray

    task = ray.remote(_run_cell_task).options(num_cpus=cell_cpus, max_retries=0)
    level = logging.getLogger("ctray").getEffectiveLevel()
    results: dict[int, list[dict[str, Any]]] = {}
    pending: dict[Any, int] = {}
    todo = list(range(len(cells)))
    log.info("bench: %d cells, up to %d at once as Ray tasks (%.2f CPU each)", len(cells), parallel, cell_cpus)
    while todo or pending:
        while todo and len(pending) < parallel:
            i = todo.pop(0)
            pending[task.remote(cells[i], settings, level)] = i
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        results[i] = ray.get(done[0])  # raises the cell's error (ConfigError/DataError pass through)
    return [results[i] for i in range(len(cells))]


def _test_shards(data_dir: str) -> tuple[list[str], list[str]]:
    # test-0*.tar: `ctray data` numbers shards from 0; test-*.tar would also match test-triggered-*.tar
    return _glob(os.path.join(data_dir, "test-0*.tar")), _glob(os.path.join(data_dir, "test-triggered-*.tar"))


def bench(out: str, *, train: Sequence[str] | None = None, clean: Sequence[str] | None = None,
          truth: str | None = None, test: Sequence[str] | None = None, triggered: Sequence[str] | None = None,
          name: str | None = None, base: str | None = None, attacks: Sequence[str] | str | None = None,
          rate: float | str = 0.01, target: int = 0, poison_seed: int = 0, methods: Sequence[str] = METHODS,
          preset: str | None = None, overrides: dict[str, Any] | None = None, retrain: bool = False) -> BenchResult:
    """Compare CT with the baselines; write ``bench.parquet``, ``bench.md`` and ``bench.png`` under ``out``.

    Two forms (exactly one):

    - one data set: ``train`` and ``clean`` shard specs (+ ``truth`` for detection metrics; ``test`` /
      ``triggered`` for retraining, else ``test-0*.tar`` / ``test-triggered-*.tar`` beside the first
      train shard); the cell is named ``name``, else the truth's ``attack`` column, else ``data``.
    - a grid: ``base`` (a clean set from ``ctray data``) and ``attacks`` (names, a comma list, or
      ``"all"`` = every shipped attack); each attack is planted at ``rate`` (a fraction, or ``"paper"``: the
      paper's poison and cover rates per attack, :data:`ctray.data.attacks.PAPER_RATES`; attacks outside the
      paper's grid at 0.01) on class ``target`` with
      ``poison_seed`` into ``out/data/<attack>``, and a ``none`` cell (the clean base set) is added.

    Args:
        out: the bench directory; rerunning with it skips finished methods and cells.
        methods: subset of :data:`METHODS` (``ct, ss, ac, strip, scan, act``).
        preset: config preset for every cell (default: chosen from the data, as ``ctray detect`` does).
        overrides: ``key=value`` config overrides for every cell (``ct.*``, ``base.*``, ``bench.*``...).
        retrain: also train a fresh model on each method's kept samples (and report f_base as the
            ``no-defense`` reference); adds ``acc`` / ``asr``.

    Returns:
        A :class:`BenchResult`.

    Raises:
        ConfigError: both or neither form, unknown methods/attacks, settings that differ from the
            results already in ``out``.
        DataError: unreadable inputs.
    """
    from ctray.data.attacks import ATTACKS, resolve_rate
    from ctray.engine.cluster import ensure_ray
    from ctray.engine.ground import choose_preset

    t0 = time.monotonic()
    methods = list(dict.fromkeys(methods))
    bad = sorted(set(methods) - set(METHODS))
    if bad or not methods:
        raise ConfigError(f"unknown or no methods {bad}; choose from {list(METHODS)}")
    if bool(base) == bool(train):
        raise ConfigError("give either --base DATA_DIR --attacks ... (grid) or --train/--clean (one data set)")
    out = os.path.abspath(out)
    cio.makedirs(out)
    overrides = dict(overrides or {})
    for k in list(overrides):
        if k.startswith("io."):
            raise ConfigError(f"{k} is set by the bench per cell; give data through --train/--clean/--base")
    cells: list[dict[str, Any]] = []
    if base:
        base = os.path.abspath(base)
        if not os.path.exists(os.path.join(base, "manifest.json")):
            raise DataError(f"--base {base} is not a data set made by `ctray data` (no manifest.json)")
        names = attacks.split(",") if isinstance(attacks, str) else list(attacks or [])
        names = [a.strip() for a in names if a.strip()]
        if names == ["all"]:
            names = list(ATTACKS)
        unknown = sorted(set(names) - set(ATTACKS) - {"none"})
        if unknown or not names:
            raise ConfigError(f"unknown or no attacks {unknown}; choose from {sorted(ATTACKS)} or 'all'")
        has_test = bool(_test_shards(base)[0])
        for a in ["none"] + [a for a in names if a != "none"]:
            data = base if a == "none" else os.path.join(out, "data", a)
            t = [os.path.join(data, "test-0*.tar")] if has_test else []
            trg = [os.path.join(data, "test-triggered-*.tar")] if has_test and a != "none" else []
            cell: dict[str, Any] = {
                "name": a, "out": os.path.join(out, a), "train": [os.path.join(data, "train-*.tar")],
                "clean": [os.path.join(data, "clean-*.tar")],
                "truth": None if a == "none" else os.path.join(data, "truth.parquet"),
                "test": t, "triggered": trg}
            if a != "none":
                r, opts = resolve_rate(a, rate, fallback=0.01)
                cell["poison"] = {"base": base, "data": data, "attack": a, "rate": r, "target": int(target),
                                  "seed": int(poison_seed), **({"options": opts} if opts else {})}
            cells.append(cell)
        probe = [os.path.join(base, "train-*.tar")]
    else:
        assert train  # no --base here, and exactly one of base/train was checked above
        if not clean:
            raise ConfigError("the one-data-set form needs --clean (the trusted reserve)")
        from ctray.data.shards import expand_shards

        first = expand_shards(list(train))[0]
        d = os.path.dirname(first)
        t_def, trg_def = _test_shards(d) if d and not cio.is_remote(first) else ([], [])
        cname = name
        if not cname and truth:
            tt = cio.read_parquet(truth).to_pandas()
            cname = str(tt["attack"].iloc[0]) if "attack" in tt.columns and len(tt) else None
        cname = cname or "data"
        cells.append({"name": cname, "out": os.path.join(out, cname), "train": list(train), "clean": list(clean),
                      "truth": truth, "test": list(test) if test else t_def,
                      "triggered": list(triggered) if triggered else trg_def})
        probe = list(train)
    ensure_ray()
    if not preset:
        preset, why = choose_preset(probe, bool(overrides.get("scale.use_gpu", False)))
        log.info("bench: no --preset given: using %r for every cell (%s)", preset, why)
    cfg0 = load_config(preset, overrides)
    settings = {"methods": methods, "preset": preset, "overrides": overrides, "retrain": retrain}
    parallel = _auto_parallel(cfg0)
    per_cell = _run_cells(cells, settings, parallel, cfg0.bench.cell_cpus)
    rows = [r for rs in per_cell for r in rs]
    res = write_outputs(out, rows, {"preset": preset, "methods": methods, "retrain": retrain, "rate": rate,
                                    "target": target, "overrides": overrides, "cells": [c["name"] for c in cells],
                                    "seconds": round(time.monotonic() - t0, 1)})
    return BenchResult(out=out, rows=rows, parquet=res[0], markdown=res[1], plot=res[2],
                       seconds=time.monotonic() - t0, cells=[c["name"] for c in cells])


# ---------------------------------------------------------------------------------------- outputs


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def compare(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """CT against the best baseline per attack, from bench rows.

    With poison: by F1 (higher wins; within :data:`TIE` = a tie). Without poison (``none``): by flag
    rate (lower wins; within :data:`TIE_FLAG_RATE` = a tie). Returns per attack ``{attack, metric, ct, best, best_value, winner, margin}``
    (``ct``/``best`` None when absent).
    """
    out = []
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    for a in attacks:
        rs = [r for r in rows if r["attack"] == a and r["method"] != NO_DEFENSE]
        ct = next((r for r in rs if r["method"] == "ct"), None)
        bases = [r for r in rs if r["method"] != "ct" and r["method"] not in XCLASS_METHODS]
        no_poison = all(not r.get("n_poison") for r in rs)
        metric = "flag_rate" if no_poison else "f1"

        def val(r: dict[str, Any], metric: str = metric) -> float:
            v = r.get(metric)
            if v is None:  # F1 undefined = nothing found; flag rate undefined = no samples
                return 0.0 if metric == "f1" else 1.0
            return float(v)

        sign = -1.0 if metric == "flag_rate" else 1.0
        best = max(bases, key=lambda r: sign * val(r)) if bases else None
        entry: dict[str, Any] = {"attack": a, "metric": metric, "ct": val(ct) if ct else None,
                                 "best": best["method"] if best else None, "best_value": val(best) if best else None,
                                 "winner": None, "margin": None}
        if ct and best:
            diff = sign * (val(ct) - val(best))
            entry["margin"] = abs(val(ct) - val(best))
            tie = TIE if metric == "f1" else TIE_FLAG_RATE
            entry["winner"] = "tie" if abs(diff) <= tie else ("ct" if diff > 0 else best["method"])
        out.append(entry)
    return out


def _markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    retrain = bool(meta.get("retrain"))
    head = ["attack", "method", "TPR", "FPR", "precision", "F1", "AUROC", "AUPRC", "flag rate", "time (s)"]
    if retrain:
        head += ["acc", "ASR"]
    lines = [f"# ctray bench: {', '.join(meta.get('methods', []))}", "",
             f"Preset `{meta.get('preset')}`; overrides `{' '.join(f'{k}={v}' for k, v in meta.get('overrides', {}).items()) or '-'}`; "
             f"poison rate {meta.get('rate')} (target {meta.get('target')}) for grid cells; wall time of the call "
             f"that wrote this file {meta.get('seconds')} s (a resumed call counts only its own work). Cover samples count as clean; `none` = no attack (FPR = flag rate). "
             "CT's time includes training f_base; the baselines reuse that f_base (their time is the feature / "
             "entropy passes and their own math).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r["attack"], r["method"], _fmt(r["tpr"]), _fmt(r["fpr"], 4), _fmt(r["precision"]), _fmt(r["f1"]),
                _fmt(r["auroc"]), _fmt(r["auprc"]), _fmt(r["flag_rate"], 4), _fmt(r["seconds"], 1)]
        if retrain:
            vals += [_fmt(r["acc"]), _fmt(r["asr"])]
        lines.append("| " + " | ".join(vals) + " |")
    lines += ["", "## CT against the best baseline per attack", "",
              "| attack | compared on | CT | best baseline | its value | verdict |", "|---|---|---|---|---|---|"]
    for c in compare(rows):
        if c["ct"] is None or c["best"] is None:
            verdict = "-"
        elif c["winner"] == "tie":
            verdict = f"tie (within {TIE if c['metric'] == 'f1' else TIE_FLAG_RATE})"
        elif c["winner"] == "ct":
            verdict = f"CT better by {c['margin']:.3f}"
        else:
            verdict = f"**{c['winner']} better by {c['margin']:.3f}**"
        metric = "F1 (higher is better)" if c["metric"] == "f1" else "flag rate (lower is better)"
        lines.append(f"| {c['attack']} | {metric} | {_fmt(c['ct'], 4)} | {c['best'] or '-'} | "
                     f"{_fmt(c['best_value'], 4)} | {verdict} |")
    lines += ["", "Parameters each method used (`params` column of bench.parquet):", ""]
    for r in rows:
        lines.append(f"- {r['attack']} / {r['method']}: `{r['params']}`")
    return "\n".join(lines) + "\n"


def _plot(rows: Sequence[dict[str, Any]], path: str, retrain: bool) -> None:
    from matplotlib.figure import Figure

    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != NO_DEFENSE))
    panels = [("f1", "F1 (flag rate for none)")] + ([("asr", "ASR after retraining")] if retrain else [])
    fig = Figure(figsize=(max(6.0, 0.9 * len(attacks) * max(1, len(methods)) / 2.5), 3.2 * len(panels)),
                 layout="constrained")
    axs = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    ms = methods + ([NO_DEFENSE] if retrain else [])
    width = 0.8 / max(1, len(ms))
    for ax, (col, title) in zip(axs, panels, strict=True):
        for j, m in enumerate(ms):
            if col == "f1" and m == NO_DEFENSE:
                continue
            ys = []
            for a in attacks:
                r = next((x for x in rows if x["attack"] == a and x["method"] == m), None)
                v = None if r is None else (r["flag_rate"] if (col == "f1" and not r.get("n_poison")) else r.get(col))
                ys.append(np.nan if v is None else float(v))
            ax.bar(np.arange(len(attacks)) + (j - (len(ms) - 1) / 2) * width, ys, width, label=m)
        ax.set_xticks(np.arange(len(attacks)), attacks, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axs[0].legend(ncols=min(6, len(ms)), fontsize=8)
    fig.savefig(path, dpi=110)


def write_outputs(out: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, str, str]:
    """Write ``bench.parquet``, ``bench.md``, ``bench.png`` and ``bench.json`` (meta) under ``out``."""
    import pandas as pd
    import pyarrow as pa

    df = pd.DataFrame(list(rows), columns=list(COLUMNS))
    for c in ("tpr", "fpr", "precision", "f1", "auroc", "auprc", "flag_rate", "seconds", "acc", "asr"):
        df[c] = df[c].astype("float64")
    pq_path, md_path, png_path = (os.path.join(out, f) for f in ("bench.parquet", "bench.md", "bench.png"))
    cio.write_parquet(pq_path, pa.Table.from_pandas(df, preserve_index=False))
    cio.write_bytes(md_path, _markdown(rows, meta).encode())
    _plot(rows, png_path, bool(meta.get("retrain")))
    cio.write_json(os.path.join(out, "bench.json"), _json_safe({**meta, "compare": compare(rows)}))
    return pq_path, md_path, png_path
