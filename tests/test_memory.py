"""ctray.memory: the allocator settings every streaming ctray process applies (no Ray needed)."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import ctray, pyarrow as pa
from ctray.memory import use_system_arrow_pool, release_free_memory
print(pa.default_memory_pool().backend_name, use_system_arrow_pool(), release_free_memory())
"""


def _run(env_extra: dict[str, str]) -> list[str]:
    # a fresh interpreter: Arrow reads its pool once per process, when pyarrow loads
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"} | env_extra
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_ctray_puts_arrow_on_the_system_allocator_and_trim_runs() -> None:
    backend, ok, trimmed = _run({})
    assert backend == "system" and ok == "True"
    assert trimmed == ("True" if sys.platform.startswith("linux") else "False")


def test_a_users_pool_choice_is_kept() -> None:
    backend, ok, _ = _run({"ARROW_DEFAULT_MEMORY_POOL": "jemalloc"})
    assert backend == "jemalloc" and ok == "False"
