"""Benchmark scripts (``python -m ctray.benchmarks.<name>``): they print figures; they are not tests.

(Named ``benchmarks``, not ``bench``: ``ctray.bench`` is the detector comparison's Python API,
:func:`ctray.engine.bench.bench`; the per-attack script that lived here is ``ctray bench --base ...``.)
"""
