"""Quality benchmarks: how close the approximations come and how good the predictions are
(``python -m benchmarks.quality.<script>``).
"""
