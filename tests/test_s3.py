"""Remote storage end to end on a real S3-compatible server on 127.0.0.1 (moto's server mode; see
tests/s3server.py for why not MinIO).

Shards are uploaded to a bucket; ``ctray detect`` runs as a real CLI process with ``--train s3://``,
``--clean s3://`` and ``--out s3://`` and finds the endpoint and the (dummy) credentials only in its
environment, as on a cluster. It starts its own local Ray, so the Ray Data read tasks, the scoring
actors (and, in the slow test, the Ray Train worker and Ray Train's storage) run in worker processes
that inherit that environment: the test passes only if they all reach the bucket.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from ctray.errors import DataError

pytestmark = pytest.mark.timeout(600)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN = 400
BUCKET = "data"
RUNS = "runs"
# every CT rule, minimal work: this checks storage, not detection
TINY = ["ct.rounds=2", "ct.pretrain_epochs=[1,1]", "ct.iters=[20,20]", "ct.lr=[0.04,0.04]", "ct.lam=[20,15]",
        "ct.batch_factor=[2,2]", "ct.keep_ratio=[0.5]", "ct.floor_k=[50]", "base.epochs=1", "base.milestones=[1]"]


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory, fmnist_available):
    """400 real Fashion-MNIST train samples in 4 shards + a 100-sample clean reserve, in s3://data/fm/."""
    if not fmnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from ctray.data.sources import make_dataset

    d = str(tmp_path_factory.mktemp("s3data") / "fm")
    make_dataset("fashion-mnist", d, n_train=N_TRAIN, n_clean=100, n_test=50, shard_size=100, seed=0)
    c = s3_server.client()
    c.create_bucket(Bucket=BUCKET)
    c.create_bucket(Bucket=RUNS)
    s3_server.upload_dir(d, BUCKET, "fm")
    return s3_server


@pytest.fixture
def s3_env(bucket, monkeypatch):
    """The server's endpoint and dummy credentials in this process's environment (pyarrow reads them)."""
    for k, v in bucket.env.items():
        monkeypatch.setenv(k, v)
    return bucket


def test_expand_shards_lists_s3_dirs_globs_and_braces(s3_env):
    from ctray.data.shards import expand_shards, shard_ids

    train = [f"s3://{BUCKET}/fm/train-{i:06d}.tar" for i in range(4)]
    assert expand_shards(f"s3://{BUCKET}/fm/train-*.tar") == train
    assert expand_shards(f"s3://{BUCKET}/fm/train-{{000000..000003}}.tar") == train
    assert expand_shards(f"s3://{BUCKET}/fm/train-00000[13].tar") == [train[1], train[3]]
    assert expand_shards(f"s3://{BUCKET}/fm/train-00000?.tar") == train
    assert expand_shards(f"s3://{BUCKET}/*/clean-*.tar") == [f"s3://{BUCKET}/fm/clean-000000.tar"]
    assert expand_shards(f"s3://{BUCKET}/fm/") == sorted([*train, f"s3://{BUCKET}/fm/clean-000000.tar",
                                                         f"s3://{BUCKET}/fm/test-000000.tar"])
    assert expand_shards(f"{train[0]},{train[2]}") == [train[0], train[2]]
    assert list(shard_ids(train).values()) == [f"train-{i:06d}.tar" for i in range(4)]  # same ids as on disk
    with pytest.raises(DataError, match="matches no object"):
        expand_shards(f"s3://{BUCKET}/fm/nothing-*.tar")
    with pytest.raises(DataError, match="does not exist"):
        expand_shards(f"s3://{BUCKET}/fm/train-000009.tar")


def test_run_dir_io_and_report_on_s3(s3_env, tmp_path):
    """ctray.io round trips, and write_report stages a remote run directory and uploads the page."""
    import numpy as np
    import pyarrow as pa

    from ctray import io as cio
    from ctray.report import write_report

    out = f"s3://{RUNS}/io-check"
    cio.makedirs(out)
    cio.write_json(cio.join(out, "run.json"), {"train": [], "counts": {"read": 3}})
    assert cio.exists(cio.join(out, "run.json")) and not cio.exists(cio.join(out, "nope.json"))
    assert cio.read_json(cio.join(out, "run.json"))["counts"]["read"] == 3
    cio.write_parquet(cio.join(out, "scores.parquet"), pa.table({
        "shard": ["a.tar"] * 3, "key": ["k0", "k1", "k2"], "label": np.array([0, 1, 0]),
        "score": np.array([0.1, 0.9, 0.2]), "flagged": np.array([False, True, False])}))
    assert cio.read_parquet(cio.join(out, "scores.parquet")).num_rows == 3
    assert write_report(out) == f"{out}/report.html"
    keys = s3_env.list_keys(RUNS, "io-check/")
    assert "io-check/report.html" in keys
    assert any(k.startswith("io-check/plots/") and k.endswith(".png") for k in keys)
    page = s3_env.get(RUNS, "io-check/report.html").decode()
    assert "ctray report: io-check" in page


def _detect(env: dict[str, str], out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ctray.cli", "detect", "--train", f"s3://{BUCKET}/fm/train-{{000000..000003}}.tar",
           "--clean", f"s3://{BUCKET}/fm/clean-*.tar", "--out", out, "--preset", "smoke", *TINY, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)


def _child_env(server) -> dict[str, str]:
    env = dict(os.environ, **server.env)
    env["RAY_ADDRESS"] = "local"  # its own Ray, never another `ray start` cluster on this machine
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return env


