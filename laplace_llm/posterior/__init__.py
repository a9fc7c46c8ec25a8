"""The Laplace approximations over LoRA weights, one module per Hessian structure.

:mod:`~laplace_llm.posterior.base` holds what every structure shares (argument checks,
block selection, the fit loop, predictions, state and files, prior tuning);
:mod:`~laplace_llm.posterior.kron` is laplace-torch's ``KronLaplace`` with low-rank
factors.
"""
