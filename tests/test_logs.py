"""Logs a person reads: Ray Data's per-pass "Starting execution" lines are off by default, back with -v."""

from __future__ import annotations

import logging

import pytest

from ctray.cli import _setup_logging
from ctray.engine.cluster import ensure_ray


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("verbose", [1, 2])
def test_ray_data_execution_lines_only_when_verbose(verbose, capfd, caplog, monkeypatch):
    import ray.data

    monkeypatch.delenv("CTRAY_RAY_LOGS", raising=False)
    _setup_logging(verbose)  # what `ctray detect` (verbose=1) and `ctray -v detect` (verbose=2) set up
    ensure_ray()
    with caplog.at_level(logging.INFO, logger="ray.data"):
        assert ray.data.range(8).map_batches(lambda b: b, num_cpus=0.1).count() == 8
    seen = "Starting execution of Dataset" in caplog.text + capfd.readouterr().err
    assert seen == (verbose > 1)
    monkeypatch.setenv("CTRAY_RAY_LOGS", "0")
    ensure_ray()  # leave the session's default as a plain run has it
