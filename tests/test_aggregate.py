"""Shard/source aggregation: the actor is idempotent per block, the feed op counts each sample once
even when every block is sent twice, the ranked tables, and a real detect run where 60% of the poison
sits in one shard (real local Ray, real Fashion-MNIST)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctray.core.shardstats import GroupStats
from ctray.engine.aggregate import (
    block_partials,
    feed_aggregator,
    source_of,
    start_aggregator,
    write_group_tables,
)

C, BINS, K = 3, 4, 2


def test_source_of():
    assert source_of('{"url": "https://Cdn.Example.com/a/b.jpg?x=1"}') == "cdn.example.com"
    assert source_of('{"url": "http://h.org/x", "source": "crawl-2023-06"}') == "crawl-2023-06"
    assert source_of('{"source": "  "}') == ""
    for bad in ("", "not json", "[1, 2]", '{"url": 5}', '{"url": "no-scheme"}', '{"url": "http://[bad"}'):
        assert source_of(bad) == "", bad


def _rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shard = np.array([f"train-{i % 3:06d}.tar" for i in range(n)], dtype=object)
    shard[::10] = "__canary__/train-000000.tar"  # canaries must be dropped from the stats
    source = np.array(["", "a.example", "b.example"], dtype=object)[rng.integers(0, 3, n)]
    return {"sid": np.arange(n, dtype=np.int64) * 7919, "shard": shard, "source": source,
            "label": rng.integers(0, C, n), "pred": rng.integers(0, C, n), "prob": rng.random(n).astype(np.float32)}


def _direct(rows: dict[str, np.ndarray]) -> tuple[GroupStats, GroupStats]:
    real = ~np.char.startswith(rows["shard"].astype(str), "__canary__/")
    src = real & (rows["source"].astype(str) != "")

    def st(groups, m):
        return GroupStats.from_samples(groups[m].astype(str), rows["sid"][m], rows["prob"][m].astype(np.float64),
                                       rows["label"][m], rows["pred"][m], C, BINS, K)

    return st(rows["shard"], real), st(rows["source"], src)


def test_resent_block_is_not_double_counted(ray_session):
    import ray

    rows = _rows(50)
    block = pa.table(rows)
    bid, by_shard, by_source = block_partials(block, C, BINS, K)
    agg = start_aggregator(C, BINS, K)
    assert ray.get(agg.add.remote(bid, by_shard, by_source)) is True
    assert ray.get(agg.add.remote(bid, by_shard, by_source)) is False  # a retried task re-sends the block
    # the same rows in another order are the same block (content id over sorted ids)
    bid2, _, _ = block_partials(block.take(np.random.default_rng(1).permutation(50)), C, BINS, K)
    assert bid2 == bid
    sh, src, info = ray.get(agg.result.remote())
    want_sh, want_src = _direct(rows)
    assert sh == want_sh and src == want_src
    assert info == {"blocks": 1, "duplicates": 1}
    assert int(sh.usable.sum()) == 45 and not any(g.startswith("__canary__") for g in sh.group)
    ray.kill(agg)


def test_feed_counts_each_sample_once_when_every_block_is_sent_twice(ray_session):
    """Executing the fed dataset twice re-sends every block (what a retry of every task would do):
    the actor's totals still equal one pass computed directly."""
    import ray

    rows = _rows(400, seed=3)
    ds = ray.data.from_items([{k: v[i] for k, v in rows.items()} for i in range(400)], override_num_blocks=5)
    agg = start_aggregator(C, BINS, K)
    fed = feed_aggregator(ds, agg, C, BINS, K, num_cpus=0.25)
    assert fed.count() == 400
    assert fed.materialize().count() == 400  # second execution: same blocks again
    sh, src, info = ray.get(agg.result.remote())
    want_sh, want_src = _direct(rows)
    assert sh == want_sh and src == want_src
    assert info["blocks"] >= 1 and info["duplicates"] == info["blocks"]
    ray.kill(agg)


