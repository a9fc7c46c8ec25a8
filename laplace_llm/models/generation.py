"""Old import path of :mod:`laplace_llm.posterior.generation`.

It takes a fitted posterior, so it stands above ``posterior/`` in the layer order.
"""

from laplace_llm.posterior.generation import answer_log_likelihood, sample_adapters

__all__ = ["answer_log_likelihood", "sample_adapters"]
