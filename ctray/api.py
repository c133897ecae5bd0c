"""The Python API: ``ctray.detect(train, clean, out)`` and friends, the CLI's jobs as functions.

Config fields are keyword arguments with ``__`` for the dot (``ct__rounds=2`` is ``ct.rounds=2``), or a
dict of dotted names in ``overrides``; ``preset=None`` chooses one from the data as the CLI does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ctray.engine.results import DetectResult


def _paths(x: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    if isinstance(x, str | os.PathLike):
        return [os.fspath(x)]
    return [os.fspath(p) for p in x]


def detect(train: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
           clean: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
           out: str | os.PathLike[str], *, preset: str | None = None, truth: str | os.PathLike[str] | None = None,
           config: str | None = None, overrides: dict[str, Any] | None = None, **fields: Any) -> DetectResult:
    """Find the poisoned samples of ``train`` with Confusion Training; write the run directory ``out``.

    Args:
        train: the suspect shards (a directory, glob, brace pattern, list; local or ``s3://``/``gs://``).
        clean: the small trusted reserve CT needs (specs/ct.md §1.2), same forms.
        out: the run directory (resumed when it holds an unfinished run of the same config).
        preset: a preset name (``ctray presets``); None chooses one from the data.
        truth: optional ground truth (``shard, key, poison``) for metrics.
        config: optional YAML config file.
        overrides / fields: config fields, e.g. ``{"ct.rounds": 2}`` or ``ct__rounds=2``.

    Returns:
        A :class:`~ctray.engine.results.DetectResult`: ``flagged_keys``, ``mask(keys)``, ``ranked(n)``,
        ``scores()``, ``shards()``, ``decision()``.

    Raises:
        ConfigError / DataError: bad config or input, named (before Ray starts where it can be).
    """
    from ctray.engine.detect import run_detect

    ov: dict[str, Any] = dict(overrides or {})
    ov.update({k.replace("__", "."): v for k, v in fields.items()})
    ov.update({"io.train": _paths(train), "io.clean": _paths(clean), "io.out": os.fspath(out)})
    if truth is not None:
        ov["io.truth"] = os.fspath(truth)
    return run_detect(preset, ov, config)


def export(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, which: str = "kept",
           use_ray: bool = False) -> Any:
    """Write a finished run's kept (``which="kept"``) or flagged samples as WebDataset shards, members
    byte-identical (``ctray export``). Returns the :class:`~ctray.engine.export.ExportResult`."""
    from ctray.engine.export import export_run

    return export_run(os.fspath(run_dir), os.fspath(out), which=which, use_ray=use_ray)  # type: ignore[arg-type]


# ------------------------------------------------------------------- model-level defenses (one model)


def _defense_config(preset: str | None, overrides: dict[str, Any] | None, fields: dict[str, Any],
                    config: str | None = None) -> Any:
    """The CLI's defense config: ``preset`` (default ``small``, whose CPU schedules docs/defenses.md
    measured) + the YAML file + the overrides, ``__`` read as the dot."""
    from ctray.config import load_config

    ov: dict[str, Any] = dict(overrides or {})
    ov.update({k.replace("__", "."): v for k, v in fields.items()})
    return load_config(preset or "small", ov, config)


def train(train: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
          preset: str | None = None, exclude: Sequence[tuple[str, str]] | None = None, config: str | None = None,
          overrides: dict[str, Any] | None = None, **fields: Any) -> Any:
    """Train a plain model with ``base.*``'s recipe on ``train`` (``ctray train``), leaving out the
    ``exclude`` ``(shard, key)`` pairs (e.g. ``DetectResult.flagged_keys``). Writes the checkpoint
    ``out``; returns the :class:`~ctray.engine.train.TrainResult` (``ckpt``, ``n_train``, ``n_excluded``)."""
    from ctray.engine.train import train_model

    cfg = _defense_config(preset, {**(overrides or {}), "io.train": _paths(train)}, fields, config)
    return train_model(cfg, os.fspath(out), exclude=exclude)


def evaluate(model: str | os.PathLike[str], test: str | Sequence[str] | None = None,
             triggered: str | Sequence[str] | None = None, target: int | None = None) -> Any:
    """Clean accuracy on ``test`` and attack success rate on ``triggered`` shards (``ctray evaluate``);
    returns the :class:`~ctray.engine.train.EvalResult` (``acc``, ``asr`` in [0, 1] or None)."""
    from ctray.engine.train import evaluate as _evaluate

    return _evaluate(os.fspath(model), None if test is None else _paths(test),
                     None if triggered is None else _paths(triggered), target)


def audit(model: str | os.PathLike[str], clean: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
          out: str | os.PathLike[str] | None = None, *, preset: str | None = None, config: str | None = None,
          overrides: dict[str, Any] | None = None, **fields: Any) -> Any:
    """Calibrated Trigger Inversion (``ctray audit``): is ``model`` backdoored, and to which class?
    Returns the :class:`~ctray.engine.defenses.AuditResult`: ``score`` (higher = more suspicious),
    ``target``, ``backdoored`` (score > ``audit.threshold``), ``per_class``; ``out`` gets audit.json and
    the inverted triggers."""
    from ctray.engine.defenses import audit_model

    cfg = _defense_config(preset, overrides, fields, config)
    return audit_model(cfg, os.fspath(model), _paths(clean), None if out is None else os.fspath(out))


def repair(model: str | os.PathLike[str], clean: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
           out: str | os.PathLike[str], *, preset: str | None = None, config: str | None = None,
           overrides: dict[str, Any] | None = None, **fields: Any) -> Any:
    """Pivotal Tuning (``ctray repair``) of ``model`` with the trusted labelled ``clean`` shards; writes
    the repaired checkpoint ``out``. Returns the :class:`~ctray.engine.defenses.FinetuneResult`."""
    from ctray.engine.defenses import repair_model

    cfg = _defense_config(preset, overrides, fields, config)
    return repair_model(cfg, os.fspath(model), _paths(clean), os.fspath(out))


def cleanse_model(model: str | os.PathLike[str],
                  unlabeled: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                  out: str | os.PathLike[str], *, preset: str | None = None, config: str | None = None,
                  overrides: dict[str, Any] | None = None, **fields: Any) -> Any:
    """BCU (``ctray cleanse-model``): distil ``model`` into a partly re-initialised student on
    ``unlabeled`` shards; writes ``out``. Returns the :class:`~ctray.engine.defenses.FinetuneResult`."""
    from ctray.engine.defenses import cleanse_model as _cleanse

    cfg = _defense_config(preset, overrides, fields, config)
    return _cleanse(cfg, os.fspath(model), _paths(unlabeled), os.fspath(out))
