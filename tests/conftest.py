"""Shared fixtures: one session-scoped local Ray (real, not mocked) and tiny real data."""

from __future__ import annotations

import os

import pytest

# Before Ray is imported anywhere: no auth token file, fast Train health checks (ray-notes §4).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
TEST_ACCEL = "ctray_test_accel"  # the session node's fake accelerator resource


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole session. 4 logical CPUs on 2 cores so Train workers and Ray Data
    cannot starve each other (the 2-CPU deadlock of ray-notes §5.1); never attaches to a running
    `ray start` cluster (address="local"). The node also declares a custom resource shaped like an
    accelerator (``ctray_test_accel``), so a test can place a Train worker the way a GPU node hosts one
    without a GPU (tests/test_placement.py)."""
    import ray

    from ctray.memory import worker_pool_for_children

    worker_pool_for_children()  # as ensure_ray does: Ray's processes on jemalloc (ctray.memory)
    ray.init(address="local", num_cpus=4, object_store_memory=512 * 2**20, log_to_driver=False,
             include_dashboard=False, resources={TEST_ACCEL: 1})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fmnist_available() -> bool:
    return os.path.exists(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz"))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on a free 127.0.0.1 port for the whole session;
    see tests/s3server.py for why moto. Yields an :class:`s3server.S3Server` (endpoint, env, boto3 helpers)."""
    from s3server import serve

    yield from serve()


# The detection tests' shared data (tests/test_detect.py, tests/test_streaming.py): 4,000 Fashion-MNIST
# train samples with 2% badnet (why 2%: test_detect.py's docstring).
FM_N_TRAIN = 4000
FM_RATE = 0.02


def fm_dataset(tmp_path_factory, available: bool, name: str, n_train: int, n_clean: int, n_test: int,
               shard_size: int) -> str:
    """Real Fashion-MNIST shards in a fresh temp directory (skips when the Debian data package is absent)."""
    if not available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed (make install installs it as root)")
    from ctray.data.sources import make_dataset

    d = str(tmp_path_factory.mktemp(name) / "fm")
    make_dataset("fashion-mnist", d, n_train=n_train, n_clean=n_clean, n_test=n_test, shard_size=shard_size, seed=0)
    return d


@pytest.fixture(scope="session")
def fm_base(tmp_path_factory, fmnist_available):
    return fm_dataset(tmp_path_factory, fmnist_available, "fm", FM_N_TRAIN, 500, 200, 1000)


def _poisoned(base: str, tmp_path_factory, attack: str) -> str:
    from ctray.data.poison import poison_dataset

    d = str(tmp_path_factory.mktemp(attack) / attack)
    # 60% of the poison in one shard: the detection test also checks that shards.parquet ranks it first
    poison_dataset(base, d, attack, rate=FM_RATE, target=0, seed=0, options={}, concentrate=0.6)
    return d


@pytest.fixture(scope="session")
def fm_badnet(fm_base, tmp_path_factory):
    return _poisoned(fm_base, tmp_path_factory, "badnet")
