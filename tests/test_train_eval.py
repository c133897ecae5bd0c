"""`ctray train` / `ctray evaluate` and the checkpoint format, on real Fashion-MNIST shards and real Ray.

A small CNN trained with the `smoke` recipe on 2,000 samples with 5% badnet learns the backdoor
(high ASR); retrained without the poison (the truth's rows excluded) it does not.
"""

from __future__ import annotations

import json

import pytest
import torch

from ctray.cli import main
from ctray.errors import DataError
from ctray.models.checkpoint import FORMAT, ModelSpec, load_model, read_checkpoint, save_model

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(900)]


def test_checkpoint_round_trip_and_bare_state(tmp_path):
    spec = ModelSpec("small-cnn", 1, 10, 28)
    m = spec.build()
    save_model(str(tmp_path / "m.pt"), m, spec, {"why": "test"})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # no code runs: plain containers only
    assert raw["format"] == FORMAT and raw["spec"]["arch"] == "small-cnn"
    m2, spec2, extra = load_model(str(tmp_path / "m.pt"))
    assert spec2 == spec and extra == {"why": "test"}
    x = torch.randn(3, 1, 28, 28)
    m.eval()
    assert torch.allclose(m(x), m2(x))
    torch.save(m.state_dict(), tmp_path / "bare.pt")
    assert read_checkpoint(str(tmp_path / "bare.pt"))["format"] is None
    with pytest.raises(DataError, match="bare state dict"):
        load_model(str(tmp_path / "bare.pt"))
    assert load_model(str(tmp_path / "bare.pt"), spec)[1] == spec
    with pytest.raises(DataError, match="do not fit"):
        load_model(str(tmp_path / "bare.pt"), ModelSpec("small-cnn", 3, 10, 28))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a torch checkpoint"):
        read_checkpoint(str(tmp_path / "junk.pt"))


@pytest.fixture(scope="module")
def badnet5(tmp_path_factory, fmnist_available):
    if not fmnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from ctray.data.poison import poison_dataset
    from ctray.data.sources import make_dataset

    root = tmp_path_factory.mktemp("te")
    make_dataset("fashion-mnist", str(root / "base"), n_train=2000, n_clean=200, n_test=500, shard_size=1000, seed=0)
    poison_dataset(str(root / "base"), str(root / "bad"), "badnet", rate=0.05, target=0, seed=0, options={})
    return str(root / "bad")


def test_train_then_evaluate_backdoored_and_retrained(badnet5, tmp_path, capsys):
    d = badnet5
    common = ["--preset", "smoke", "scale.num_workers=0", "base.epochs=12", "base.milestones=[9]"]
    assert main(["-q", "train", "--train", f"{d}/train-*.tar", "--out", str(tmp_path / "bd.pt"), *common]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_train"] == 2000 and info["n_excluded"] == 0
    ck = read_checkpoint(str(tmp_path / "bd.pt"))
    assert ck["spec"]["arch"] == "small-cnn" and ck["extra"]["n_train"] == 2000

    ev = ["evaluate", "--model", str(tmp_path / "bd.pt"), "--test", f"{d}/test-0*.tar",
          "--triggered", f"{d}/test-triggered-*.tar", "--json"]
    assert main(["-q", *ev]) == 0
    bd = json.loads(capsys.readouterr().out)
    assert bd["acc"] >= 0.65, bd
    assert bd["asr"] >= 0.9, bd

    assert main(["-q", "train", "--train", f"{d}/train-*.tar", "--out", str(tmp_path / "clean.pt"),
                 "--exclude", f"{d}/truth.parquet", *common]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_train"] == 1900 and info["n_excluded"] == 100
    ev[2] = str(tmp_path / "clean.pt")
    assert main(["-q", *ev]) == 0
    cl = json.loads(capsys.readouterr().out)
    assert cl["asr"] <= 0.1, cl
    assert cl["acc"] >= 0.65, cl


def test_evaluate_usage_errors(tmp_path, capsys):
    spec = ModelSpec("small-cnn", 1, 10, 28)
    save_model(str(tmp_path / "m.pt"), spec.build(), spec)
    assert main(["-q", "evaluate", "--model", str(tmp_path / "m.pt")]) == 2
    assert "--test and/or --triggered" in capsys.readouterr().err
    assert main(["-q", "evaluate", "--model", str(tmp_path / "none.pt"), "--test", str(tmp_path)]) == 2
    assert "cannot be read" in capsys.readouterr().err
