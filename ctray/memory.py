"""Process memory hygiene for long streaming runs: what a process keeps resident after it freed memory.

A detection run streams N samples through every process (the driver's identity and scoring passes, the
read tasks, the training workers), batch after batch. Two allocators kept freed memory resident in
proportion to the rows streamed, measured on the scale benchmark's data (docs/scale.md):

* **Arrow's default pool** (mimalloc in pyarrow 26) keeps per-thread pages that Arrow's reader threads
  freed: streaming a 500,000-row ``scores.parquet`` by batches left 60 MB more resident than 50,000 rows,
  with the same few MB live. The C library's allocator (``pa.system_memory_pool()``) gave most of it back.
* **glibc malloc** returns freed chunks below the top of its heaps only on ``malloc_trim``.

Arrow reads its C++ default pool from ``ARROW_DEFAULT_MEMORY_POOL`` once, when pyarrow is loaded
(``pa.set_memory_pool`` changes only the pool pyarrow's own Python calls use, not the Parquet reader's or
Ray Data's: measured, it left the growth as it was). So ``import ctray`` sets the variable to ``system``
unless it is set (:func:`default_to_system_pool`): it applies to this process when pyarrow was not loaded
before ctray, and to every process started from it (a local Ray's workers). A Ray cluster started
elsewhere needs it in its environment (docs/cluster.md). Processes that loaded pyarrow first still get
:func:`use_system_arrow_pool` for pyarrow's own allocations, and phase boundaries call
:func:`release_free_memory`. A user who sets ``ARROW_DEFAULT_MEMORY_POOL`` keeps their choice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: The environment variable Arrow reads its default memory pool from (``system``, ``jemalloc``, ``mimalloc``).
POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
_POOL_SET = False


def default_to_system_pool() -> None:
    """``ARROW_DEFAULT_MEMORY_POOL=system`` for this process (if pyarrow is not loaded yet) and every
    process it starts, unless the variable is set."""
    os.environ.setdefault(POOL_ENV, "system")
_LIBC: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: no malloc_trim here


def use_system_arrow_pool() -> bool:
    """Make the C library's allocator Arrow's default memory pool in this process (once; idempotent).

    Returns:
        True when this call or an earlier one set it; False when ``ARROW_DEFAULT_MEMORY_POOL`` names
        another pool (the user's choice is kept) or pyarrow refused.
    """
    global _POOL_SET
    if _POOL_SET:
        return True
    if os.environ.get(POOL_ENV, "system") != "system":
        return False
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.system_memory_pool())
    except Exception as e:  # noqa: BLE001 - a build without it keeps its default pool
        log.debug("Arrow's system memory pool not set: %s", e)
        return False
    _POOL_SET = True
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
