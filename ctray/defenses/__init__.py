"""Model-level defenses (seed-defenses.md), pure torch, no Ray: the per-step math that
``ctray.training.finetune`` (Ray Train) and ``ctray.engine.defenses`` (drivers, Ray tasks/Data) compose.

- :mod:`~ctray.defenses.repair`: Pivotal Tuning losses (SLOL, parameter anchor, label-free variant).
- :mod:`~ctray.defenses.cleanse`: BCU student initialisation and the distillation loss/temperature.
- :mod:`~ctray.defenses.audit`: Calibrated Trigger Inversion for one candidate class.
- :mod:`~ctray.defenses.actstats`: activation features of image models and the clamping purifier.
"""
