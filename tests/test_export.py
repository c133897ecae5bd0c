"""``ctray export``: the kept (or flagged) samples of a finished run written back as WebDataset shards.

Most tests build a run directory by hand from real tars (the tables come from the project's own parser,
as ``detect`` makes them), so they take milliseconds; one test exports a real ``detect`` run through Ray
tasks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctray.cli import main
from ctray.data.shards import encode_image, iter_shard, shard_ids
from ctray.engine.export import MTIME, export_run, replacement_key, safe_key
from ctray.errors import DataError

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------------------- helpers


def _png(seed: int) -> bytes:
    return encode_image(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8))


def _sample(key: str, label: int, seed: int, extra: bool = True) -> list[tuple[str, bytes]]:
    m = [(f"{key}.png", _png(seed)), (f"{key}.cls", str(label).encode())]
    if extra:
        m += [(f"{key}.json", json.dumps({"url": f"http://example.com/{seed}.png"}).encode()),
              (f"{key}.txt", f"caption {seed}\n".encode())]
    return m


def _write_tar(path: str, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1234567
            info.mode = 0o600
            tf.addfile(info, io.BytesIO(data))
    return path


def _members(path: str) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def _read(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _by_key(members: list[tuple[str, bytes]]) -> dict[str, list[tuple[str, bytes]]]:
    """Members grouped into samples the WebDataset way (a new sample when the key changes or an extension
    repeats); a key's later duplicates are dropped, as the run keeps only its first occurrence."""
    groups: list[tuple[str, list[tuple[str, bytes]]]] = []
    cur, exts = None, set()
    for name, data in members:
        head, base = posixpath.split(name)
        stem, _, ext = base.partition(".")
        key = posixpath.join(head, stem) if head else stem
        if key != cur or ext in exts:
            groups.append((key, []))
            cur, exts = key, set()
        exts.add(ext)
        groups[-1][1].append((name, data))
    out: dict[str, list[tuple[str, bytes]]] = {}
    for key, ms in groups:
        out.setdefault(key, ms)
    return out


def _fake_run(run_dir: str, shards: list[str], flag: set[str], *, write_run_json: bool = True) -> dict:
    """A finished run directory as ``detect`` writes it, minus the training: the tables come from the
    project's parser over the real tars; ``flag`` names the flagged keys."""
    os.makedirs(run_dir, exist_ok=True)
    ids = shard_ids(shards)
    ok, bad = [], []
    for p in shards:
        for r in iter_shard(p, ids[p], None, None):
            (ok if r.ok else bad).append(r)
    ok.sort(key=lambda r: (r.shard, r.key))
    scores = pa.table({"shard": [r.shard for r in ok], "key": [r.key for r in ok],
                       "label": np.array([r.label for r in ok], np.int64),
                       "score": np.linspace(0, 1, len(ok)), "flagged": [r.key in flag for r in ok]})
    pq.write_table(scores, f"{run_dir}/scores.parquet")
    pq.write_table(pa.table({"shard": pa.array([r.shard for r in bad], pa.string()),
                             "key": pa.array([r.key for r in bad], pa.string()),
                             "reason": pa.array([r.reason for r in bad], pa.string()),
                             "level": pa.array([r.level for r in bad], pa.string())}),
                   f"{run_dir}/quarantine.parquet")
    n_q = sum(r.level == "sample" for r in bad)
    counts = {"read": len(ok) + n_q, "usable": len(ok), "quarantined": n_q,
              "shard_failures": sum(r.level == "shard" for r in bad), "flagged": sum(r.key in flag for r in ok)}
    if write_run_json:
        with open(f"{run_dir}/run.json", "w") as f:
            json.dump({"version": "test", "started": 1.0, "finished": 2.0, "train": shards, "num_classes": 3,
                       "image_shape": [8, 8, 1], "counts": counts}, f)
    return counts


@pytest.fixture
def data(tmp_path):
    """Two real shards with .cls, .json and .txt members; shard 1 holds one undecodable image and one
    duplicate key (both quarantined by the run's reader). Returns (shard paths, input members by shard)."""
    d = tmp_path / "shards"
    d.mkdir()
    s0 = [m for i in range(6) for m in _sample(f"s0k{i}", i % 3, i)]
    s1 = [m for i in range(5) for m in _sample(f"s1k{i}", i % 3, 100 + i)]
    s1 += [("s1bad.png", b"not a png"), ("s1bad.cls", b"1"), ("s1bad.txt", b"broken")]
    s1 += _sample("s1k0", 2, 999)  # a duplicate of s1k0: the run quarantines it
    paths = [_write_tar(str(d / "train-000000.tar"), s0), _write_tar(str(d / "train-000001.tar"), s1)]
    return paths, {"train-000000.tar": s0, "train-000001.tar": s1}


