"""The Python API as a user meets it: the README's example block and every script in examples/, run on
tiny real data through the session's real Ray."""

from __future__ import annotations

import json
import os
import pathlib
import re
import runpy
import sys

import pytest

import ctray

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONE_SHARD = {"ct__rounds": 2, "ct__keep_ratio": [0.5, 1.0], "ct__floor_k": [50, 100], "ct__lam": [20, 20]}


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its API example block"
    return m.group(1)


@pytest.mark.usefixtures("ray_session")
def test_readme_api_example_runs_as_written(fm_badnet, tmp_path, monkeypatch, capsys):
    """The block with only its paths pointed at the test data (and the run kept short)."""
    code = _readme_block()
    assert len(code.strip().splitlines()) <= 8
    code = (code.replace("data/fm-badnet", fm_badnet).replace("runs/api", str(tmp_path / "api"))
            .replace("data/fm-cleansed", str(tmp_path / "cleansed"))
            .replace('preset="smoke")', 'preset="smoke", scale__num_workers=0, io__train=[f"' + fm_badnet
                     + '/train-000000.tar"])'))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "flagged in classes" in out
    res = ctray.open_run(str(tmp_path / "api"))
    assert res.n_read == 1000 and res.n_usable + res.n_quarantined == res.n_read
    counts = json.loads((tmp_path / "cleansed" / "manifest.json").read_text())["counts"]
    assert counts["written"] == counts["kept"] == res.n_usable - res.n_flagged and counts["read"] == 1000


@pytest.mark.usefixtures("ray_session")
def test_result_ladder_matches_the_run_directory(fm_badnet, tmp_path):
    res = ctray.detect(f"{fm_badnet}/train-000000.tar", f"{fm_badnet}/clean-*.tar", tmp_path / "run", preset="smoke",
                       truth=f"{fm_badnet}/truth.parquet", scale__num_workers=0, overrides={"ct.rounds": 2},
                       **{k: v for k, v in ONE_SHARD.items() if k != "ct__rounds"})
    again = ctray.open_run(res.run_dir)
    assert again.flagged_keys == res.flagged_keys and again.cleansed_classes == res.cleansed_classes
    assert again.n_read == res.n_read == 1000
    df = res.scores()
    assert len(df) == res.n_usable and int(df["flagged"].sum()) == res.n_flagged
    ranked = res.ranked(10)
    assert [s for _, _, s in ranked] == sorted(df["score"], reverse=True)[:10]
    keys = list(zip(df["shard"], df["key"], strict=True))
    assert res.mask(keys).tolist() == df["flagged"].tolist()
    assert {c["class"] for c in res.decision()["classes"] if c["cleansed"]} == set(res.cleansed_classes)
    assert int(res.shards()["samples"].sum()) == 1000


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(script, fm_badnet, tmp_path, monkeypatch, capsys):
    """Every example script with its documented arguments on tiny data (a one-shard train set)."""
    data = tmp_path / "data"
    data.mkdir()
    for p in pathlib.Path(fm_badnet).iterdir():
        if p.name != "train-000001.tar" and not re.match(r"train-00000[23]\.tar", p.name):
            os.symlink(p, data / p.name)
    monkeypatch.setattr(sys, "argv", [script, str(data), str(tmp_path / "out"), "--preset", "smoke"])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    assert "flagged" in capsys.readouterr().out
