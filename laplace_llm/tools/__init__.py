"""Around a posterior.

Metrics, the temperature-scaling baseline, the memory model, low-rank diagnostics and
the plain LoRA training loop of the demo and benchmarks.
"""