FLAG = {"s0k1", "s0k4", "s1k3"}


# ---------------------------------------------------------------------------------------------- tests


def test_kept_samples_are_written_byte_identical_and_counted(data, tmp_path, caplog):
    paths, inputs = data
    run = str(tmp_path / "run")
    counts = _fake_run(run, paths, FLAG)
    assert counts["quarantined"] == 2  # the broken image and the duplicate
    out = str(tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="ctray.engine.export"):
        res = export_run(run, out, progress_every_s=0.0)
    assert any("1/2 shards (50%)" in m and "ETA" in m for m in caplog.messages)  # progress lines

    assert res.which == "kept" and res.read == counts["read"] == 6 + 5 + 2
    assert (res.kept, res.removed, res.quarantined) == (13 - 2 - 3, 3, 2)
    assert res.read == res.kept + res.removed + res.quarantined
    assert res.written == res.kept and res.renamed == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "train-000000.tar", "train-000001.tar"]
    for shard, members in inputs.items():
        inp = _by_key(members)
        got = _read(f"{out}/{shard}")
        got_keys = list(_by_key(got))
        want_keys = [k for k in inp if k not in FLAG and k != "s1bad"]
        assert got_keys == want_keys  # exactly the kept samples, in input order
        for k in want_keys:
            assert _by_key(got)[k] == inp[k]  # same member names, bytes and order (.cls/.json/.txt carried)
        for m in _members(f"{out}/{shard}"):
            assert m.isreg() and m.mode == 0o644 and m.mtime == MTIME
    # the duplicate's bytes (label 2, seed 999) never reach the output
    assert _png(999) not in [b for _, b in _read(f"{out}/train-000001.tar")]

    man = json.load(open(res.manifest))
    assert man["mode"] == "kept" and man["run_dir"] == os.path.abspath(run) and man["ctray_version"]
    assert man["image_shape"] == [8, 8, 1] and man["num_classes"] == 3
    assert man["counts"]["read"] == man["counts"]["kept"] + man["counts"]["removed"] + man["counts"]["quarantined"]
    assert man["shards"] == ["train-000000.tar", "train-000001.tar"]
    per = {s["shard"]: s for s in man["per_shard"]}
    assert (per["train-000001.tar"]["read"], per["train-000001.tar"]["quarantined"]) == (7, 2)
    assert per["train-000000.tar"]["removed"] == 2 and per["train-000001.tar"]["removed"] == 1

    # the exported set is a valid input again: the project's reader finds exactly the kept samples
    again = [r for p in sorted(paths) for r in iter_shard(f"{out}/{os.path.basename(p)}", "x", None, None)]
    assert all(r.ok for r in again) and len(again) == res.kept


@pytest.mark.parametrize("cut", [0, 700, 3000, 5000, -1100])
def test_damaged_shards_are_accounted_as_the_run_did(data, tmp_path, cut):
    """A truncated tar (cut inside a header, inside a member, at a sample boundary...) and a non-tar file:
    the export groups and counts exactly as the run's reader did, and writes the samples before the cut."""
    paths, inputs = data
    whole = open(paths[0], "rb").read()
    open(paths[0], "wb").write(whole[:cut] if cut else b"")  # cut=0: an empty file (not a tar)
    junk = os.path.join(os.path.dirname(paths[0]), "train-000002.tar")
    open(junk, "wb").write(b"garbage, not a tar")
    run = str(tmp_path / "run")
    counts = _fake_run(run, [*paths, junk], {"s1k3"})
    res = export_run(run, str(tmp_path / "out"))
    assert (res.read, res.quarantined, res.shard_failures) == (counts["read"], counts["quarantined"],
                                                                counts["shard_failures"])
    assert res.shard_failures == (1 if cut == -1100 else 2)  # -1100 cuts only the tar's zero padding
    assert res.read == res.kept + res.removed + res.quarantined
    per = {s.shard: s for s in res.shards}
    assert per["train-000002.tar"].output is None and per["train-000002.tar"].read == 0
    if per["train-000000.tar"].written:
        got = _by_key(_read(f"{tmp_path}/out/train-000000.tar"))
        inp = _by_key(inputs["train-000000.tar"])
        assert list(got) == list(inp)[:len(got)] and all(got[k] == inp[k] for k in got)


