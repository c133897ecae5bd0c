"""Process memory hygiene for long streaming runs: what a process keeps resident after it freed memory.

A detection run streams N samples through every process (the driver's identity and scoring passes, the
read tasks, the training workers), batch after batch. Measured on the scale benchmark's data
(docs/scale.md), Arrow's allocator decided how much freed memory stayed resident:

* **mimalloc** (pyarrow 26's default) kept freed pages in proportion to the rows streamed: the report's
  pass over a 500,000-row ``scores.parquet`` left 60 MB more resident than over 50,000 rows, with the
  same few MB live; it is also the fastest on the data path (a read + map pass over 50,000 64 px images:
  8.7 s).
* **system** (the C library's malloc) kept 4 MB more, but the same pass took 10.5 s (+20%): every large
  buffer is a fresh mapping.
* **jemalloc** gives freed pages back after a short decay (the report's extra memory at 500k was gone
  after the pass, 15 MB at its peak) and the pass took 9.4 s.

So the driver, which lives for the whole run and whose data path is light (scalar columns, the report),
runs on ``system``, and the processes that move the images (Ray Data tasks, Ray Train workers) on
``jemalloc``. Arrow reads its C++ default pool from ``ARROW_DEFAULT_MEMORY_POOL`` once, when pyarrow
loads (``pa.set_memory_pool`` reaches only pyarrow's own Python calls, not the Parquet reader or Ray
Data: measured, it left the growth as it was). Hence:

* ``import ctray`` sets the variable to :data:`DRIVER_POOL` unless it is set (:func:`choose_driver_pool`;
  effective when pyarrow was not loaded before ctray);
* before ctray starts a local Ray it sets :data:`WORKER_POOL` for the processes Ray starts
  (:func:`worker_pool_for_children`); a cluster started elsewhere carries it in its environment
  (``cluster/runtime_env.yaml``, the RayJob, the Dockerfile);
* phase boundaries call :func:`release_free_memory` (glibc returns freed chunks below the top of a heap
  only on ``malloc_trim``).

A user who sets ``ARROW_DEFAULT_MEMORY_POOL`` keeps their choice everywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: The environment variable Arrow reads its default memory pool from (``system``, ``jemalloc``, ``mimalloc``).
POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
DRIVER_POOL = "system"
WORKER_POOL = "jemalloc"

_CHOSEN = False  # ctray (not the user) chose this process's pool
_LIBC: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: no malloc_trim here


def choose_driver_pool() -> None:
    """``ARROW_DEFAULT_MEMORY_POOL`` = :data:`DRIVER_POOL` for this process (when pyarrow is not loaded
    yet), unless the variable is set."""
    global _CHOSEN
    if POOL_ENV not in os.environ:
        os.environ[POOL_ENV] = DRIVER_POOL
        _CHOSEN = True


def worker_pool_for_children() -> None:
    """Before starting a local Ray: the processes it starts load Arrow with :data:`WORKER_POOL`, unless
    the user chose a pool (this process keeps the pool it loaded)."""
    if _CHOSEN:
        os.environ[POOL_ENV] = WORKER_POOL


def worker_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a process that starts Ray workers (``ray start``): :data:`WORKER_POOL` unless the
    user chose a pool."""
    return {**env, POOL_ENV: WORKER_POOL} if _CHOSEN else dict(env)


def use_system_arrow_pool() -> bool:
    """pyarrow's own allocations (not the C++ default) on the C library's allocator, in a driver that
    loaded pyarrow before ctray could choose (once; idempotent).

    Returns:
        True when set now or before; False when the user chose another pool, or pyarrow refused.
    """
    if POOL_ENV in os.environ and not _CHOSEN:
        return False
    import pyarrow as pa

    if pa.default_memory_pool().backend_name == DRIVER_POOL:
        return True
    try:
        pa.set_memory_pool(pa.system_memory_pool())
    except Exception as e:  # noqa: BLE001 - a build without it keeps its default pool
        log.debug("Arrow's system memory pool not set: %s", e)
        return False
    return True


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``); a no-op without glibc.

    Returns:
        True when ``malloc_trim`` ran.
    """
    global _LIBC
    if _LIBC is False:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _LIBC = lib if lib is not None and hasattr(lib, "malloc_trim") else None
        except OSError:
            _LIBC = None
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)  # type: ignore[union-attr]
    return True
