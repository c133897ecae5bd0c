"""The Python API as a user meets it: the README's example block and every script in examples/, run on
tiny real data (one 1,000-sample shard, a minimal schedule: this checks the surface, not detection)
through the session's real Ray."""

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
QUICK = {"scale.num_workers": 0, "ct.iters": [10] * 6, "ct.pretrain_epochs": [1] * 6, "base.epochs": 1,
         "base.milestones": [1]}


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its API example block"
    return m.group(1)


@pytest.fixture(scope="module")
def readme_run(ray_session, fm_badnet, tmp_path_factory):
    """The README block run as written, with only its paths pointed at the test data (one shard) and the
    schedule shortened through the same keyword form a user writes."""
    tmp = tmp_path_factory.mktemp("api")
    code = _readme_block()
    assert len(code.strip().splitlines()) <= 8
    quick = ", ".join(f"{k.replace('.', '__')}={v!r}" for k, v in QUICK.items())
    code = (code.replace("data/fm-badnet/train-*.tar", f"{fm_badnet}/train-000000.tar")
            .replace("data/fm-badnet", fm_badnet).replace("runs/api", str(tmp / "api"))
            .replace("data/fm-cleansed", str(tmp / "cleansed"))
            .replace('preset="smoke")', f'preset="smoke", {quick})'))
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})
    return tmp, buf.getvalue()


def test_readme_api_example_runs_as_written(readme_run):
    tmp, out = readme_run
    assert "flagged in classes" in out
    res = ctray.open_run(str(tmp / "api"))
    assert res.n_read == 1000 and res.n_usable + res.n_quarantined == res.n_read
    counts = json.loads((tmp / "cleansed" / "manifest.json").read_text())["counts"]
    assert counts["written"] == counts["kept"] == res.n_usable - res.n_flagged and counts["read"] == 1000


def test_result_ladder_matches_the_run_directory(readme_run):
    tmp, _ = readme_run
    res = ctray.open_run(str(tmp / "api"))
    df = res.scores()
    assert len(df) == res.n_usable and int(df["flagged"].sum()) == res.n_flagged
    assert sorted(res.flagged_keys) == sorted(zip(df["shard"][df["flagged"]], df["key"][df["flagged"]], strict=True))
    ranked = res.ranked(10)
    assert [s for _, _, s in ranked] == sorted(df["score"], reverse=True)[:10]
    keys = list(zip(df["shard"], df["key"], strict=True))
    assert res.mask(keys).tolist() == df["flagged"].tolist()
    assert {c["class"] for c in res.decision()["classes"] if c["cleansed"]} == set(res.cleansed_classes)
    assert int(res.shards()["samples"].sum()) == 1000


# Every example with its documented arguments (plus the short schedule), run in this process through the
# session's Ray, and what its output must say. s3_shards.py runs against the loopback S3 server in
# tests/test_s3.py (its Ray workers need the endpoint in their environment, so it runs as a child process);
# cluster_job.py's submission is checked here (--dry-run) and sent to a real job server in
# tests/test_job_submit.py (make test-all: it starts its own head).
IN_PROCESS = {
    "quickstart.py": ([], r"\d+ of \d+ samples flagged.*wrote \d+ samples"),
    "sweep.py": (["--trials", "1", "--detect", "sweep.baseline=false"],
                 r"recommended config: .*best\.yaml.*detect with it: \d+ of \d+ samples flagged"),
    "audit_repair.py": (["repair.steps=20", "audit.steps_per_class=3", "audit.classes=[0,1]"],
                        r"suspect +clean accuracy 0\.\d+.*audit: score .*repaired +clean accuracy"),
}
ELSEWHERE = {"s3_shards.py": "tests/test_s3.py", "cluster_job.py": "here (--dry-run) and tests/test_job_submit.py"}


def test_every_example_is_run_by_a_test_and_listed():
    scripts = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert scripts == set(IN_PROCESS) | set(ELSEWHERE)
    listing = (ROOT / "examples" / "README.md").read_text()
    for s in scripts:
        assert f"({s})" in listing, f"examples/README.md does not list {s}"
        head = (ROOT / "examples" / s).read_text().split('"""')[1]
        assert f"python examples/{s}" in head, f"{s} lost its command at the top"


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("script", sorted(IN_PROCESS))
def test_examples_run(script, fm_badnet, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for p in pathlib.Path(fm_badnet).iterdir():
        if not re.match(r"train-00000[123]\.tar", p.name):
            os.symlink(p, data / p.name)
    quick = [f"{k}={json.dumps(v)}" for k, v in QUICK.items()]
    extra, expect = IN_PROCESS[script]
    monkeypatch.setattr(sys, "argv", [script, str(data), str(tmp_path / "out"), "--preset", "smoke", *quick, *extra])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(expect, out, re.S), out[-3000:]


def test_cluster_job_submission_dry_run(capsys, monkeypatch):
    """The job the example would send: quickstart.py on the cluster with the words quoted for the head's
    shell, and cluster/runtime_env.yaml's upload rules with the repository as working_dir."""
    mod = runpy.run_path(str(ROOT / "examples" / "cluster_job.py"))
    job = mod["submission"]("s3://b/data dir", "s3://b/runs/x", "small", ["ct.lam=[20,20,20,30,30,15]"])
    assert job["entrypoint"] == ("python examples/quickstart.py 's3://b/data dir' s3://b/runs/x --preset small "
                                 "'ct.lam=[20,20,20,30,30,15]'")
    env = job["runtime_env"]
    assert env["working_dir"] == str(ROOT) and ".venv/" in env["excludes"] and "data/" in env["excludes"]
    monkeypatch.setattr(sys, "argv", ["cluster_job.py", "--dry-run", "--address", "http://head:8265", "d", "o"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "examples" / "cluster_job.py"), run_name="__main__")
    assert e.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["address"] == "http://head:8265" and printed["entrypoint"] == "python examples/quickstart.py d o"
