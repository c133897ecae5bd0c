"""Built-in data sources: digits, folder, fashion-mnist (real files), torchvision guards, the CLI."""

from __future__ import annotations

import json
import os
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ctray.data.shards import ImageSpec, expand_shards, load_arrays, read_manifest
from ctray.data.sources import make_dataset
from ctray.errors import DataError

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def load_split(d: str, split: str, man: dict):
    paths = expand_shards(os.path.join(d, f"{split}-*.tar"))
    assert [os.path.basename(p) for p in paths] == man["shards"][split]
    ok, bad = load_arrays(paths, ImageSpec(*man["image_shape"]), man["num_classes"])
    assert not bad
    return ok


def members(path: str) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


def test_digits_defaults_and_determinism(tmp_path):
    d = str(tmp_path / "a")
    man = make_dataset("digits", d, None, None, None, shard_size=500, seed=0)
    assert json.load(open(os.path.join(d, "manifest.json"))) == man
    assert man["counts"] == {"train": 1197, "clean": 300, "test": 300}
    assert man["image_shape"] == [8, 8, 1] and man["num_classes"] == 10
    assert [len(man["shards"][s]) for s in ("train", "clean", "test")] == [3, 1, 1]
    recs = {s: load_split(d, s, man) for s in ("train", "clean", "test")}
    keys = {s: {r.key for r in recs[s]} for s in recs}
    assert sum(len(k) for k in keys.values()) == 1797 == len(set.union(*keys.values()))  # disjoint
    assert all(k.startswith("dg") and len(k) == 9 for k in keys["train"])
    imgs = np.stack([r.image for r in recs["train"]])
    assert imgs.max() == 255 and imgs.min() == 0
    assert read_manifest(expand_shards(d))["image_shape"] == [8, 8, 1]
    # same seed: byte-identical shards; another seed: another split
    d2, d3 = str(tmp_path / "b"), str(tmp_path / "c")
    make_dataset("digits", d2, None, None, None, shard_size=500, seed=0)
    man3 = make_dataset("digits", d3, 100, 50, 60, shard_size=500, seed=1)
    for name in ("train-000000.tar", "clean-000000.tar"):
        assert open(os.path.join(d, name), "rb").read() == open(os.path.join(d2, name), "rb").read()
    assert man3["counts"] == {"train": 100, "clean": 50, "test": 60}
    assert {r.key for r in load_split(d3, "clean", man3)} != set(list(keys["clean"])[:50])


