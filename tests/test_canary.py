"""Defender canaries: the trigger, the plan, the Ray Data build, and a real detect run in which the
canaries are trained and scored but never reach a user-facing output."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctray.data.attacks import adaptive_patches, badnet_patch, trojan_patch
from ctray.engine.canary import (
    CANARY_PREFIX,
    canary_objective,
    canary_patch,
    is_canary,
    plan_canaries,
    resolve_target,
)
from ctray.errors import ConfigError


def _footprint(p, shape):
    m = np.zeros(shape[:2], bool)
    h, w = p.mask.shape
    m[p.top:p.top + h, p.left:p.left + w] = p.mask
    return m


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
def test_canary_trigger_is_its_own(shape):
    p = canary_patch(shape)
    fp = _footprint(p, shape)
    assert fp.sum() >= 5
    for other in [badnet_patch(shape), trojan_patch(shape), *adaptive_patches(shape)]:
        assert not (fp & _footprint(other, shape)).any()  # no pixel shared with a shipped patch trigger
    s = p.mask.shape[0]
    assert p.mask.all() and fp.sum() == s * s  # the whole square is pasted: contrast on any background
    i, j = np.indices((s, s))
    x_px = (i == j) | (i + j == s - 1)
    for fill in (0, 255):  # a dark background and a bright object
        x = np.full((2, *shape), fill, np.uint8)
        y = p.apply(x)
        square = y[:, p.top:p.top + s, p.left:p.left + s]
        assert (square[:, x_px].max(axis=-1) > 0).all() and (square[:, ~x_px] == 0).all()  # a lit X on black
        assert (y[:, ~fp] == fill).all() and (x == fill).all()  # nothing else changed; input untouched


def test_plan_is_seeded_and_excludes_the_target():
    n = 1000
    sids = np.arange(n, dtype=np.int64) * 3 + 1
    labels = np.arange(n) % 10
    shards = np.array([f"train-{i // 250:06d}.tar" for i in range(n)])
    keys = np.array([f"k{i}" for i in range(n)])
    a = plan_canaries(sids, labels, shards, keys, 10, rate=0.002, min_count=8, target=-1, seed=3)
    b = plan_canaries(sids, labels, shards, keys, 10, rate=0.002, min_count=8, target=-1, seed=3)
    c = plan_canaries(sids, labels, shards, keys, 10, rate=0.002, min_count=8, target=-1, seed=4)
    assert len(a) == 8 and a.target == 9  # max(min_count, round(0.002 * 1000) = 2) = 8; -1 = last class
    assert np.array_equal(a.source_sids, b.source_sids) and not np.array_equal(a.source_sids, c.source_sids)
    src_rows = np.searchsorted(sids, a.source_sids)
    assert (labels[src_rows] != 9).all()
    assert is_canary(a.shards).all() and all(s.startswith(CANARY_PREFIX) for s in a.shards)
    assert len(np.intersect1d(a.sids, sids)) == 0 and len(np.unique(a.sids)) == 8
    assert len(plan_canaries(sids, labels, shards, keys, 10, rate=0.05, min_count=8, target=2, seed=0)) == 50
    assert plan_canaries(sids, labels, shards, keys, 10, rate=0.0, min_count=8, target=-1, seed=0) is None
    with pytest.raises(ConfigError, match="canary.target"):
        resolve_target(10, 10)
    with pytest.raises(ConfigError, match="not of the canary target"):
        plan_canaries(sids[:5], labels[:5], shards[:5], keys[:5], 10, 0.5, 8, -1, 0)
    assert not is_canary(np.array(["train-000000.tar", "a/__canary__/x"])).any()


def test_canary_objective():
    assert canary_objective(1.0, 0.0, 5.0) == 1.0
    assert canary_objective(1.0, 0.01, 5.0) == pytest.approx(0.95)
    assert canary_objective(0.5, 0.1, 5.0) == pytest.approx(0.0)


def test_canary_dataset_is_built_in_ray_data(ray_session, tmp_path):
    from ctray.data.reader import read_shards
    from ctray.data.shards import ImageSpec, ShardWriter
    from ctray.engine.aggregate import with_sources
    from ctray.engine.canary import canary_dataset

    rng = np.random.default_rng(0)
    with ShardWriter(str(tmp_path), "train", shard_size=20) as w:
        for i in range(40):
            w.write(f"s{i:03d}", rng.integers(0, 100, (16, 16, 3), dtype=np.uint8), i % 4, {"url": f"http://h{i % 2}.org/x"})
    spec = ImageSpec(16, 16, 3)
    ds = with_sources(read_shards(str(tmp_path), spec, 4), 0.25).materialize()
    rows = ds.select_columns(["sid", "label", "shard", "key"]).to_pandas().sort_values(["shard", "key"])
    plan = plan_canaries(rows["sid"].to_numpy(), rows["label"].to_numpy(), rows["shard"].to_numpy(),
                         rows["key"].to_numpy(), 4, rate=0.1, min_count=3, target=-1, seed=0)
    can = canary_dataset(ds, plan, 0.25)
    got = can.to_pandas().sort_values("sid")
    assert len(got) == 4 and (got["label"] == 3).all()
    assert sorted(got["sid"]) == sorted(plan.sids.tolist())
    assert got["shard"].str.startswith(CANARY_PREFIX).all() and (got["source"] == "").all()
    assert set(got.columns) == set(ds.columns())
    p = canary_patch((16, 16, 3))
    img = np.stack(got["image"].to_list())
    square = img[:, p.top:p.top + p.mask.shape[0], p.left:p.left + p.mask.shape[1]]
    assert np.array_equal(square, np.broadcast_to(p.pattern, square.shape))  # stamped exactly


@pytest.mark.timeout(3600)
def test_canaries_never_reach_user_outputs_and_counts_add_up(ray_session, tmp_path, fmnist_available):
    """A real detect run (1,000 Fashion-MNIST samples, minimal schedule: this checks accounting, not
    detection) with 1% canaries: 10 canaries are trained (kept sets include them) and scored, and
    none appears in scores / shards / sources / decisions; every real sample is there once."""
    if not fmnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from ctray.config import load_config
    from ctray.data.sources import make_dataset
    from ctray.engine.detect import detect

    data = str(tmp_path / "fm")
    make_dataset("fashion-mnist", data, n_train=1000, n_clean=200, n_test=50, shard_size=500, seed=2)
    out = str(tmp_path / "run")
    quick = {"ct.iters": [10] * 6, "ct.pretrain_epochs": [1] * 6, "base.epochs": 1, "base.milestones": [1]}
    rounds: list[dict] = []
    cfg = load_config("smoke", {"io.train": [f"{data}/train-*.tar"], "io.clean": [f"{data}/clean-*.tar"],
                                "io.out": out, "scale.num_workers": 0, "canary.rate": 0.01, **quick})
    res = detect(cfg, on_round=rounds.append)
    assert res.n_usable == 1000 and res.canary["count"] == 10 and res.canary["target"] == 9
    scores = pq.read_table(f"{out}/scores.parquet").to_pandas()
    assert len(scores) == 1000 and not scores.duplicated(["shard", "key"]).any()
    assert not scores["shard"].str.startswith(CANARY_PREFIX).any()
    assert res.n_flagged == int(scores["flagged"].sum())
    assert all(not s.startswith(CANARY_PREFIX) for s, _ in res.flagged_keys)
    shards = pq.read_table(f"{out}/shards.parquet").to_pandas()
    assert sorted(shards["shard"]) == ["train-000000.tar", "train-000001.tar"]
    assert shards["usable"].sum() == 1000 and shards["flagged"].sum() == res.n_flagged
    assert pq.read_table(f"{out}/sources.parquet").num_rows == 0
    dec = json.load(open(f"{out}/decisions.json"))
    assert sum(c["n"] for c in dec["classes"]) == 1000 and dec["n_flagged"] == res.n_flagged
    run = json.load(open(f"{out}/run.json"))
    assert run["counts"]["usable"] == 1000 and run["counts"]["canaries"] == 10 and run["aggregate"]["consistent"]
    can = json.load(open(f"{out}/canary.json"))
    assert can["count"] == 10 and 0 <= can["recall"] <= 1
    assert can["outside_flag_rate"] == pytest.approx(res.n_flagged / 1000)
    assert can["recall"] == pytest.approx(can["flagged"] / 10)
    rj = json.load(open(f"{out}/rounds.json"))
    assert all(r["n_train_set"] >= 10 for r in rj[:1]) and rj[0]["n_train_set"] == 1010  # trained on them
    assert [r["round"] for r in rounds] == list(range(6)) and rounds[-1]["final"]
    assert rounds[0]["canary_kept_share"] == rj[0]["kept_canaries"] / 10
    assert rounds[-1]["canary_recall"] == can["recall"] and rounds[-1]["flag_rate"] == can["outside_flag_rate"]