def _scores(server, prefix: str):
    return pq.read_table(io.BytesIO(server.get(RUNS, f"{prefix}/scores.parquet"))).to_pandas()


@pytest.fixture(scope="module")
def cli_run(bucket):
    """One `ctray detect` CLI run (local mode) with inputs and the whole run directory in the bucket, at
    s3://runs/shared/run; the example test resumes it (one detection for both tests: each costs ~60 s)."""
    env = _child_env(bucket)
    t = time.monotonic()
    p = _detect(env, f"s3://{RUNS}/shared/run", "scale.num_workers=0")
    return p, time.monotonic() - t


def test_detect_reads_and_writes_s3(bucket, cli_run):
    """`ctray detect` (local mode) with inputs and the whole run directory in the bucket."""
    p, first_s = cli_run
    assert p.returncode == 0, p.stderr[-3000:]
    r1 = "shared/run"
    keys = set(bucket.list_keys(RUNS, f"{r1}/"))
    for f in ("scores.parquet", "quarantine.parquet", "shards.parquet", "decisions.json", "rounds.json",
              "run.json", "config.yaml", "state.json", "report.html", "rounds/round_0_losses.npz",
              "rounds/round_0_kept.npy", "rounds/round_1_losses.npz"):
        assert f"{r1}/{f}" in keys, f
    for r in (0, 1):
        assert {f"{r1}/checkpoints/round_{r}/{f}" for f in ("base.pt", "confused.pt", "meta.json")} <= keys
    assert f"{r1}/checkpoints/round_0/fbase.pt" in keys
    assert any(k.startswith(f"{r1}/plots/") for k in keys)
    scores = _scores(bucket, r1)
    assert len(scores) == N_TRAIN  # exactly one row per input sample
    assert not scores.duplicated(["shard", "key"]).any()
    assert sorted(scores["shard"].unique()) == [f"train-{i:06d}.tar" for i in range(4)]
    state = json.loads(bucket.get(RUNS, f"{r1}/state.json"))
    assert len(state["rounds"]) == 2 and state["rounds"][0]["ckpt"] == f"s3://{RUNS}/{r1}/checkpoints/round_0"
    run = json.loads(bucket.get(RUNS, f"{r1}/run.json"))
    assert run["counts"]["read"] == run["counts"]["usable"] == N_TRAIN
    print(f"s3 detect: {first_s:.1f}s")


def test_s3_example_runs_against_the_bucket(bucket, cli_run):
    """examples/s3_shards.py as its docstring says, with the bucket as DATA and OUT: its run directory is the
    CLI run's (same inputs and config, the shards named by a glob instead of braces), so the library resumes
    it from the bucket with both rounds done; the cleansed shards land in the bucket, and the kept +
    removed counts add up to what was read."""
    assert cli_run[0].returncode == 0, cli_run[0].stderr[-3000:]
    before = json.loads(bucket.get(RUNS, "shared/run/state.json"))
    env = _child_env(bucket)
    cmd = [sys.executable, os.path.join(REPO, "examples", "s3_shards.py"), f"s3://{BUCKET}/fm",
           f"s3://{RUNS}/shared", "--preset", "smoke", *TINY, "scale.num_workers=0"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 of 2 rounds already done" in p.stderr, p.stderr[-3000:]
    assert json.loads(bucket.get(RUNS, "shared/run/state.json"))["rounds"] == before["rounds"]
    assert f"of {N_TRAIN} samples flagged" in p.stdout and "4 shards, 0 quarantined" in p.stdout, p.stdout
    manifest = json.loads(bucket.get(RUNS, "shared/cleansed/manifest.json"))
    assert manifest["counts"]["read"] == N_TRAIN
    assert manifest["counts"]["written"] + manifest["counts"]["removed"] == N_TRAIN
    flagged = int(_scores(bucket, "shared/run")["flagged"].sum())
    assert manifest["counts"]["removed"] == flagged


@pytest.mark.slow
def test_detect_s3_real_worker_ray_train_storage_and_resume(bucket):
    """One real Ray Train worker process: Ray Train's own storage (in-round checkpoints) goes under the run
    directory in the bucket, the worker reads the previous round's weights there; a rerun with the same
    --out finds both rounds done in the bucket's state.json and only redoes the final decision."""
    env = _child_env(bucket)
    p = _detect(env, f"s3://{RUNS}/r2", "scale.num_workers=1", "scale.checkpoint_every=10")
    assert p.returncode == 0, p.stderr[-3000:]
    keys = bucket.list_keys(RUNS, "r2/train/")
    for r in (0, 1):
        ck = [k for k in keys if k.startswith(f"r2/train/round-{r}/checkpoint_")]
        assert any(k.endswith("/confused.pt") for k in ck), ck  # the fit's final checkpoint (num_to_keep=1)
    scores = _scores(bucket, "r2")
    assert len(scores) == N_TRAIN

    p2 = _detect(env, f"s3://{RUNS}/r2", "scale.num_workers=1")
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "2 of 2 rounds already done" in p2.stderr
    again = _scores(bucket, "r2")
    # rows come in the identity pass's read order, which a rerun need not repeat: compare per sample
    cols = ["shard", "key", "flagged", "round_loss_0", "round_loss_1"]
    first, second = (x[cols].sort_values(["shard", "key"]).reset_index(drop=True) for x in (scores, again))
    assert second.equals(first)
