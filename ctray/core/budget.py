"""Memory budgets: what may be held in memory in proportion to N, and what must stream.

Pure Python. A budget is a byte count the user can see and set (``data.cache_bytes``,
``data.worker_cache_bytes``): a set that fits is held (the fast in-memory path), one that does not
streams from the shards on every pass.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

#: Bytes per sample besides the pixels in a decoded block (sid, label, shard/key/source strings, Arrow
#: offsets and validity): a generous round figure, so the estimate errs towards streaming.
ROW_OVERHEAD = 256


def parse_bytes(value: str | int | float) -> int | None:
    """``"auto"`` -> None; ``"0"`` / ``0`` -> 0 (never cache); ``"512MB"``, ``"2GiB"``, ``1e9`` -> bytes.

    Raises:
        ValueError: anything else (the message shows the accepted forms).
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a byte budget must be >= 0, got {value}")
        return int(value)
    text = str(value).strip().lower()
    if text == "auto":
        return None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"a byte budget is 'auto', a number of bytes or a size such as 512MB / 2GiB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def decoded_bytes(n: int, image_shape: tuple[int, ...], extra_per_row: int = 0) -> int:
    """Estimated bytes of ``n`` decoded samples of ``image_shape`` (uint8) in Arrow blocks, plus
    ``extra_per_row`` (e.g. features: ``4 * D``)."""
    px = 1
    for d in image_shape:
        px *= int(d)
    return int(n) * (px + ROW_OVERHEAD + int(extra_per_row))


def fits(n: int, image_shape: tuple[int, ...], budget: int, extra_per_row: int = 0) -> bool:
    """Whether ``n`` decoded samples (:func:`decoded_bytes`) fit in ``budget`` bytes."""
    return decoded_bytes(n, image_shape, extra_per_row) <= budget
