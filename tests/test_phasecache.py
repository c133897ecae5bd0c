"""The phase cache (ctray.training.phasecache): keys, atomic entries, a killed writer, the bound, claims.

The sweep-level reuse (two trials, one f_base) is asserted in tests/test_sweep.py's tiny sweep.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from ctray.config import load_config
from ctray.training import phasecache as pc


def _fields(tmp_path, **ov):
    shard = tmp_path / "train-000000.tar"
    if not shard.exists():
        shard.write_bytes(b"x" * 100)
    cfg = load_config("smoke", ov)
    return pc.fbase_fields(cfg, [str(shard)], [str(shard)])


def test_key_follows_what_fbase_reads_and_nothing_else(tmp_path):
    k0 = pc.key_of(_fields(tmp_path))
    assert k0 == pc.key_of(_fields(tmp_path)) and len(k0) == 24
    for ov in ({"base.lr": 0.02}, {"base.epochs": 3}, {"seed": 1}, {"canary.rate": 0.01}, {"base.max_samples": 100},
               {"ct.batch_scale": 2}, {"scale.num_workers": 2}, {"data.mean": 0.3}):
        assert pc.key_of(_fields(tmp_path, **ov)) != k0, ov
    for ov in ({"ct.lam": [5] * 6}, {"ct.iters": [7] * 6}, {"scale.torch_threads": 3}, {"data.score_cpus": 0.1},
               {"sweep.num_samples": 3}, {"io.out": "elsewhere"}):  # what a sweep varies, and machinery
        assert pc.key_of(_fields(tmp_path, **ov)) == k0, ov
    (tmp_path / "train-000000.tar").write_bytes(b"y" * 101)  # other data (size) is another key
    assert pc.key_of(_fields(tmp_path)) != k0


def _base0(tmp_path, **ov):
    shard = tmp_path / "train-000000.tar"
    if not shard.exists():
        shard.write_bytes(b"x" * 100)
    return pc.key_of(pc.base0_fields(load_config("smoke", ov), [str(shard)], [str(shard)]))


def test_base0_key_follows_round0_pretraining_not_fbase_or_confusion(tmp_path):
    k0 = _base0(tmp_path)
    assert k0 != pc.key_of(_fields(tmp_path))
    for ov in ({"ct.pretrain_epochs": [9, 2, 2, 2, 2, 2]}, {"ct.arch": "tiny-cnn"}, {"ct.pretrain_lr": 0.5},
               {"seed": 3}, {"canary.rate": 0.01}, {"ct.reserve_in_pretrain_from": 0}):
        assert _base0(tmp_path, **ov) != k0, ov
    for ov in ({"base.lr": 0.02}, {"base.epochs": 3}, {"ct.lam": [5] * 6}, {"ct.lr": [0.1] * 6},
               {"ct.iters": [7] * 6}, {"ct.pretrain_epochs": [4, 9, 9, 9, 9, 9]}):  # later rounds' epochs too
        assert _base0(tmp_path, **ov) == k0, ov


def test_publish_then_lookup_returns_the_same_bytes(tmp_path):
    root = str(tmp_path / "cache")
    assert pc.lookup(root, pc.KIND_FBASE, "k1") is None
    raw = os.urandom(5000)
    e = pc.publish(root, pc.KIND_FBASE, "k1", raw, {"a": 1})
    got = pc.lookup(root, pc.KIND_FBASE, "k1")
    assert got is not None and got.sha256 == hashlib.sha256(raw).hexdigest() == e.sha256 and got.bytes == 5000
    assert pc.read_blob(got) == raw and got.fields == {"a": 1}
    with open(got.blob, "r+b") as f:  # a blob rewritten behind the entry's back is a miss, not wrong weights
        f.write(b"\0" * 10)
    assert pc.read_blob(got) is None
    assert pc.acquire(root, pc.KIND_FBASE, "k1") == (None, None, None)  # no claims actor: compute it


def _killed_writer(root: str) -> None:
    pc.publish(root, pc.KIND_FBASE, "kk", os.urandom(20000), {},
               _after_blob=lambda: os.kill(os.getpid(), signal.SIGKILL))


def test_a_writer_killed_mid_write_leaves_no_entry(tmp_path):
    root = str(tmp_path / "cache")
    p = mp.get_context("spawn").Process(target=_killed_writer, args=(root,))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    blobs = os.listdir(os.path.join(root, "fbase", "kk"))
    assert len(blobs) == 1 and blobs[0].startswith("blob-")  # the weights were written, the entry was not
    assert pc.lookup(root, pc.KIND_FBASE, "kk") is None
    # young orphans stay (a writer may be between its two writes); an hour-old one is removed
    assert pc.evict(root, pc.KIND_FBASE, 10**9) == [] and len(os.listdir(os.path.join(root, "fbase", "kk"))) == 1
    old = time.time() - pc.ORPHAN_S - 10
    os.utime(os.path.join(root, "fbase", "kk", blobs[0]), (old, old))
    pc.evict(root, pc.KIND_FBASE, 10**9)
    assert os.listdir(os.path.join(root, "fbase", "kk")) == []


def test_bound_evicts_oldest_entries_first(tmp_path):
    root = str(tmp_path / "cache")
    for k in ("a", "b", "c"):
        pc.publish(root, pc.KIND_FBASE, k, os.urandom(1000), {})
        time.sleep(0.01)
    pc.publish(root, pc.KIND_FBASE, "d", os.urandom(1000), {}, max_bytes=2500)
    assert [k for k in "abcd" if pc.lookup(root, pc.KIND_FBASE, k)] == ["c", "d"]
    pc.publish(root, pc.KIND_FBASE, "big", os.urandom(5000), {}, max_bytes=2500)  # the new one stays, alone
    assert [k for k in ("c", "d", "big") if pc.lookup(root, pc.KIND_FBASE, k)] == ["big"]


def test_claims_one_trainer_the_others_wait_for_its_entry(tmp_path, ray_session):
    root = str(tmp_path / "cache")
    claims = pc.start_claims(root)
    assert ray_session.get(claims.holder.remote("k")) is None
    e, raw, lease = pc.acquire(root, pc.KIND_FBASE, "k")
    assert e is None and raw is None and lease is not None
    got: dict[str, object] = {}

    def waiter() -> None:
        got["res"] = pc.acquire(root, pc.KIND_FBASE, "k", poll_s=0.1, timeout_s=60)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.5)
    assert t.is_alive()  # claimed by the first caller: the second waits
    blob = os.urandom(3000)
    pc.publish(root, pc.KIND_FBASE, "k", blob, {})
    lease.release()
    t.join(30)
    e2, raw2, lease2 = got["res"]  # type: ignore[misc]
    assert e2 is not None and raw2 == blob and lease2 is None


def test_a_lapsed_claim_is_taken_over(tmp_path, ray_session):
    root = str(tmp_path / "cache2")
    claims = pc.start_claims(root)
    assert ray_session.get(claims.claim.remote("k", "dead-owner", 1.0))  # an owner that never renews
    with pytest.raises(TimeoutError):
        pc.acquire(root, pc.KIND_FBASE, "k", poll_s=0.1, lease_s=30.0, timeout_s=0.5)
    e, raw, lease = pc.acquire(root, pc.KIND_FBASE, "k", poll_s=0.1, lease_s=1.0, timeout_s=10)
    assert e is None and lease is not None
    assert ray_session.get(claims.holder.remote("k")) == lease.owner
    lease.release()
    assert ray_session.get(claims.holder.remote("k")) is None
