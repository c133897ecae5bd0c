"""ctray: find backdoor-poisoned samples in image training sets with Confusion Training, on Ray."""

from ctray._version import __version__
from ctray.engine.sweep import SweepResult, sweep  # light: Ray is imported when a sweep runs

__all__ = ["SweepResult", "__version__", "sweep"]
