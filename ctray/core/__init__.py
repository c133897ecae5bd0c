"""Pure NumPy/SciPy core of ctray: distillation, the final PCA + likelihood-ratio decision, metrics.

No torch and no ray here (``tests/test_core_pure.py`` checks it), so the math runs and is tested
anywhere, and drivers/actors can import it cheaply.
"""

from ctray.core.decide import Decision, decide, flag_samples, likelihood_ratio_test, likelihood_ratios
from ctray.core.distill import class_weights, distill, keep_count
from ctray.core.metrics import auroc, average_precision, detection_metrics
from ctray.core.pca import FeatureMoments, project

__all__ = [
    "Decision",
    "FeatureMoments",
    "auroc",
    "average_precision",
    "class_weights",
    "decide",
    "detection_metrics",
    "distill",
    "flag_samples",
    "keep_count",
    "likelihood_ratio_test",
    "likelihood_ratios",
    "project",
]
