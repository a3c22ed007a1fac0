"""Benchmark suites: each module has run(args) -> dict of figures (launch/benchmark.py runs them)."""
