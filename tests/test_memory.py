"""ctray.memory: the Arrow allocator of the driver and of the processes it starts (no Ray needed)."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import os, subprocess, sys
import ctray, pyarrow as pa
from ctray.memory import release_free_memory, use_system_arrow_pool, worker_pool_for_children
driver = pa.default_memory_pool().backend_name
ok = use_system_arrow_pool()
worker_pool_for_children()  # what ensure_ray does before a local ray.init
child = subprocess.run([sys.executable, "-c", "import pyarrow as pa; print(pa.default_memory_pool().backend_name)"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(driver, ok, child, pa.default_memory_pool().backend_name, release_free_memory())
"""


def _run(env_extra: dict[str, str]) -> list[str]:
    # a fresh interpreter: Arrow reads its pool once per process, when pyarrow loads
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"} | env_extra
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_driver_on_the_c_allocator_children_on_jemalloc_and_trim_runs() -> None:
    driver, ok, child, driver_after, trimmed = _run({})
    assert (driver, ok, child, driver_after) == ("system", "True", "jemalloc", "system")
    assert trimmed == ("True" if sys.platform.startswith("linux") else "False")


def test_a_users_pool_choice_is_kept_everywhere() -> None:
    driver, ok, child, driver_after, _ = _run({"ARROW_DEFAULT_MEMORY_POOL": "mimalloc"})
    assert (driver, ok, child, driver_after) == ("mimalloc", "False", "mimalloc", "mimalloc")
