"""ctray: find backdoor-poisoned samples in image training sets with Confusion Training, on Ray."""

from __future__ import annotations

from typing import Any

from ctray._version import __version__
from ctray.memory import choose_driver_pool

# before pyarrow loads: this process's Arrow allocator (ctray.memory)
choose_driver_pool()

__all__ = ["BenchResult", "Config", "DetectResult", "SweepResult", "__version__", "audit", "bench", "cleanse_model",
           "detect", "evaluate", "export", "load_config", "open_run", "repair", "sweep", "train"]

# Imported on first use, so that `import ctray` (and every CLI start) stays free of pyarrow/Ray imports.
_LAZY = {"detect": "ctray.api", "export": "ctray.api", "train": "ctray.api", "evaluate": "ctray.api",
         "audit": "ctray.api", "repair": "ctray.api", "cleanse_model": "ctray.api", "DetectResult": "ctray.engine.results", "open_run": "ctray.engine.results",
         "load_config": "ctray.config", "Config": "ctray.config",
         "bench": "ctray.engine.bench", "BenchResult": "ctray.engine.bench",
         "sweep": "ctray.engine.sweep", "SweepResult": "ctray.engine.sweep"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctray' has no attribute {name!r}")
