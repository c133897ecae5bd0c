"""`ray job submit` end to end: a local head (`ray start --head`, job server on 127.0.0.1), `ctray detect` submitted
through cluster/submit.sh (the repository uploaded as working_dir with cluster/runtime_env.yaml, which
excludes .venv/ and data), then the run directory checked.

Isolation on a machine that other Ray users share: the head gets free ports and a temp dir of its own
(so its address file is not /tmp/ray/ray_current_cluster, which a bare ``ray.init()`` elsewhere would
attach to), and it runs as ``ray start --block`` in its own process group. It is stopped by signalling
that process (its SIGTERM handler stops every process of the node) and then the group, never with
``ray stop``, which would kill every Ray process on the machine, other users' included. (Ray binds its
node services to this machine's own interface address whatever --node-ip-address says: it maps
127.0.0.1 to it; the job server listens on 127.0.0.1.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(900)]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
N_TRAIN = 400
TINY = ["ct.rounds=2", "ct.pretrain_epochs=[1,1]", "ct.iters=[20,20]", "ct.lr=[0.04,0.04]", "ct.lam=[20,15]",
        "ct.batch_factor=[2,2]", "ct.keep_ratio=[0.5]", "ct.floor_k=[50]", "base.epochs=1", "base.milestones=[1]"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != "RAY_API_SERVER_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop the node started by ``head`` (ray start --block): SIGTERM to it (its handler stops the node's
    processes), then SIGKILL to its process group, then to any process left whose command line names
    this head's own temp dir (Ray workers detach from the group). Nothing else is touched."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if temp_dir.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def test_job_submit_detect_on_local_head(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from ctray.data.sources import make_dataset

    data = tmp_path / "fm"
    make_dataset("fashion-mnist", str(data), n_train=N_TRAIN, n_clean=100, n_test=50, shard_size=100, seed=0)
    out = tmp_path / "run"
    gcs, dash, agent, client = (_free_port() for _ in range(4))
    temp_dir = tempfile.mkdtemp(prefix="ctj", dir="/tmp")  # short: Ray's Unix socket paths have a length limit
    env = _env()
    head_log = open(tmp_path / "head.log", "w")
    t0 = time.monotonic()
    head = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=env, cwd=str(tmp_path), stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:  # the job server answers once the dashboard is up
            assert head.poll() is None, open(tmp_path / "head.log").read()[-3000:]
            try:
                json.load(urllib.request.urlopen(f"{address}/api/version", timeout=2))
                break
            except OSError:
                assert time.time() < deadline, "the head's job server did not come up in 120 s"
                time.sleep(0.5)
        t_up = time.monotonic() - t0
        deadline = time.time() + 120
        t1 = time.monotonic()
        while True:  # the node's job agent registers a few seconds after the dashboard answers
            job = subprocess.run(
                ["bash", os.path.join(REPO, "cluster", "submit.sh"), "--address", address, "detect",
                 "--train", f"{data}/train-{{000000..000003}}.tar", "--clean", f"{data}/clean-*.tar", "--out",
                 str(out), "--preset", "smoke", *TINY, "scale.num_workers=1"],
                env=env, capture_output=True, text=True, timeout=700)
            if "No available agent to submit job" not in job.stderr or time.time() > deadline:
                break
            time.sleep(2)
            t1 = time.monotonic()
        t_job = time.monotonic() - t1
        (tmp_path / "job.log").write_text(job.stdout + job.stderr)
        assert job.returncode == 0, (job.stdout[-4000:], job.stderr[-2000:])
        assert "succeeded" in job.stdout
        assert f"read {N_TRAIN} samples: {N_TRAIN} usable" in job.stdout  # the CLI's summary, streamed back

        scores = pq.read_table(out / "scores.parquet").to_pandas()
        assert len(scores) == N_TRAIN and not scores.duplicated(["shard", "key"]).any()
        for f in ("report.html", "state.json", "run.json", "decisions.json", "checkpoints/round_1/confused.pt"):
            assert (out / f).exists(), f
        assert json.loads((out / "state.json").read_text())["rounds"][1]["info"]["round"] == 1
        # a real Ray Train worker ran on the head: Ray Train's storage is under the run directory
        assert any((out / "train" / "round-0").glob("checkpoint_*/confused.pt"))
        # the uploaded working_dir excluded the venv and data (runtime_env.yaml)
        pkgs = [os.path.join(root, d) for root, dirs, _ in os.walk(os.path.join(temp_dir, "session_latest",
                "runtime_resources")) for d in dirs]
        assert any(p.endswith("/ctray") for p in pkgs), pkgs[:20]
        assert not any(p.endswith(("/.venv", "/.git")) for p in pkgs)
        # the same through examples/cluster_job.py (JobSubmissionClient): quickstart.py on the head
        ex = subprocess.run([sys.executable, os.path.join(REPO, "examples", "cluster_job.py"), "--address", address,
                             str(data), str(tmp_path / "ex"), "--preset", "smoke", *TINY, "scale.num_workers=0"],
                            env=env, capture_output=True, text=True, timeout=700)
        assert ex.returncode == 0, (ex.stdout[-4000:], ex.stderr[-2000:])
        assert "succeeded" in ex.stdout and "samples flagged" in ex.stdout
        assert json.loads((tmp_path / "ex" / "cleansed" / "manifest.json").read_text())["counts"]["read"] == N_TRAIN
        print(f"head up {t_up:.1f}s; job submit -> succeeded {t_job:.1f}s")
    finally:
        _stop_head(head, temp_dir)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
