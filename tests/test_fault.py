"""Fault tolerance: a real Ray Train worker process killed with SIGKILL in the middle of a round.

The loop reports in-round checkpoints (phase boundaries and every ``scale.checkpoint_every`` steps);
Ray Train restarts the worker group and the loop continues from the latest one. The kill comes from
this test: a watcher thread waits for a confusion-phase checkpoint in the run directory's Ray Train
storage, reads the writer's pid from its ``meta.json`` and kills that process.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctray.config import load_config
from ctray.engine.detect import detect

pytestmark = pytest.mark.timeout(900)

N_TRAIN = 1000
EVERY = 50
ITERS = 600
# Round 0's confusion phase is long enough (600 steps, a checkpoint every 50) for the kill to land in it;
# everything else is minimal. torch_threads=1 in both runs so the two computations are comparable.
SCHEDULE = {"ct.rounds": 2, "ct.pretrain_epochs": [1, 1], "ct.iters": [ITERS, 20], "ct.lr": [0.015, 0.04],
            "ct.lam": [20, 15], "ct.batch_factor": [2, 2], "ct.keep_ratio": [0.5], "ct.floor_k": [50],
            "base.epochs": 1, "base.milestones": [1], "scale.torch_threads": 1, "scale.checkpoint_every": EVERY}


@pytest.fixture(scope="module")
def fm1k(tmp_path_factory, fmnist_available):
    from conftest import fm_dataset

    return fm_dataset(tmp_path_factory, fmnist_available, "fault", N_TRAIN, 200, 50, 250)


def _cfg(data: str, out: str, workers: int):
    o = {"io.train": [f"{data}/train-*.tar"], "io.clean": [f"{data}/clean-*.tar"], "io.out": out,
         "scale.num_workers": workers, **SCHEDULE}
    return load_config("smoke", o)


class _Killer(threading.Thread):
    """Waits for round 0's second confusion-phase checkpoint to appear and SIGKILLs the process writing
    it. (A checkpoint's files show up in storage while it uploads, before Ray Train registers it; once the
    second one appears, the first is registered, so the retry has a mid-phase position to resume from.)"""

    def __init__(self, out: str, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.out, self.deadline = out, time.time() + timeout_s
        self.killed: dict | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        pattern = os.path.join(self.out, "train", "round-0", "checkpoint_*", "meta.json")
        while not self.stop.is_set() and time.time() < self.deadline:
            for path in glob.glob(pattern):
                try:
                    meta = json.load(open(path))
                except (OSError, ValueError):  # being written
                    continue
                if meta.get("phase") == "confusion" and meta.get("step", 0) >= 2 * EVERY:
                    os.kill(int(meta["pid"]), signal.SIGKILL)
                    self.killed = {**meta, "at": time.monotonic()}
                    return
            time.sleep(0.05)


def test_sampler_state_round_trip_continues_the_same_batches():
    """What a resumed worker restores: the batches after load_state_dict are the uninterrupted ones."""
    from ctray.training.loop import Sampler

    a = Sampler(37, 8, seed=3)
    for _ in range(6):  # past one epoch boundary (a new permutation was drawn)
        a.next()
    b = Sampler(37, 8, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(12):
        assert a.next().tolist() == b.next().tolist()
    with pytest.raises(ValueError, match="does not fit"):
        Sampler(36, 8, seed=3).load_state_dict(a.state_dict())


def test_sampler_state_holds_no_permutation_and_old_states_still_load():
    """The state redraws the permutation from the generator state it came from (a few KB, where the
    permutation is 8 bytes per local sample: 10 MB per rank per checkpoint at 10M images on 8 workers);
    a state of the earlier format (the permutation itself) still continues the same batches."""
    import io

    import torch

    from ctray.training.loop import Sampler

    a = Sampler(100_000, 64, seed=5)
    for _ in range(1570):  # past one epoch boundary (1,563 batches)
        a.next()
    st = a.state_dict()
    assert "perm" not in st
    buf = io.BytesIO()
    torch.save(st, buf)
    assert buf.tell() < 20_000  # the permutation alone is 800,000 bytes
    b = Sampler(100_000, 64, seed=1)
    b.load_state_dict(st)
    old = {k: v for k, v in a.state_dict().items() if k != "perm_gen"} | {"perm": a.perm.clone()}
    c = Sampler(100_000, 64, seed=2)
    c.load_state_dict(old)
    assert "perm" in c.state_dict()  # saved again before its next epoch, an old-format state stays exact
    for _ in range(2000):  # across the next epoch boundary
        want = a.next().tolist()
        assert b.next().tolist() == want and c.next().tolist() == want
    assert "perm" not in c.state_dict()  # from its next permutation on, the compact form


def test_checkpoint_clock_by_steps_by_time_and_both():
    from ctray.training.loop import CheckpointClock

    now = [0.0]
    by_steps = CheckpointClock(every=50, seconds=0, clock=lambda: now[0])
    assert [s for s in range(1, 201) if by_steps.due(s)] == [50, 100, 150, 200]
    by_time = CheckpointClock(every=0, seconds=600, clock=lambda: now[0])
    due = []
    for s in range(1, 101):
        now[0] += 25.0  # 25 s a step: 600 s every 24 steps
        if by_time.due(s):
            due.append(s)
            by_time.reset()
    assert due == [24, 48, 72, 96]
    both = CheckpointClock(every=30, seconds=600, clock=lambda: now[0])
    now[0] = 0.0
    both.reset()
    due = []
    for s in range(1, 61):
        now[0] += 25.0
        if both.due(s):
            due.append(s)
            both.reset()
    assert due == [24, 30, 54, 60]  # whichever comes first; each one restarts the time interval
    assert not any(CheckpointClock(0, 0).due(s) for s in range(1, 1000))  # phase boundaries only
    with pytest.raises(ValueError, match="every >= 0"):
        CheckpointClock(-1, 0)


def test_a_referenced_weight_file_must_be_the_one_written(tmp_path):
    """An in-round checkpoint references f_base / base in the round's directory by SHA-256; a file
    rewritten since is refused by name, never loaded as if it were the same model."""
    from ctray.errors import DataError
    from ctray.models import build_model
    from ctray.models.checkpoint import ModelSpec, load_state, save_model

    spec = ModelSpec("small-cnn", 1, 10, 28, 0.5, 0.5)
    path = str(tmp_path / "base.pt")
    digest = save_model(path, build_model("small-cnn", 1, 10, 28), spec)
    assert set(load_state(path, digest)) == set(build_model("small-cnn", 1, 10, 28).state_dict())
    save_model(path, build_model("small-cnn", 1, 10, 28), spec, {"other": 1})
    with pytest.raises(DataError, match=r"base\.pt is not the file that was referenced"):
        load_state(path, digest)


def test_scoring_guard_refuses_lost_or_repeated_rows():
    """A retried Ray Data task must neither drop nor repeat rows; the driver checks before writing."""
    from ctray.core.index import ColumnFiller, SampleIndex

    index = SampleIndex(np.array([1, 5, 9, 12], dtype=np.int64))  # the driver's usable ids

    def run(got: list[int], what: str = "pass") -> np.ndarray:
        f = ColumnFiller(index, {"loss": np.float32})
        f.add(np.array(got, dtype=np.int64), {"loss": np.array(got, dtype=np.float32) / 2})
        return f.finish(what)["loss"]

    assert run([9, 1, 12, 5]).tolist() == [0.5, 2.5, 4.5, 6.0]  # any order is fine
    with pytest.raises(RuntimeError, match=r"got 3 rows for 4 usable samples \(1 missing, 0 repeated"):
        run([9, 1, 12])
    with pytest.raises(RuntimeError, match=r"got 5 rows .*\(0 missing, 1 repeated, 0 unknown"):
        run([9, 1, 12, 5, 5])
    with pytest.raises(RuntimeError, match="scoring pass of round 2: .*1 missing, 0 repeated, 1 unknown"):
        run([9, 1, 12, 7], "scoring pass of round 2")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_killed_worker_resumes_from_last_checkpoint(fm1k, tmp_path, caplog):
    """Slow (make test-all): ~4 min here under load; worker-process fits cost ~20 s of start-up each, the
    restart another one, plus a local-mode reference run for the determinism check."""
    caplog.set_level(logging.INFO, logger="ctray")
    out = str(tmp_path / "run")
    killer = _Killer(out)
    killer.start()
    t = time.monotonic()
    try:
        res = detect(_cfg(fm1k, out, workers=1))
    finally:
        killer.stop.set()
        killer.join()
    wall = time.monotonic() - t
    assert killer.killed is not None, "no confusion-phase checkpoint appeared: the kill never happened"
    step = killer.killed["step"]
    assert 2 * EVERY <= step < ITERS

    # the run completed with exactly one row per input sample
    assert res.n_usable == N_TRAIN
    scores = pq.read_table(f"{out}/scores.parquet").to_pandas()
    assert len(scores) == N_TRAIN and not scores.duplicated(["shard", "key"]).any()
    # ... and the log says that the workers were restarted and where they resumed
    msgs = [r.getMessage() for r in caplog.records if "restarted the training workers" in r.getMessage()]
    assert len(msgs) == 1, [r.getMessage() for r in caplog.records][-20:]
    resumed = json.load(open(f"{out}/rounds.json"))[0]["resumed_from"]
    assert resumed.startswith("confusion step ") and EVERY <= int(resumed.split()[-1]) <= step, (resumed, step)
    assert json.load(open(f"{out}/rounds.json"))[1]["resumed_from"] is None

    # the resumed computation is the uninterrupted one: the same config in local mode gives the same scores
    ref_out = str(tmp_path / "ref")
    detect(_cfg(fm1k, ref_out, workers=0))
    ref = pq.read_table(f"{ref_out}/scores.parquet").to_pandas()
    assert ref[["shard", "key"]].equals(scores[["shard", "key"]])
    np.testing.assert_array_equal(ref["round_loss_0"].to_numpy(), scores["round_loss_0"].to_numpy())
    np.testing.assert_array_equal(ref["score"].to_numpy(), scores["score"].to_numpy())
    rounds = json.load(open(f"{out}/rounds.json"))
    print(f"fault run {wall:.1f}s; killed at confusion step {step}; resumed from {resumed}; "
          f"round 0 fit {rounds[0]['train_seconds']}s, round 1 fit {rounds[1]['train_seconds']}s")
