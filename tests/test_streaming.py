"""The streaming data path (issue: web scale with bounded memory), forced on tiny real data by tiny budgets:
``data.cache_bytes=0`` (nothing of D cached in the object store: every pass re-reads the shards; the final
pass's features are never materialized) and ``data.worker_cache_bytes=0`` (training workers stream every
epoch from their Ray Data shard instead of holding the round's set).

Tolerance: streamed epochs see the samples in another order than the in-memory sampler (a shuffle buffer,
not a permutation), so the flags are not bit-identical to the in-memory run's; the test holds the streaming
path to the same detection bar as the in-memory test of tests/test_detect.py (TPR >= 0.8, FPR <= 0.01 on
2% badnet; measured in memory: TPR 1.0, FPR 0.0) and to exact accounting.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import pyarrow.parquet as pq
import pytest
from test_detect import N_TRAIN, PRETRAIN, _cfg, _check_accounting, _corrupt_copy

from ctray.core.budget import decoded_bytes, fits, parse_bytes
from ctray.engine.detect import detect
from ctray.engine.ground import estimate_samples

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(1200)]

STREAM = {"data.cache_bytes": "0", "data.worker_cache_bytes": "0", "data.shuffle_bytes": 2**20}


def test_budget_parsing_and_estimates(fm_badnet):
    assert parse_bytes("auto") is None and parse_bytes("0") == 0 and parse_bytes(0) == 0
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes("2GiB") == 2 * 2**30 and parse_bytes(1e9) == 10**9
    for bad in ("lots", "-1", "5 parsecs"):
        with pytest.raises(ValueError, match="byte budget"):
            parse_bytes(bad)
    assert decoded_bytes(10, (64, 64, 3)) == 10 * (64 * 64 * 3 + 256)
    assert fits(100, (28, 28, 1), 100 * (784 + 256)) and not fits(101, (28, 28, 1), 100 * (784 + 256))
    paths = sorted(str(p) for p in __import__("pathlib").Path(fm_badnet).glob("train-*.tar"))
    assert estimate_samples(paths) == N_TRAIN  # the manifest's count
    assert estimate_samples(paths[:1]) == N_TRAIN // 4  # a subset of the manifest's shards: its share


def test_streaming_path_detects_badnet_with_exact_accounting(fm_badnet, tmp_path, caplog):
    """The web-scale shape on 2 of the 4 shards (the one holding 48 of the 80 poison and the next; 2,000
    samples, ~3% poison): nothing of D cached; round 0 (f_base and pretraining on all of D, 1.6 MB of
    pixels) streams its epochs, rounds 1+ (D_r <= N/2, 0.8 MB) fit the 1 MB worker budget and are loaded
    by filtering on the kept ids while streaming the shard once. Same bars as the in-memory test."""
    conc = json.load(open(f"{fm_badnet}/manifest.json"))["attack"]["concentrate"]["shard"]
    shards = sorted(str(p) for p in pathlib.Path(fm_badnet).glob("train-*.tar"))
    i = [os.path.basename(p) for p in shards].index(os.path.basename(conc))
    two = [shards[i], shards[(i + 1) % len(shards)]]
    n = 2 * N_TRAIN // 4
    out = str(tmp_path / "run")
    with caplog.at_level(logging.INFO):
        res = detect(_cfg(fm_badnet, out, **PRETRAIN, **{**STREAM, "data.worker_cache_bytes": "1MB", "io.train": two}))
    assert "streamed from the shards in every pass" in caplog.text
    assert "round 0: streaming D and D_r from the worker's Ray Data shard" in caplog.text
    assert "round 1: streaming" not in caplog.text  # D_r fits the budget: held, loaded by id while streaming
    m = res.metrics["ct"]
    assert m["n_poison"] > 48, m
    assert m["tpr"] >= 0.8, m
    assert m["fpr"] <= 0.01, m
    assert 0 in res.cleansed_classes
    _check_accounting(out, n)
    rounds = json.load(open(f"{out}/rounds.json"))
    assert [r["n_train_set"] for r in rounds[:2]] == [n, rounds[0]["kept"]]  # only D_r reached the trainers
    table = pq.read_table(f"{out}/shards.parquet").to_pandas()
    assert table["flagged"].sum() == res.n_flagged and table["samples"].sum() == n


def test_streaming_bad_input_is_accounted_once(fm_badnet, tmp_path):
    """A corrupt image and a non-tar shard on the streaming path: each read sample is scored or
    quarantined exactly once, although every pass re-reads the shards (with act.in_detect, whose column
    is joined to the run's samples by id)."""
    data = _corrupt_copy(fm_badnet, tmp_path / "data", keep=2)
    n = 2 * N_TRAIN // 4
    out = str(tmp_path / "run")
    quick = {"ct.iters": [10] * 6, "ct.pretrain_epochs": [1] * 6, "base.epochs": 1, "base.milestones": [1]}
    res = detect(_cfg(data, out, **quick, **STREAM, **{"act.in_detect": True}))
    assert res.n_quarantined == 1 and res.n_usable == n - 1 and res.n_read == n
    _check_accounting(out, n)
    scores = pq.read_table(f"{out}/scores.parquet").to_pandas()  # the BadActs column joined by sample id
    assert scores["score_act"].notna().all() and scores["flagged_act"].dtype == bool
    q = pq.read_table(f"{out}/quarantine.parquet").to_pandas()
    assert q[q.level == "shard"]["shard"].tolist() == ["train-999999.tar"]
    run = json.load(open(f"{out}/run.json"))
    assert run["counts"]["read"] == n and run["counts"]["shard_failures"] == 1


class _Stop(RuntimeError):
    pass


def test_streaming_run_resumes_after_an_interrupted_round(fm_badnet, tmp_path):
    """The driver dies after round 2 of 4 (an exception from the round callback, as a kill would leave
    state.json); the rerun resumes at round 3 on the streaming path and accounts for every sample."""
    one = f"{fm_badnet}/train-000000.tar"
    quick = {"io.train": [one], "ct.rounds": 4, "ct.iters": [20] * 4, "ct.pretrain_epochs": [1] * 4,
             "ct.lr": [0.015] * 4, "ct.lam": [20] * 4, "ct.batch_factor": [2] * 4, "ct.keep_ratio": [0.5, 0.5, 0.5],
             "ct.floor_k": [20] * 3, "base.epochs": 1, "base.milestones": [1]}
    out = str(tmp_path / "run")

    def stop_after_two(info):
        if info["round"] == 1:
            raise _Stop("interrupted")

    with pytest.raises(_Stop):
        detect(_cfg(fm_badnet, out, truth=False, **quick, **STREAM), on_round=stop_after_two)
    st = json.load(open(f"{out}/state.json"))
    assert len(st["rounds"]) == 2
    before = [r["ckpt"] for r in st["rounds"]]
    seen = []
    res = detect(_cfg(fm_badnet, out, truth=False, **quick, **STREAM), on_round=lambda i: seen.append(i["round"]))
    assert seen == [2, 3]  # rounds 0-1 were not redone
    st = json.load(open(f"{out}/state.json"))
    assert [r["ckpt"] for r in st["rounds"][:2]] == before and len(st["rounds"]) == 4
    _check_accounting(out, N_TRAIN // 4, rounds=4)
    assert res.n_usable == N_TRAIN // 4


@pytest.mark.slow  # two real Ray Train worker processes per fit: ~2 min; make test-all runs it
def test_streaming_with_two_workers_keeps_the_global_step_schedule(fm_badnet, tmp_path):
    """Two DDP workers streaming their Ray Data shards: epochs start on the same global step on both
    (a worker that restarted its epoch alone would wait on streaming_split while the other waits on it in
    DDP's all-reduce), and every sample is accounted for."""
    from test_detect import TWO_ROUNDS

    out = str(tmp_path / "run")
    res = detect(_cfg(fm_badnet, out, **{**TWO_ROUNDS, "scale.num_workers": 2, **STREAM}))
    _check_accounting(out, N_TRAIN, rounds=2)
    assert res.n_usable == N_TRAIN
    rounds = json.load(open(f"{out}/rounds.json"))
    # Ray Train's split is equal=True: it drops up to workers - 1 rows so both shares have the same count
    # (measured: 2,013 kept, 2,012 trained on); round 0's 4,000 split evenly
    assert rounds[0]["n_train_set"] == N_TRAIN and 0 <= rounds[0]["kept"] - rounds[1]["n_train_set"] <= 1
