"""Benchmarks of laplace-llm, run as modules from the repository root.

``python -m benchmarks.perf.<script>`` (speed and memory) and ``python -m
benchmarks.quality.<script>`` (accuracy of the approximations and predictions); the shared
model builder, arguments and results helpers are :mod:`benchmarks.common`. BENCHMARKS.md
holds the commands and the tables.
"""
