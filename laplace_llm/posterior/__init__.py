"""The Laplace approximations over LoRA weights, one module per Hessian structure.

:mod:`~laplace_llm.posterior.base` holds what every structure shares (argument checks,
block selection, the fit loop, predictions, state and files, prior tuning) and the
``{hessian_structure: class}`` registry that :func:`laplace_llm.load` reads;
:mod:`~laplace_llm.posterior.kron` is laplace-torch's ``KronLaplace`` with low-rank
factors, :mod:`~laplace_llm.posterior.diag` and :mod:`~laplace_llm.posterior.full` its
``DiagLaplace`` and ``FullLaplace`` from per-example gradients;
:mod:`~laplace_llm.posterior.checkpoint` the checkpoints of an unfinished ``fit`` that
``fit(resume_from=...)`` continues.
"""
