"""ctray.core stays pure NumPy/SciPy: importing any of its modules loads neither torch, ray nor sklearn."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import ctray.core


def test_core_modules_import_without_torch_or_ray():
    modules = ["ctray.core"] + [f"ctray.core.{m.name}" for m in pkgutil.iter_modules(ctray.core.__path__)]
    assert {"ctray.core.distill", "ctray.core.decide", "ctray.core.metrics", "ctray.core.pca"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'sklearn') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, f"ctray.core pulled in heavy modules: {proc.stdout}"
