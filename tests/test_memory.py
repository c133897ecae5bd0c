"""ctray.memory: the allocator settings every streaming ctray process applies (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import os, pyarrow as pa
from ctray.memory import use_system_arrow_pool, release_free_memory
before = pa.default_memory_pool().backend_name
ok = use_system_arrow_pool()
print(before, ok, pa.default_memory_pool().backend_name, use_system_arrow_pool(), release_free_memory())
"""


def _run(env_extra: dict[str, str]) -> list[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"} | env_extra
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_system_pool_is_set_once_and_trim_runs() -> None:
    # a fresh interpreter: the pool is process-wide, and this test must see pyarrow's own default first
    before, ok, after, again, trimmed = _run({})
    assert ok == "True" and after == "system" and again == "True"
    assert trimmed == ("True" if sys.platform.startswith("linux") else "False")


def test_a_users_pool_choice_is_kept() -> None:
    before, ok, after, again, _ = _run({"ARROW_DEFAULT_MEMORY_POOL": "jemalloc"})
    assert ok == "False" and again == "False"
    assert before == after == "jemalloc"
