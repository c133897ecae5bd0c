"""The HTML report of a run directory: full, partial and broken inputs (synthetic, no training)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctray.data.shards import ShardWriter
from ctray.errors import DataError
from ctray.report import roc_points, write_report

SECTIONS = ["Summary", "Score distribution", "Per-class likelihood ratios", "Distillation rounds", "ROC curve",
            "Most suspicious samples", "Per-shard flagged counts", "Quarantine"]
ODD_KEY = "odd<key>&1"  # must come out escaped


def _make_run(root, *, full: bool = True, truth: bool = True, n_per_shard: int = 20, rounds: int = 3):
    """Two tiny 8x8 RGB shards + the run files written by hand. Returns (run_dir, top key)."""
    rng = np.random.default_rng(0)
    data_dir = root / "data"
    keys, shards, labels = [], [], []
    with ShardWriter(str(data_dir), "train", shard_size=n_per_shard) as w:
        for i in range(2 * n_per_shard):
            key = ODD_KEY if i == 3 else f"s{i:04d}"
            img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            w.write(key, img, i % 3)
            keys.append(key)
            shards.append(os.path.basename(w.paths[-1]))
            labels.append(i % 3)
        paths = list(w.paths)
    n = len(keys)
    run_dir = root / "run"
    run_dir.mkdir()
    score = rng.uniform(0, 0.6, n)
    poison = np.zeros(n, bool)
    poison[[5, 11, 17, 23, 29]] = True
    score[poison] = rng.uniform(0.8, 0.99, poison.sum())
    score[3] = 0.995  # the odd key is the top one
    flagged = score > 0.7
    cols = {
        "shard": shards, "key": keys, "label": labels, "score": score, "flagged": flagged,
        "pred": np.where(flagged, labels, (np.array(labels) + 1) % 3),
        **{f"round_loss_{r}": rng.uniform(0, 3, n) for r in range(rounds)},
        "proj_x": rng.normal(size=n), "proj_y": rng.normal(size=n),
    }
    if truth:
        cols["truth_poison"] = poison
        cols["truth_cover"] = np.isin(np.arange(n), [6, 12])
    pq.write_table(pa.table(cols), run_dir / "scores.parquet")
    run = {"version": "0.1.0", "started": "2025-01-01T00:00:00", "finished": "2025-01-01T00:05:00",
           "train": paths, "clean": [], "preset": "unit-test", "num_classes": 3, "image_shape": [8, 8, 3],
           "seconds": {"base": 12.5, "rounds": 250.0, "decide": 1.25}}
    (run_dir / "run.json").write_text(json.dumps(run))
    if full:
        dec = {"classes": [{"class": 0, "n": 14, "n_isolated": 6, "lr": 3.25, "cleansed": True, "weak": True},
                           {"class": 1, "n": 13, "n_isolated": 2, "lr": 2.84, "cleansed": False, "weak": False,
                            "corroboration": 0.12, "vetoed": True},
                           {"class": 2, "n": 13, "n_isolated": 1, "lr": 1.0, "cleansed": False, "weak": False}],
               "threshold_max": 1.5, "threshold_any": 2.0, "weak_lr": 10.0, "corroborate": 0.4,
               "n_flagged": int(flagged.sum())}
        (run_dir / "decisions.json").write_text(json.dumps(dec))
        rr = [{"round": r, "kept": n // (2 ** (r + 1)) if r < rounds - 1 else None,
               "kept_poison": 4 if r < rounds - 1 else None, "seconds": 10.0 + r} for r in range(rounds)]
        (run_dir / "rounds.json").write_text(json.dumps(rr))
        pq.write_table(pa.table({"shard": ["train-000000.tar", "train-000001.tar"], "samples": [21, 20],
                                 "usable": [20, 20], "quarantined": [1, 0],
                                 "flagged": [int(flagged[:20].sum()), int(flagged[20:].sum())],
                                 "mean_score": [float(score[:20].mean()), float(score[20:].mean())]}),
                       run_dir / "shards.parquet")
        pq.write_table(pa.table({"shard": ["train-000000.tar"], "key": ["bad<1>"],
                                 "reason": ["image does not decode: OSError: broken <data>"],
                                 "level": ["sample"]}), run_dir / "quarantine.parquet")
        if truth:
            (run_dir / "metrics.json").write_text(json.dumps({"ct": {
                "tpr": 1.0, "fpr": 0.0286, "precision": 0.833, "f1": 0.909, "auroc": 0.99, "auprc": 0.95,
                "n": n, "n_poison": 5, "n_flagged": int(flagged.sum()), "flag_rate": float(flagged.mean())}}))
    return run_dir, keys[3]


def test_full_report(tmp_path) -> None:
    run_dir, top_key = _make_run(tmp_path)
    out = write_report(str(run_dir), top_k=8)
    assert out == os.path.join(str(run_dir), "report.html")
    page = open(out, encoding="utf-8").read()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    assert page.count("data:image/png;base64,") >= 6 + 8  # plots + thumbnails
    # the top-scored key is shown (escaped) with a thumbnail and no "not available" image placeholder
    assert "odd&lt;key&gt;&amp;1" in page and ODD_KEY not in page
    assert "image not available" not in page
    assert re.search(r'alt="train-000000\.tar / odd&lt;key&gt;&amp;1" src="data:image/png;base64,', page)
    assert "&gt; 1.5" in page and "&gt; 2" in page
    assert "<b>class 0 (LR 3.25)</b>: likelihood ratio under 10 (decide.weak_lr)" in page  # decisions.json's "weak" class
    # decide.corroborate's veto is shown with its value and bar
    assert "<b>class 1 (LR 2.84, corroboration 0.12)</b>: passed the likelihood-ratio test on weak evidence, but under 0.4" in page
    assert "bad&lt;1&gt;" in page and "broken &lt;data&gt;" in page
    assert "0.909" in page  # metrics table
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert len(page) < 3_000_000
    plots = set(os.listdir(run_dir / "plots"))
    assert {"score_histogram.png", "class_likelihood_ratios.png", "rounds.png", "roc.png",
            "shards_flagged.png", "class_projections.png", "top_000.png"} <= plots


def test_partial_run_dir(tmp_path) -> None:
    run_dir, _ = _make_run(tmp_path, full=False, truth=False)
    page = open(write_report(str(run_dir)), encoding="utf-8").read()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    assert page.count("not available") >= 4  # classes, rounds, ROC, quarantine, metrics
    assert "decisions.json is missing" in page and "quarantine.parquet is missing" in page
    assert "data:image/png;base64," in page  # histogram and thumbnails still render


def test_unreadable_shards_are_reported(tmp_path) -> None:
    run_dir, _ = _make_run(tmp_path, full=False)
    for p in json.loads((run_dir / "run.json").read_text())["train"]:
        with open(p, "wb") as f:
            f.write(b"this is not a tar file")
    page = open(write_report(str(run_dir)), encoding="utf-8").read()
    assert "Some images are not available" in page and "not a readable tar file" in page
    assert "image not available" in page


def test_missing_shard_files(tmp_path) -> None:
    run_dir, _ = _make_run(tmp_path, full=False)
    for p in json.loads((run_dir / "run.json").read_text())["train"]:
        os.remove(p)
    page = open(write_report(str(run_dir)), encoding="utf-8").read()
    assert "is unreadable: FileNotFoundError" in page


def test_required_files(tmp_path) -> None:
    with pytest.raises(DataError, match="run.json"):
        write_report(str(tmp_path))
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(DataError, match="scores.parquet"):
        write_report(str(tmp_path))


def test_roc_points_matches_rank_statistic() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.2
    s = np.round(rng.random(300) + 0.5 * y, 1)  # many ties
    fpr, tpr, auc = roc_points(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    pos, neg = s[y], s[~y]
    u = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc == pytest.approx(u, abs=1e-12)
    assert np.isnan(roc_points(np.zeros(5, bool), np.arange(5.0))[2])


def test_huge_likelihood_ratio_still_plots(tmp_path) -> None:
    """A near-degenerate class gave an LR of 1.8e287 in a real short run; matplotlib's log-axis ticks
    overflowed and the page was not written. The bar is capped; the table keeps the true value."""
    run_dir, _ = _make_run(tmp_path)
    dec = json.loads((run_dir / "decisions.json").read_text())
    dec["classes"][0]["lr"] = 1.819748385042677e287
    (run_dir / "decisions.json").write_text(json.dumps(dec))
    page = open(write_report(str(run_dir)), encoding="utf-8").read()
    assert "<h2>" in page and os.path.exists(run_dir / "plots" / "class_likelihood_ratios.png")


def test_large_scores_table_is_sampled_with_exact_counts(tmp_path, monkeypatch) -> None:
    """Above report.MAX_ROWS rows the report streams scores.parquet: exact counts, plots from a sample,
    and the true top-scored sample still shown."""
    import pandas as pd

    import ctray.report as rep

    run_dir, top_key = _make_run(tmp_path, n_per_shard=200)
    full = pd.read_parquet(run_dir / "scores.parquet")
    monkeypatch.setattr(rep, "MAX_ROWS", len(full) // 4)
    page = open(write_report(str(run_dir), top_k=4), encoding="utf-8").read()
    assert "from a uniform sample of" in page and f"of {len(full):,} samples" in page
    n_fl = int(full["flagged"].sum())
    assert f"{n_fl:,} ({100 * n_fl / len(full):.2f}%)" in page  # exact, not the sample's
    npois = int(full["truth_poison"].sum())
    tp = int((full["flagged"] & full["truth_poison"]).sum())
    assert f"{tp:,} of {npois:,}" in page
    assert "odd&lt;key&gt;&amp;1" in page  # the top-scored key is always kept


def test_streamed_scores_keep_exact_totals_and_top_rows_over_many_batches(tmp_path) -> None:
    """The streaming branch over several Parquet batches (65,536 rows each): exact totals, the true
    top-scored rows (NaN scores never outrank a number), a sample of about ``max_rows`` rows."""
    from ctray.report import _load_scores

    rng = np.random.default_rng(3)
    n = 140_000
    score = rng.uniform(0, 1, n)
    score[rng.choice(n, 500, replace=False)] = np.nan
    top_ix = rng.choice(np.flatnonzero(~np.isnan(score)), 5, replace=False)
    score[top_ix] = 2.0 + np.arange(5)
    flagged = rng.random(n) < 0.01
    poison = rng.random(n) < 0.01
    labels = rng.integers(0, 4, n)
    keys = [f"k{i:06d}" for i in range(n)]
    pq.write_table(pa.table({"shard": ["s.tar"] * n, "key": keys, "label": labels, "score": score,
                             "flagged": flagged, "truth_poison": poison}), tmp_path / "scores.parquet")
    sample, totals = _load_scores(str(tmp_path / "scores.parquet"), top_k=5, max_rows=2_000)
    assert totals is not None and totals["rows"] == n
    assert totals["flagged"] == int(flagged.sum()) and totals["poison"] == int(poison.sum())
    assert totals["tp"] == int((flagged & poison).sum())
    want = {int(c): int(k) for c, k in zip(*np.unique(labels[flagged], return_counts=True), strict=True)}
    assert totals["flagged_by_class"] == want
    assert {keys[i] for i in top_ix} <= set(sample["key"])
    assert 1_700 <= len(sample) <= 2_300 and sample["key"].is_unique
