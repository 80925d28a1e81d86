"""Benchmarks that run inside the package: the model zoo (spec -> jobs -> scores)."""
