"""Training: pure-torch steps (``steps``) and THE per-worker loop for Ray Train (``loop``)."""
