"""What a detection run leaves behind: the run directory's file names and :class:`DetectResult`.

A result is a ladder, from the answer to the evidence (each rung reads the run directory when asked, so
a result costs nothing until it is used and works on a run directory opened later with
:func:`open_run`):

* ``result.flagged_keys``: the flagged samples' ``(shard, key)``; ``result.mask(keys)`` as booleans;
* ``result.ranked(n)``: ``(shard, key, score)`` most suspicious first;
* ``result.scores()``: the per-sample table (``scores.parquet``) as pandas;
* ``result.shards()`` / ``result.sources()``: the per-shard / per-source tables;
* ``result.decision()``: the per-class decision (``decisions.json``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctray import io as cio
from ctray.errors import DataError

#: The run directory's files (a run is resumable from ``STATE`` until ``RUN`` is written, last).
SCORES = "scores.parquet"
QUARANTINE = "quarantine.parquet"
SHARDS = "shards.parquet"
SOURCES = "sources.parquet"
DECISIONS = "decisions.json"
ROUNDS = "rounds.json"
METRICS = "metrics.json"
CANARY = "canary.json"
CONFIG = "config.yaml"
RUN = "run.json"
STATE = "state.json"
REPORT = "report.html"


@dataclass
class DetectResult:
    """What a detection run produced.

    Attributes:
        run_dir: the run directory (local path or URI).
        n_read, n_usable, n_quarantined, n_flagged: sample counts (``n_read = n_usable + n_quarantined``).
        flagged_keys: ``(shard, key)`` of every flagged sample.
        cleansed_classes: classes CT decided hold poison; weak_classes: those cleansed on weak evidence;
            vetoed_classes: weak evidence that earlier rounds did not corroborate (``decide.corroborate``):
            not cleansed.
        metrics: detection metrics against ground truth (None without ``io.truth``): ``ct`` (CT's own
            flags), with the cross-class detector on also ``xclass`` (its flags alone) and ``combined``
            (the run's decision, ``flagged``); :attr:`decision_metrics` is the decision's.
        seconds: wall time per phase; canary: the defender canaries' outcome (sweeps).
    """

    run_dir: str
    n_read: int
    n_usable: int
    n_quarantined: int
    n_flagged: int
    flagged_keys: list[tuple[str, str]]
    cleansed_classes: list[int]
    metrics: dict[str, Any] | None
    seconds: dict[str, float] = field(default_factory=dict)
    canary: dict[str, Any] | None = None  # with canary.rate > 0: count, target, recall, outside flag rate
    # the cross-class detector's test (decisions.json "xclass"; ctray.core.xclass.XClassDecision), None when off
    xclass: dict[str, Any] | None = None
    weak_classes: list[int] = field(default_factory=list)  # cleansed with LR < decide.weak_lr
    vetoed_classes: list[int] = field(default_factory=list)  # weak, not corroborated: not cleansed

    @property
    def decision_metrics(self) -> dict[str, Any] | None:
        """Metrics of the run's decision (``flagged``): CT and the cross-class detector together when it
        ran, else CT's; None without truth."""
        if not self.metrics:
            return None
        return self.metrics.get("combined") or self.metrics["ct"]

    def mask(self, keys: Iterable[tuple[str, str]]) -> np.ndarray:
        """bool (len(keys),): whether each ``(shard, key)`` was flagged (unknown keys: False)."""
        flagged = set(self.flagged_keys)
        return np.array([tuple(k) in flagged for k in keys], dtype=bool)

    def ranked(self, n: int | None = None) -> list[tuple[str, str, float]]:
        """``(shard, key, score)`` by ``score`` descending (higher = more suspicious), the first ``n``."""
        df = self.scores(columns=["shard", "key", "score"])
        df = df.sort_values(["score", "shard", "key"], ascending=[False, True, True], kind="stable")
        if n is not None:
            df = df.head(n)
        return [(str(s), str(k), float(v)) for s, k, v in df.itertuples(index=False, name=None)]

    def scores(self, columns: list[str] | None = None) -> Any:
        """The per-sample table (``scores.parquet``: one row per usable sample) as a pandas DataFrame."""
        return _table(self.run_dir, SCORES, columns).to_pandas()

    def shards(self) -> Any:
        """The per-shard table (``shards.parquet``), most suspicious first, as a pandas DataFrame."""
        return _table(self.run_dir, SHARDS).to_pandas()

    def sources(self) -> Any:
        """The per-source table (``sources.parquet``; empty when no sample names a source)."""
        return _table(self.run_dir, SOURCES).to_pandas()

    def quarantine(self) -> Any:
        """Every sample or shard that could not be used, with its reason (``quarantine.parquet``)."""
        return _table(self.run_dir, QUARANTINE).to_pandas()

    def decision(self) -> dict[str, Any]:
        """The per-class decision (``decisions.json``: likelihood ratios, thresholds, cleansed classes)."""
        return dict(cio.read_json(cio.join(self.run_dir, DECISIONS)))


def _table(run_dir: str, name: str, columns: list[str] | None = None) -> Any:
    path = cio.join(run_dir, name)
    if not cio.exists(path):
        raise DataError(f"{path} does not exist: is {run_dir} a finished ctray run directory?")
    t = cio.read_parquet(path)
    return t.select(columns) if columns else t


def open_run(run_dir: str) -> DetectResult:
    """The :class:`DetectResult` of a finished run directory (``run.json`` and the tables).

    Raises:
        DataError: no run.json (an unfinished run, or not a run directory).
    """
    run_json = cio.join(run_dir, RUN)
    if not cio.exists(run_json):
        raise DataError(f"{run_dir} has no {RUN}: the run is unfinished, or it is not a ctray run directory")
    run = cio.read_json(run_json)
    counts = run.get("counts", {})
    dec = cio.read_json(cio.join(run_dir, DECISIONS)) if cio.exists(cio.join(run_dir, DECISIONS)) else {}
    flagged = _table(run_dir, SCORES, ["shard", "key", "flagged"])
    fl = flagged.filter(flagged.column("flagged"))
    metrics = cio.read_json(cio.join(run_dir, METRICS)) if cio.exists(cio.join(run_dir, METRICS)) else None
    canary = cio.read_json(cio.join(run_dir, CANARY)) if cio.exists(cio.join(run_dir, CANARY)) else None
    return DetectResult(
        run_dir=run_dir, n_read=int(counts.get("read", 0)), n_usable=int(counts.get("usable", 0)),
        n_quarantined=int(counts.get("quarantined", 0)), n_flagged=fl.num_rows,
        flagged_keys=list(zip(fl.column("shard").to_pylist(), fl.column("key").to_pylist(), strict=True)),
        cleansed_classes=[int(c["class"]) for c in dec.get("classes", []) if c.get("cleansed")], metrics=metrics,
        seconds=dict(run.get("seconds", {})), canary=canary, xclass=dec.get("xclass"),
        weak_classes=[int(c["class"]) for c in dec.get("classes", []) if c.get("weak")],
        vetoed_classes=[int(c["class"]) for c in dec.get("classes", []) if c.get("vetoed")])
