"""Progress lines with rate and ETA for long phases (logging, never print)."""

from __future__ import annotations

import logging
import time


class Progress:
    """Log ``name: done/total (pct) rate/s ETA`` at most every ``every_s`` seconds, and once at the end."""

    def __init__(self, log: logging.Logger, name: str, total: int, unit: str = "steps", every_s: float = 10.0):
        self.log, self.name, self.total, self.unit, self.every_s = log, name, max(1, total), unit, every_s
        self.t0 = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self._emit(now)

    def close(self) -> float:
        now = time.monotonic()
        el = now - self.t0
        rate = self.done / el if el > 0 else float("inf")
        self.log.info("%s: done %d %s in %.1fs (%.0f %s/s)", self.name, self.done, self.unit, el, rate, self.unit)
        return el

    def _emit(self, now: float) -> None:
        el = now - self.t0
        rate = self.done / el if el > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        self.log.info("%s: %d/%d %s (%.0f%%) %.0f %s/s ETA %.0fs", self.name, self.done, self.total, self.unit,
                      100.0 * self.done / self.total, rate, self.unit, eta)
