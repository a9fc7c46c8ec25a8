"""Link functions on GLM moments shared by the calibration benchmarks.

``mu`` ``(N, C)`` and ``cov`` ``(N, C, C)`` are the mean and covariance of the logits, as
``LoRALaplace.glm_moments_over_priors`` returns them.
"""

from __future__ import annotations

import math

import torch


def probit(mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """laplace-torch's probit link: ``softmax(μ / sqrt(1 + π/8 diag Σ))``."""
    var = cov.diagonal(dim1=-2, dim2=-1)
    return torch.softmax(mu / torch.sqrt(1 + math.pi / 8 * var), dim=-1)


def monte_carlo(mu: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Mean softmax of ``n`` logit samples from ``N(μ, Σ)`` (eigen square root, so a
    semi-definite Σ is fine)."""
    gen = torch.Generator().manual_seed(seed)
    lam, Q = torch.linalg.eigh(cov)
    root = Q * lam.clamp(min=0).sqrt().unsqueeze(-2)
    eps = torch.randn(n, *mu.shape, generator=gen, dtype=mu.dtype)
    samples = mu + torch.einsum("bij,sbj->sbi", root, eps)
    return torch.softmax(samples, dim=-1).mean(0)
