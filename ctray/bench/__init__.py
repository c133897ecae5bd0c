"""Benchmark scripts (``python -m ctray.bench.<name>``): they print figures; they are not tests."""
