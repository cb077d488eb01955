"""Benchmark suites of kimi-linear: ``python -m benchmarks --help`` lists them; results in benchmarks/RESULTS.md."""
