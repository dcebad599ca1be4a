"""Benchmarks (`make bench`); see each script's docstring."""