def test_group_tables_ranked_and_marked(tmp_path):
    # shard b: 30 isolated of class 0 in 1000; the others ~5; class 0 cleansed
    groups = np.array(["a"] * 1000 + ["b"] * 1000 + ["c"] * 1000)
    labels = np.zeros(3000, np.int64)
    preds = np.ones(3000, np.int64)
    preds[np.r_[0:5, 1000:1030, 2000:2004]] = 0
    score = np.where(preds == 0, 0.9, 0.1)
    ids = np.arange(3000, dtype=np.int64)
    st = GroupStats.from_samples(groups, ids, score, labels, preds, 2, BINS, K)
    st = st.merge(GroupStats.from_read(np.array(["a", "d"]), np.array([True, False]), np.array([False, True]), 2, BINS, K))
    key_of = {i: (g, f"k{i}") for i, g in zip(ids, groups, strict=True)}
    cleansed = np.array([True, False])
    summary = write_group_tables(str(tmp_path), st, GroupStats.empty(2, BINS, K), st.flagged(cleansed),
                                 np.zeros(0, np.int64), 0.01, key_of)
    t = pq.read_table(tmp_path / "shards.parquet").to_pandas()
    assert t["shard"].tolist()[0] == "b" and bool(t["marked"].iloc[0])
    assert t.set_index("shard").loc["b", "flagged"] == 30
    assert t.set_index("shard").loc["a", "quarantined"] == 1 and t.set_index("shard").loc["a", "samples"] == 1001
    assert t.set_index("shard").loc["d", "failures"] == 1 and t.set_index("shard").loc["d", "usable"] == 0
    assert list(t.set_index("shard").loc["b", "top_keys"]) == ["k1000", "k1001"]
    assert summary["shards"]["marked"] == ["b"]
    assert summary["shards"]["level"] == pytest.approx(0.01 / 3)
    src = pq.read_table(tmp_path / "sources.parquet")
    assert src.num_rows == 0 and "source" in src.column_names


# ------------------------------------------------------------------------------------------- real run


@pytest.fixture(scope="module")
def fm_concentrated(tmp_path_factory, fmnist_available):
    if not fmnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from ctray.data.poison import poison_dataset
    from ctray.data.sources import make_dataset

    root = tmp_path_factory.mktemp("conc")
    make_dataset("fashion-mnist", str(root / "base"), n_train=4000, n_clean=500, n_test=100, shard_size=1000, seed=0)
    summary = poison_dataset(str(root / "base"), str(root / "conc"), "badnet", rate=0.01, target=0, seed=0,
                             options={}, concentrate=0.6)
    return str(root / "conc"), summary, str(root / "base")


def test_poison_concentrate_is_deterministic(fm_concentrated, tmp_path):
    from ctray.data.poison import poison_dataset

    data, summary, base = fm_concentrated
    truth = pq.read_table(f"{data}/truth.parquet").to_pandas()
    per_shard = truth.groupby("shard")["poison"].sum()
    assert summary["n_poison"] == 40 and summary["n_poison_concentrated"] == 24
    assert per_shard[summary["concentrated_shard"]] == 24 and per_shard.sum() == 40
    assert json.load(open(f"{data}/manifest.json"))["attack"]["concentrate"]["shard"] == summary["concentrated_shard"]
    again = poison_dataset(base, str(tmp_path / "again"), "badnet", rate=0.01, target=0,
                           seed=0, options={}, concentrate=0.6)
    t2 = pq.read_table(tmp_path / "again" / "truth.parquet").to_pandas()
    assert again["concentrated_shard"] == summary["concentrated_shard"]
    assert t2["poison"].tolist() == truth["poison"].tolist()


