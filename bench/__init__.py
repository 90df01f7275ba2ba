"""Benchmarks: ``make bench`` prints JSON figures; targets live here, not in tests."""
