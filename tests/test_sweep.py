"""`ctray sweep`: the search space, the per-round metrics, and a tiny real sweep (2 trials on real
Fashion-MNIST in the session's local Ray) that writes trials.parquet, best.yaml and the plot."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctray.config import load_config
from ctray.engine.sweep import (
    DEFAULT_SPACE,
    _round0_info,
    load_space,
    space_overrides,
    trial_metrics,
    uninformative_canaries,
)
from ctray.errors import ConfigError


def test_load_space_checks_entries(tmp_path):
    assert load_space(None) == {k: {**v, "scale": bool(v.get("scale", False))} for k, v in DEFAULT_SPACE.items()}
    f = tmp_path / "space.yaml"
    f.write_text("ct.lam: {uniform: [10, 30]}\nct.keep_ratio: {choice: [[0.5, 0.2, 0.04, 0.02, 0.01]]}\n")
    assert load_space(str(f))["ct.keep_ratio"]["choice"] == [[0.5, 0.2, 0.04, 0.02, 0.01]]
    for bad, msg in [({"ct.lam": 3}, "expected"), ({"ct.lam": {"normal": [0, 1]}}, "exactly one"),
                     ({"ct.lam": {"uniform": [3, 1]}}, "low < high"), ({"ct.lr": {"loguniform": [0, 1]}}, "low > 0"),
                     ({"ct.lam": {"choice": []}}, "non-empty"), ({}, "non-empty mapping")]:
        with pytest.raises(ConfigError, match=msg):
            load_space(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_space(str(tmp_path / "missing.yaml"))


def test_space_overrides_scale_broadcast_and_index():
    base = load_config("smoke")
    sp = load_space({"ct.lam": {"uniform": [10, 40]}, "ct.lr": {"loguniform": [0.5, 2], "scale": True},
                     "ct.iters": {"choice": [0.5], "scale": True}, "ct.keep_ratio": {"choice": [4.0], "scale": True},
                     "ct.lam.5": {"choice": [12]}, "base.epochs": {"randint": [1, 3]}})
    ov = space_overrides(sp, {"ct.lam": 25.0, "ct.lr": 2.0, "ct.iters": 0.5, "ct.keep_ratio": 4.0, "ct.lam.5": 12,
                              "base.epochs": 2}, base)
    assert ov["ct.lam"] == [25.0] * 6
    assert ov["ct.lr"] == pytest.approx([x * 2 for x in base.ct.lr])
    assert ov["ct.iters"] == [max(1, round(x * 0.5)) for x in base.ct.iters]
    assert ov["ct.keep_ratio"] == pytest.approx([min(1.0, x * 4) for x in base.ct.keep_ratio])
    assert ov["ct.lam.5"] == 12 and ov["base.epochs"] == 2
    cfg = load_config("smoke", ov)  # dict order: ct.lam first, then the per-round entry
    assert cfg.ct.lam == [25.0] * 5 + [12.0] and cfg.ct.keep_ratio[0] == 1.0
    with pytest.raises(ConfigError, match="not a config field"):
        space_overrides(load_space({"ct.nope": {"choice": [1]}}), {"ct.nope": 1}, base)


def test_trial_metrics_proxy_then_objective():
    r0 = {"round": 0, "final": False, "canary_kept_share": 0.75, "poison_kept_share": 0.5}
    assert trial_metrics(r0, "canary", 5.0)["score"] == 0.75
    assert trial_metrics(r0, "f1", 5.0)["score"] == 0.5
    fin = {"round": 5, "final": True, "canary_recall": 1.0, "flag_rate": 0.02, "n_flagged": 20, "cleansed": [0, 9],
           "metrics": {"tpr": 1.0, "fpr": 0.01, "precision": 0.5, "f1": 0.667}}
    m = trial_metrics(fin, "canary", 5.0)
    assert m["score"] == m["objective"] == pytest.approx(0.9) and m["tpr"] == 1.0 and m["cleansed"] == "[0, 9]"
    assert trial_metrics(fin, "f1", 5.0)["objective"] == pytest.approx(0.667)
    assert math.isnan(trial_metrics({**fin, "metrics": None}, "canary", 5.0)["f1"])


@pytest.fixture(scope="module")
def fm_tiny(tmp_path_factory, fmnist_available):
    if not fmnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from ctray.data.poison import poison_dataset
    from ctray.data.sources import make_dataset

    root = tmp_path_factory.mktemp("sweepdata")
    make_dataset("fashion-mnist", str(root / "base"), n_train=600, n_clean=150, n_test=50, shard_size=300, seed=1)
    poison_dataset(str(root / "base"), str(root / "bad"), "badnet", rate=0.02, target=0, seed=0, options={})
    return str(root / "bad")


#: 3 rounds, 1 epoch, 20 confusion iterations: the sweep machinery, not detection quality.
TINY = ["ct.rounds=3", "ct.pretrain_epochs=[1,1,1]", "ct.iters=[20,20,20]", "ct.lr=[0.015,0.015,0.04]",
        "ct.lam=[20,20,15]", "ct.batch_factor=[2,2,2]", "ct.keep_ratio=[0.5,0.2]", "ct.floor_k=[50,50]",
        "base.epochs=1", "base.milestones=[1]", "sweep.baseline=false"]


def test_round0_info_reads_finished_and_stopped_runs(tmp_path):
    """A finished run has rounds.json; a trial stopped by ASHA only state.json: both give how round 0 got its
    models and the canary fit (trials.parquet's columns); a run without round 0 gives empty / NaN."""
    r0 = {"round": 0, "fbase_from": "trained", "base0_from": "cache", "canary_fit": {"fbase": 0.25, "base0": 0.875}}
    done, stopped, empty = tmp_path / "done", tmp_path / "stopped", tmp_path / "empty"
    for d in (done, stopped, empty):
        d.mkdir()
    (done / "rounds.json").write_text(json.dumps([r0, {"round": 1}]))
    (stopped / "state.json").write_text(json.dumps({"rounds": [{"info": r0}, {"info": {"round": 1}}]}))
    want = {"fbase_from": "trained", "base0_from": "cache", "canary_fit_fbase": 0.25, "canary_fit_base0": 0.875}
    assert _round0_info(str(done)) == want and _round0_info(str(stopped)) == want
    got = _round0_info(str(empty))
    assert got["fbase_from"] == got["base0_from"] == "" and np.isnan(got["canary_fit_base0"])


def test_canary_objective_without_any_isolated_canary_recommends_nothing():
    """Measured failure (docs/sweep.md): no trial isolated a canary, so the objective only rewarded flagging
    less and picked a trial that flagged none of the 100 real poison; such a sweep must say so."""
    nan = float("nan")
    rows = [{"canary_recall": 0.0}, {"canary_recall": 0.0}, {"canary_recall": nan}]
    msg = uninformative_canaries("canary", rows)
    assert "no finished trial isolated any canary" in msg and "recall 0 in all 3" in msg
    assert uninformative_canaries("canary", [*rows, {"canary_recall": 0.125}]) == ""
    assert uninformative_canaries("f1", rows) == ""  # with truth the objective is F1: always informative
    assert uninformative_canaries("canary", []) == ""
    # with round 0's canary fit the message says which: never learned, or learned and erased by confusion
    low = [{"canary_recall": 0.0, "canary_fit_base0": 0.125}, {"canary_recall": 0.0, "canary_fit_base0": nan}]
    assert "fitted at most 12% of them, so they were not learned" in uninformative_canaries("canary", low)
    high = [{"canary_recall": 0.0, "canary_fit_base0": 0.95}]
    assert "fitted up to 95% of them: they were learned, then erased" in uninformative_canaries("canary", high)


@pytest.mark.timeout(3600)
def test_tiny_sweep_writes_its_outputs(fm_tiny, tmp_path, ray_session):
    """2 trials x 3 rounds on 600 samples, canary objective (no truth), the CLI in process."""
    from ctray.cli import main

    out = tmp_path / "sweep"
    space = tmp_path / "space.yaml"
    space.write_text("ct.lam: {uniform: [10, 30]}\nct.lr: {choice: [0.5, 2.0], scale: true}\n")
    rc = main(["sweep", "--train", f"{fm_tiny}/train-*.tar", "--clean", f"{fm_tiny}/clean-*.tar", "--out", str(out),
               "--num-samples", "2", "--preset", "smoke", "--space", str(space), *TINY])
    assert rc == 0
    trials = pq.read_table(out / "trials.parquet").to_pandas()
    assert len(trials) == 2 and (trials["kind"] == "trial").all()
    assert set(trials["status"]) <= {"done", "stopped"} and (trials["status"] == "done").any()
    done = trials[trials["status"] == "done"]
    assert done["objective"].between(-5, 1).all() and done["canary_recall"].between(0, 1).all()
    assert done["rounds_done"].eq(3).all() and (done["seconds"] > 0).all()
    assert trials["param:ct.lam"].between(10, 30).all() and set(trials["param:ct.lr"]) <= {0.5, 2.0}
    # one f_base and one round-0 pretraining for both trials (the space varies confusion knobs only): one
    # cache entry each, trained by one trial, copied byte for byte by the other
    for kind, col, name in (("fbase", "fbase_from", "fbase.pt"), ("base0", "base0_from", None)):
        assert sorted(trials[col]) == ["cache", "trained"], kind
        keys = os.listdir(out / "cache" / kind)
        assert len(keys) == 1
        entry = json.load(open(out / "cache" / kind / keys[0] / "entry.json"))
        blob = (out / "cache" / kind / keys[0] / entry["blob"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
        if name:
            reused = trials[trials[col] == "cache"].iloc[0]
            fb = open(os.path.join(reused["run_dir"], "checkpoints", "round_0", name), "rb").read()
            assert fb == blob
    reused = trials[trials["fbase_from"] == "cache"].iloc[0]
    r0 = json.load(open(os.path.join(reused["run_dir"], "rounds.json")))[0]
    assert r0["fbase_samples"] is None and "f_base" not in r0["phase_seconds"]
    assert not any(k.startswith("pretrain") for k in r0["phase_seconds"])  # round 0 ran confusion only
    for _, r in done.iterrows():  # each finished trial is a full run directory with its canaries
        can = json.load(open(os.path.join(r["run_dir"], "canary.json")))
        assert can["count"] == 8 and can["recall"] == pytest.approx(r["canary_recall"])
        fit = can["fit_after_round0"]  # measured on the 8 canaries: multiples of 1/8 for both models
        assert set(fit) == {"fbase", "base0"} and all(0 <= v <= 1 and (v * 8) % 1 == 0 for v in fit.values())
        assert (r["canary_fit_fbase"], r["canary_fit_base0"]) == (fit["fbase"], fit["base0"])  # in trials.parquet
        assert len(pq.read_table(os.path.join(r["run_dir"], "scores.parquet"))) == 600
    best = trials.loc[done["objective"].idxmax()]
    cfg = load_config(config_file=str(out / "best.yaml"))  # what `ctray detect --config best.yaml` reads
    head = (out / "best.yaml").read_text().splitlines()[0]
    assert cfg.preset == "smoke" and cfg.ct.rounds == 3 and cfg.ct.iters == [20, 20, 20]
    if (done["canary_recall"] > 0).any():  # the objective ranked the trials: best.yaml = the best trial's values
        applied = json.loads(best["overrides"])
        assert cfg.ct.lam == pytest.approx(applied["ct.lam"]) and cfg.ct.lr == pytest.approx(applied["ct.lr"])
        assert "NO RECOMMENDATION" not in head
    else:  # no canary isolated (this plumbing schedule learns none): the user's settings, nothing more
        assert "NO RECOMMENDATION" in head
        assert cfg.ct.lam == [20, 20, 15] and cfg.ct.lr == pytest.approx([0.015, 0.015, 0.04])
    assert cfg.canary.rate == 0.0 and cfg.scale.num_workers == 1  # machine/sweep settings are not carried over
    png = (out / "objective.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert np.isfinite(done["objective"]).all()
