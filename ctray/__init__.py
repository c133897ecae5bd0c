"""ctray: find backdoor-poisoned samples in image training sets with Confusion Training, on Ray."""

from ctray._version import __version__

__all__ = ["__version__"]