def test_count_validation(tmp_path):
    d = str(tmp_path)
    with pytest.raises(DataError, match="n_clean must be >= 0"):
        make_dataset("digits", d, None, -1, None, shard_size=10, seed=0)
    with pytest.raises(DataError, match=r"n_train must be in \[1, 1197\]"):
        make_dataset("digits", d, 5000, None, None, shard_size=10, seed=0)
    with pytest.raises(DataError, match="1797 images"):
        make_dataset("digits", d, None, 1000, 900, shard_size=10, seed=0)
    with pytest.raises(DataError, match="shard_size"):
        make_dataset("digits", d, None, None, None, shard_size=0, seed=0)
    with pytest.raises(DataError, match="unknown source 'mnist'; known: fashion-mnist"):
        make_dataset("mnist", d, None, None, None, shard_size=10, seed=0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.tar").write_bytes(b"")
    with pytest.raises(DataError, match="not written by ctray"):
        make_dataset("digits", str(foreign), None, None, None, shard_size=500, seed=0)


@pytest.mark.parametrize("source", ["cifar10", "gtsrb"])
def test_torchvision_sources_guarded(source, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="needs --download"):
        make_dataset(source, str(tmp_path), None, None, None, shard_size=10, seed=0)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails like a CPU-only install
    with pytest.raises(DataError, match=r"ctray\[vision\].*constraints-gpu.txt"):
        make_dataset(source, str(tmp_path), None, None, None, shard_size=10, seed=0, download=True)


def make_tree(root) -> None:
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(["cat", "dog", "emu"]):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            arr[..., ci] = 255
            Image.fromarray(arr).save(root / cls / f"img{i:02d}.png")
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / "dog" / "grey.jpg")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_folder_copy_and_resize(tmp_path):
    root = tmp_path / "tree"
    make_tree(root)
    d = str(tmp_path / "out")
    man = make_dataset("folder", d, None, None, None, shard_size=10, seed=0, root=str(root))
    assert man["classes"] == ["cat", "dog", "emu"] and man["image_shape"] == [16, 16, 3]
    assert man["counts"] == {"train": 25, "clean": 3, "test": 3}  # 31 images, 10% clean, 10% test
    names = [n for s in ("train", "clean", "test") for sh in man["shards"][s] for n in members(os.path.join(d, sh))]
    assert sum(n.endswith(".jpg") for n in names) == 1  # the original bytes, copied as-is
    recs = [r for s in ("train", "clean", "test") for r in load_split(d, s, man)]
    assert len(recs) == 31 and {r.label for r in recs} == {0, 1, 2}
    grey = [r for r in recs if json.loads(r.meta)["path"] == os.path.join("dog", "grey.jpg")]
    assert len(grey) == 1 and grey[0].label == 1 and grey[0].image.shape == (16, 16, 3)
    src = np.asarray(Image.open(root / "cat" / "img03.png"))
    cat3 = [r for r in recs if json.loads(r.meta)["path"] == os.path.join("cat", "img03.png")][0]
    np.testing.assert_array_equal(cat3.image, src)

    d2 = str(tmp_path / "out12")
    man2 = make_dataset("folder", d2, 20, 5, 6, shard_size=100, seed=1, root=str(root), image_size=12)
    assert man2["image_shape"] == [12, 12, 3] and man2["counts"] == {"train": 20, "clean": 5, "test": 6}
    recs2 = load_split(d2, "train", man2)
    assert all(r.image.shape == (12, 12, 3) for r in recs2)
    assert all(n.endswith((".png", ".cls", ".json")) for n in members(os.path.join(d2, "train-000000.tar")))


