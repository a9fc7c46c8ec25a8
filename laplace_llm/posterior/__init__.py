"""The Laplace approximations over LoRA weights, one module per Hessian structure."""
