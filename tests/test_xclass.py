"""The cross-class detector on real data through the real session Ray: an all-to-all poison that CT's
per-class decision cannot see is found with bounded false positives; on the same data without poison
nothing is flagged; untargeted triggered test images are scored as "any wrong class"."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import FM_N_TRAIN

pytestmark = pytest.mark.usefixtures("ray_session")
RATE = 0.02  # 80 poison of 4,000: recall moves in steps of 1/80


def _fbase(data: str, out: str):
    """f_base as detect trains it with the `small` preset (small CNN, 8 epochs, crop-flip), local mode."""
    from ctray.config import load_config
    from ctray.engine.train import train_model

    cfg = load_config("small", {"io.train": [f"{data}/train-*.tar"], "scale.num_workers": 0})
    return train_model(cfg, out).ckpt, cfg


@pytest.fixture(scope="module")
def fm_all2all(fm_base, tmp_path_factory):
    from ctray.data.poison import poison_dataset

    d = str(tmp_path_factory.mktemp("a2a") / "a2a")
    poison_dataset(fm_base, d, "badnet-all2all", rate=RATE, target=0, seed=0, options={})
    return d


@pytest.fixture(scope="module")
def clean_fbase(fm_base, tmp_path_factory):
    """f_base of the clean 4,000 (never saw a trigger): the no-attack case and the untargeted ASR check."""
    return _fbase(fm_base, str(tmp_path_factory.mktemp("clean") / "fbase.pt"))


def _run(data: str, tmp_path, fbase=None):
    from ctray.engine.xclass import xclass_scores

    ckpt, cfg = fbase or _fbase(data, str(tmp_path / "fbase.pt"))
    return xclass_scores(ckpt, [f"{data}/train-*.tar"], [f"{data}/clean-*.tar"], cfg)


def _truth(data: str, res) -> np.ndarray:
    from ctray.data.shards import sample_ids

    t = pd.read_parquet(f"{data}/truth.parquet")
    sid = sample_ids(t["shard"].tolist(), t["key"].tolist())
    pois = dict(zip(sid.tolist(), t["poison"].astype(bool).tolist(), strict=True))
    return np.array([pois[int(s)] for s in res.sid])


def test_all_to_all_poison_is_found(fm_all2all, tmp_path):
    res = _run(fm_all2all, tmp_path)
    d = res.decision
    assert len(res.sid) == FM_N_TRAIN and d.n == FM_N_TRAIN and d.n_ref == 500
    assert d.attack and d.test == "predictive", d  # p < xclass.alpha (0.01)
    poison = _truth(fm_all2all, res)
    assert poison.sum() == round(RATE * FM_N_TRAIN)
    flagged = res.flagged & d.attack
    tpr, fpr = flagged[poison].mean(), flagged[~poison].mean()
    assert tpr >= 0.8 and fpr <= 0.01, (tpr, fpr, d)
    # the score ranks the poison: most of it above every clean sample's median
    assert np.median(res.score[poison]) > np.quantile(res.score[~poison], 0.99)


def test_no_attack_flags_nothing(fm_base, clean_fbase, tmp_path):
    res = _run(fm_base, tmp_path, clean_fbase)
    assert not res.decision.attack, res.decision
    assert res.decision.k <= 3 * res.decision.expected + 5


def test_untargeted_attack_success_counts_any_wrong_class(tmp_path, fm_base, clean_fbase):
    """evaluate on test-triggered shards of `untargeted` (.json target = ANY_WRONG): a model that ignores
    the trigger succeeds exactly where it errs on the clean images."""
    from ctray.data.poison import poison_dataset
    from ctray.engine.train import evaluate

    d = str(tmp_path / "untargeted")
    poison_dataset(fm_base, d, "untargeted", rate=RATE, target=0, seed=0, options={})
    ev = evaluate(clean_fbase[0], None, [f"{d}/test-triggered-*.tar"])  # a model that never saw the trigger
    assert ev.n_triggered == 200 and 0 < ev.asr < 0.6, ev
