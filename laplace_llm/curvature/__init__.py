"""Curvature of the LoRA weights from hooked activations and output gradients.

:mod:`~laplace_llm.curvature.kfac`: K-FAC factors, the hooks and call layouts, the
Jacobian-free GLM moments; :mod:`~laplace_llm.curvature.per_example`: per-example LoRA
gradients for the diagonal and full structures; :mod:`~laplace_llm.curvature.top_k`: the
GLM over many classes from the ``k`` most probable ones and the rest merged.
"""