def test_flagged_mode_through_the_cli(data, tmp_path, capsys):
    paths, inputs = data
    run = str(tmp_path / "run")
    _fake_run(run, paths, {"s0k1", "s0k4"})  # nothing flagged in shard 1
    out = str(tmp_path / "flagged")
    assert main(["export", run, "--out", out, "--flagged"]) == 0
    assert "2 removed (flagged)" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["manifest.json", "train-000000.tar"]  # no empty tar for shard 1
    got = _by_key(_read(f"{out}/train-000000.tar"))
    assert list(got) == ["s0k1", "s0k4"]
    inp = _by_key(inputs["train-000000.tar"])
    assert all(got[k] == inp[k] for k in got)
    man = json.load(open(f"{out}/manifest.json"))
    assert man["mode"] == "flagged" and man["counts"]["written"] == 2 and man["shards"] == ["train-000000.tar"]


def test_hostile_keys_never_escape_the_extraction_directory(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    keys = ["../../evil", "/tmp/abs", "a/../../b", "ok/nested", "plain", "bad\\slash"]
    members = [m for i, k in enumerate(keys) for m in _sample(k, i % 3, i)]
    shard = _write_tar(str(d / "h-000000.tar"), members)
    run = str(tmp_path / "run")
    _fake_run(run, [shard], set())
    out = str(tmp_path / "out")
    res = export_run(run, out)
    assert res.written == len(keys)
    unsafe = {"../../evil", "/tmp/abs", "a/../../b", "bad\\slash"}
    assert {k for k in keys if safe_key(k) is None} == unsafe
    assert res.renamed == len(unsafe)
    man = json.load(open(res.manifest))
    mapping = man["per_shard"][0]["renamed"]
    assert mapping == {k: replacement_key(k) for k in unsafe}
    names = [m.name for m in _members(f"{out}/h-000000.tar")]
    assert all(not n.startswith("/") and ".." not in n.split("/") and "\\" not in n for n in names)
    # extraction stays inside the directory (tarfile's strict 'data' filter would refuse any escape)
    dest = tmp_path / "x"
    with tarfile.open(f"{out}/h-000000.tar") as tf:
        tf.extractall(dest, filter="data")
    root = os.path.realpath(dest)
    for dirpath, _, files in os.walk(dest):
        for f in files:
            assert os.path.realpath(os.path.join(dirpath, f)).startswith(root + os.sep)
    assert os.path.exists(dest / "ok" / "nested.png") and os.path.exists(dest / "plain.cls")
    # renamed samples keep their bytes
    inp, got = _by_key(members), _by_key(_read(f"{out}/h-000000.tar"))
    for k in unsafe:
        new = replacement_key(k)
        assert [b for _, b in got[new]] == [b for _, b in inp[k]]
        assert [n.split(".", 1)[1] for n, _ in got[new]] == ["png", "cls", "json", "txt"]


def test_export_to_s3_matches_the_local_export(data, tmp_path, s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    s3_server.client().create_bucket(Bucket="exports")
    paths, _ = data
    run = str(tmp_path / "run")
    _fake_run(run, paths, FLAG)
    local = export_run(run, str(tmp_path / "out"))
    remote = export_run(run, "s3://exports/cleansed/v1")
    assert remote.manifest == "s3://exports/cleansed/v1/manifest.json"
    assert [s.output for s in remote.shards] == ["train-000000.tar", "train-000001.tar"]
    keys = s3_server.list_keys("exports", "cleansed/v1/")
    assert {"cleansed/v1/train-000000.tar", "cleansed/v1/train-000001.tar", "cleansed/v1/manifest.json"} <= set(keys)
    assert not [k for k in keys if "partial" in k]
    for s in ("train-000000.tar", "train-000001.tar"):  # deterministic: the same bytes as on disk
        assert s3_server.get("exports", f"cleansed/v1/{s}") == open(f"{tmp_path}/out/{s}", "rb").read()
    man = json.loads(s3_server.get("exports", "cleansed/v1/manifest.json"))
    assert man["counts"] == json.load(open(local.manifest))["counts"]


def test_cli_errors_missing_and_unfinished_run(data, tmp_path, capsys):
    paths, _ = data
    missing = str(tmp_path / "no-such-run")
    assert main(["export", missing, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert missing in err and "does not exist" in err
    run = str(tmp_path / "run")
    _fake_run(run, paths, FLAG, write_run_json=False)  # tables written, run.json (written last) not yet
    assert main(["export", run, "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert run in err and "unfinished" in err
    assert not os.path.exists(tmp_path / "o2")


def test_changed_or_missing_input_fails_naming_shard_and_key(data, tmp_path, capsys):
    paths, inputs = data
    run = str(tmp_path / "run")
    _fake_run(run, paths, FLAG)
    # a sample added to shard 0 after the run
    _write_tar(paths[0], inputs["train-000000.tar"] + _sample("s0new", 1, 50))
    with pytest.raises(DataError, match=r"train-000000\.tar.*'s0new'.*neither scores\.parquet nor quarantine"):
        export_run(run, str(tmp_path / "o1"))
    assert not [f for f in os.listdir(tmp_path / "o1") if f.endswith(".tar") or "partial" in f]
    # a label changed
    changed = [(n, b"2" if n == "s0k0.cls" else b) for n, b in inputs["train-000000.tar"]]
    _write_tar(paths[0], changed)
    with pytest.raises(DataError, match=r"'s0k0' has label 2, the run read 0"):
        export_run(run, str(tmp_path / "o2"))
    # a shard gone: exit 2 naming it
    os.remove(paths[0])
    assert main(["export", run, "--out", str(tmp_path / "o3")]) == 2
    assert paths[0] in capsys.readouterr().err
    # an output directory that is not empty (here: the input directory) is refused
    _write_tar(paths[0], inputs["train-000000.tar"])
    assert main(["export", run, "--out", os.path.dirname(paths[0])]) == 2
    assert "not empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------- a real detect run


TINY = {"ct.rounds": 2, "ct.pretrain_epochs": [1, 1], "ct.iters": [10, 10], "ct.lr": [0.04, 0.04],
        "ct.lam": [20, 15], "ct.batch_factor": [2, 2], "ct.keep_ratio": [0.5], "ct.floor_k": [20],
        "base.epochs": 1, "base.milestones": [1], "scale.num_workers": 0}


@pytest.mark.usefixtures("ray_session")
def test_export_of_a_real_detect_run_through_ray_tasks(tmp_path, fmnist_available):
    """A real (minimal-schedule) detect run over 2 real shards, one with an undecodable image; the export
    runs one Ray task per shard. Checks the export against the run's own tables and counts."""
    if not fmnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from ctray.config import load_config
    from ctray.data.sources import make_dataset
    from ctray.engine.detect import detect

    d = tmp_path / "fm"
    make_dataset("fashion-mnist", str(d), n_train=200, n_clean=60, n_test=10, shard_size=100, seed=0)
    first = str(d / "train-000000.tar")
    members = _read(first)
    members[0] = (members[0][0], b"not a png")  # the first sample's image
    _write_tar(first, members)
    run = str(tmp_path / "run")
    detect(load_config("smoke", {"io.train": [f"{d}/train-*.tar"], "io.clean": [f"{d}/clean-*.tar"],
                                 "io.out": run, **TINY}))
    rj = json.load(open(f"{run}/run.json"))
    scores = pq.read_table(f"{run}/scores.parquet").to_pandas()
    # flag a few samples whatever the tiny schedule decided, so both sides are non-empty
    scores["flagged"] = scores["flagged"] | (np.arange(len(scores)) % 7 == 0)
    pq.write_table(pa.Table.from_pandas(scores, preserve_index=False), f"{run}/scores.parquet")
    rj["counts"]["flagged"] = int(scores["flagged"].sum())
    json.dump(rj, open(f"{run}/run.json", "w"))

    res = export_run(run, str(tmp_path / "out"), use_ray=True)
    assert res.read == rj["counts"]["read"] == 200 and res.quarantined == rj["counts"]["quarantined"] == 1
    assert res.kept == int((~scores["flagged"]).sum()) and res.removed == int(scores["flagged"].sum())
    kept = scores[~scores["flagged"]]
    for shard, group in kept.groupby("shard"):
        inp = _by_key(_read(str(d / shard)))
        got = _by_key(_read(str(tmp_path / "out" / shard)))
        assert set(got) == set(group["key"])
        assert all(got[k] == inp[k] for k in got)
