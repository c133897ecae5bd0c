"""The run directory before any work: early, named errors (before Ray starts) and one live run at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ctray.engine import rundir
from ctray.engine.rundir import RunLock, prepare_run_dir
from ctray.errors import ConfigError


def test_out_that_is_a_file_or_unwritable_is_a_named_config_error(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match=f"--out {f} is an existing file"):
        prepare_run_dir(str(f))
    with pytest.raises(ConfigError, match=f"cannot create the run directory {f}/sub"):
        prepare_run_dir(str(f / "sub"))
    assert prepare_run_dir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
    if os.geteuid() != 0:  # root may write anywhere: the permission check cannot be shown as root
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="cannot (create|write) the run directory"):
            prepare_run_dir(str(ro / "run"))


def test_second_live_run_on_one_directory_is_refused_naming_the_holder(tmp_path):
    d = prepare_run_dir(str(tmp_path / "run"))
    with RunLock(d):
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on "):
            RunLock(d).__enter__()
    with RunLock(d):  # released on exit: the next run takes it
        pass


def test_a_crashed_holder_never_leaves_the_directory_stuck(tmp_path):
    d = prepare_run_dir(str(tmp_path / "run"))
    code = textwrap.dedent(f"""
        import time
        from ctray.engine.rundir import RunLock
        RunLock({d!r}).__enter__()
        print("locked", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {p.pid}"):
            RunLock(d).__enter__()
        p.send_signal(signal.SIGKILL)  # a crash: no cleanup code runs
        p.wait(timeout=10)
    finally:
        p.kill()
    with RunLock(d):  # the kernel dropped the dead process's lock
        pass


def test_remote_lock_heartbeat_and_takeover(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    s3_server.client().create_bucket(Bucket="locks")
    out = "s3://locks/run1"
    prepare_run_dir(out)
    with RunLock(out) as held:
        with pytest.raises(ConfigError, match="in use by another run .*heartbeat 0s ago"):
            RunLock(out).__enter__()
        assert held.token
    with RunLock(out):  # released (the lock object is deleted)
        pass
    # a run that died holding the lock: its heartbeat goes stale, the next run takes over with a warning
    stale = RunLock(out)
    stale.info["started"] = time.time() - 3600
    from ctray import io as cio

    cio.write_json(cio.join(out, rundir.REMOTE_LOCK), {**stale.info, "heartbeat": time.time() - rundir.STALE_S - 1})
    with RunLock(out):
        pass