def test_folder_errors(tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class directories"):
        make_dataset("folder", out, None, None, None, shard_size=10, seed=0, root=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="needs root"):
        make_dataset("folder", out, None, None, None, shard_size=10, seed=0)
    root = tmp_path / "tree"
    make_tree(root)
    (root / "fox").mkdir()
    with pytest.raises(DataError, match="fox holds no image"):
        make_dataset("folder", out, None, None, None, shard_size=10, seed=0, root=str(root))
    (root / "fox" / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"unreadable image .*fox/bad.png"):
        make_dataset("folder", out, None, None, None, shard_size=10, seed=0, root=str(root))


# ---------------------------------------------------------------------------------------------------
# fashion-mnist: the real Debian files


needs_fmnist = pytest.mark.skipif(not os.path.exists(FMNIST), reason="dataset-fashion-mnist not installed")


@needs_fmnist
def test_fashion_mnist(tmp_path):
    d = str(tmp_path / "fm")
    man = make_dataset("fashion-mnist", d, n_train=2000, n_clean=500, n_test=500, shard_size=500, seed=0)
    assert man["counts"] == {"train": 2000, "clean": 500, "test": 500}
    assert [len(man["shards"][s]) for s in ("train", "clean", "test")] == [4, 1, 1]
    assert man["image_shape"] == [28, 28, 1] and man["classes"][9] == "Ankle boot"
    recs = {s: load_split(d, s, man) for s in ("train", "clean", "test")}
    clean, test = {r.key for r in recs["clean"]}, {r.key for r in recs["test"]}
    assert len(clean) == 500 and len(test) == 500 and not clean & test
    assert all(k.startswith("te") for k in clean | test)
    assert all(r.key.startswith("tr") for r in recs["train"])
    labels = np.array([r.label for s in recs for r in recs[s]])
    assert labels.min() == 0 and labels.max() == 9
    with pytest.raises(DataError, match="10000 images of the fashion-mnist test split"):
        make_dataset("fashion-mnist", d, 10, 9000, 2000, shard_size=500, seed=0)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        make_dataset("fashion-mnist", str(tmp_path / "o"), 10, 10, 10, shard_size=10, seed=0,
                     root=str(tmp_path))


@needs_fmnist
def test_cli_data_and_poison(tmp_path, capsys):
    from ctray.cli import main

    d, e = str(tmp_path / "fm"), str(tmp_path / "fm-badnet")
    assert main(["data", "fashion-mnist", "--out", d, "--n-train", "2000", "--n-clean", "500",
                 "--n-test", "500", "--shard-size", "500"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["train"] == 2000
    assert main(["data", "poison", "--in", d, "--out", e, "--attack", "badnet", "--rate", "0.01"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_poison"] == 20
    truth = pq.read_table(os.path.join(e, "truth.parquet"))
    assert truth.num_rows == 2000 and sum(truth.column("poison").to_pylist()) == 20
    assert main(["data", "poison", "--in", d, "--out", e, "--attack", "blend", "alpha=0.3"]) == 0
    assert json.load(open(os.path.join(e, "manifest.json")))["attack"]["options"] == {"alpha": 0.3}
    capsys.readouterr()
    assert main(["data", "poison", "--in", d, "--out", e, "--attack", "nope"]) == 2
    assert "known: badnet" in capsys.readouterr().err


def test_train_slices_are_disjoint_and_share_the_reserve(tmp_path):
    """--train-slice K: block K of the seed's order of the train pool; slice 0 is the default split, slices
    of one seed never share a train sample and keep the same clean and test splits."""
    d0, d1, d = (str(tmp_path / n) for n in ("s0", "s1", "default"))
    m0 = make_dataset("digits", d0, 500, None, None, shard_size=500, seed=3, train_slice=0)
    m1 = make_dataset("digits", d1, 500, None, None, shard_size=500, seed=3, train_slice=1)
    make_dataset("digits", d, 500, None, None, shard_size=500, seed=3)
    assert m0["train_slice"] == 0 and m1["train_slice"] == 1 and m1["counts"]["train"] == 500
    keys = [{r.key for r in load_split(x, "train", m)} for x, m in ((d0, m0), (d1, m1))]
    assert len(keys[0]) == len(keys[1]) == 500 and not keys[0] & keys[1]
    clean = [{r.key for r in load_split(x, "clean", m)} for x, m in ((d0, m0), (d1, m1))]
    assert clean[0] == clean[1]
    assert open(f"{d0}/train-000000.tar", "rb").read() == open(f"{d}/train-000000.tar", "rb").read()
    # 1797 digits, 600 of them clean + test: slices 0 and 1 of 500 fit, slice 2 does not
    with pytest.raises(DataError, match=r"train slice 2 of 500 samples needs 2100 images; the pool of digits has 1797 \(slices 0..1 fit\)"):
        make_dataset("digits", str(tmp_path / "s2"), 500, None, None, shard_size=500, seed=3, train_slice=2)
    with pytest.raises(DataError, match="train_slice must be >= 0"):
        make_dataset("digits", str(tmp_path / "neg"), 500, None, None, shard_size=500, seed=3, train_slice=-1)


@needs_fmnist
def test_fashion_mnist_train_slices_are_disjoint(tmp_path):
    from ctray.cli import main

    m = []
    for k in (0, 1):
        out = str(tmp_path / f"s{k}")
        assert main(["-q", "data", "fashion-mnist", "--out", out, "--n-train", "300", "--n-clean", "50",
                     "--n-test", "50", "--shard-size", "300", "--seed", "7", "--train-slice", str(k)]) == 0
        m.append((out, read_manifest(expand_shards(out))))
    keys = [{r.key for r in load_split(out, "train", man)} for out, man in m]
    assert len(keys[0]) == len(keys[1]) == 300 and not keys[0] & keys[1]