@pytest.mark.slow  # make test: tests/test_detect.py::test_detects_badnet checks the same ranking on its run
@pytest.mark.timeout(3600)
def test_concentrated_poison_shard_ranks_first(fm_concentrated, tmp_path, ray_session):
    """badnet 1% of 4,000 Fashion-MNIST with 60% of the poison (24 of 40) in one of 4 shards, `smoke`
    preset, local mode: shards.parquet ranks that shard first and marks it; counts add up."""
    from ctray.config import load_config
    from ctray.engine.detect import detect

    data, summary, _ = fm_concentrated
    out = str(tmp_path / "run")
    cfg = load_config("smoke", {"io.train": [f"{data}/train-*.tar"], "io.clean": [f"{data}/clean-*.tar"],
                                "io.out": out, "io.truth": f"{data}/truth.parquet", "scale.num_workers": 0})
    res = detect(cfg)
    assert res.metrics["ct"]["tpr"] >= 0.8, res.metrics
    shards = pq.read_table(f"{out}/shards.parquet").to_pandas()
    assert shards["shard"].iloc[0] == summary["concentrated_shard"], shards[["shard", "flagged", "p_value"]]
    assert bool(shards["marked"].iloc[0])
    assert shards["samples"].sum() == 4000 and shards["usable"].sum() == res.n_usable
    assert shards["flagged"].sum() == res.n_flagged
    scores = pq.read_table(f"{out}/scores.parquet").to_pandas()
    assert shards.set_index("shard")["flagged"].to_dict() == scores.groupby("shard")["flagged"].sum().to_dict()
    run = json.load(open(f"{out}/run.json"))
    assert run["aggregate"]["consistent"] and run["aggregate"]["duplicates"] == 0
    assert pq.read_table(f"{out}/sources.parquet").num_rows == 0  # Fashion-MNIST shards carry no .json
    page = open(f"{out}/report.html", encoding="utf-8").read()
    assert "<h2>Per-source flagged counts</h2>" in page and "marked</b>" in page


def test_report_shows_ranked_shards_and_sources(tmp_path):
    """The report's per-shard and per-source sections read the ranked tables (no training)."""
    from ctray.report import write_report

    n = 600
    groups = np.array([f"train-{i // 200:06d}.tar" for i in range(n)])
    sources = np.array(["evil.example"] * 100 + ["good.example"] * 500)
    labels = np.zeros(n, np.int64)
    preds = np.ones(n, np.int64)
    preds[:30] = 0  # 30 isolated, all from evil.example and the first shard
    preds[[300, 450]] = 0
    score = np.where(preds == 0, 0.95, 0.05)
    ids = np.arange(n, dtype=np.int64)
    cleansed = np.array([True, False])
    by_shard = GroupStats.from_samples(groups, ids, score, labels, preds, 2, BINS, K)
    by_source = GroupStats.from_samples(sources, ids, score, labels, preds, 2, BINS, K)
    key_of = {int(i): (g, f"k{i}") for i, g in zip(ids, groups, strict=True)}
    write_group_tables(str(tmp_path), by_shard, by_source, by_shard.flagged(cleansed), by_source.flagged(cleansed),
                       0.01, key_of)
    flagged = (preds == 0)
    pq.write_table(pa.table({"shard": groups, "key": [f"k{i}" for i in ids], "label": labels, "score": score,
                             "flagged": flagged}), tmp_path / "scores.parquet")
    (tmp_path / "run.json").write_text(json.dumps({"train": [], "clean": []}))
    page = open(write_report(str(tmp_path), top_k=0), encoding="utf-8").read()
    assert "<h2>Per-shard flagged counts</h2>" in page and "<h2>Per-source flagged counts</h2>" in page
    assert (tmp_path / "plots" / "shards_flagged.png").exists() and (tmp_path / "plots" / "sources_flagged.png").exists()
    src = pq.read_table(tmp_path / "sources.parquet").to_pandas()
    assert src["source"].tolist() == ["evil.example", "good.example"] and src["marked"].tolist() == [True, False]
    assert list(src["top_keys"].iloc[0])[0] == "train-000000.tar:k0"
    assert page.count('<tr class="hl"><td>evil.example</td>') == 1
