"""The error hierarchy. Messages name the file, shard, key or field and the allowed values."""

from __future__ import annotations


class CtrayError(Exception):
    """Base class of every error ctray raises on purpose (CLI exit code 2 for the subclasses below)."""


class ConfigError(CtrayError):
    """A config field, preset or override is wrong (names the field and the allowed values)."""


class DataError(CtrayError):
    """Input data is unusable (names the shard/file/key and what was wrong)."""


class RunDirMismatchError(ConfigError):
    """The run directory holds a run made with another config or inputs (resuming it would mix two runs)."""
