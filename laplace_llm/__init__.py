"""Laplace approximations over LoRA weights of fine-tuned language models.

Importing this package registers ``subset_of_weights="lora"`` with laplace-torch's
``Laplace`` factory, for ``hessian_structure`` "kron", "diag" and "full". The names below
are what a user calls; everything else stays at its module path (the curvature in
:mod:`laplace_llm.curvature`, the prior in :mod:`laplace_llm.prior`, the model side in
:mod:`laplace_llm.models`, metrics and other tools in :mod:`laplace_llm.tools`). The
command line, the demo and the evaluation helpers live in :mod:`laplace_llm.app`, which
this core never imports.
"""

import warnings

#: The release, read by setuptools for the package metadata (``pyproject.toml``: dynamic version).
__version__ = "0.1.0"

with warnings.catch_warnings():
    # asdl, imported by laplace-torch, calls the deprecated torch.jit.script at import
    # time; the notice concerns neither this package nor its users.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    import laplace  # noqa: F401

from laplace_llm.errors import (
    CollectiveTimeoutError,
    LoRAModelError,
    NonFiniteError,
    PosteriorFileError,
)
from laplace_llm.models.candidates import CandidateScorer
from laplace_llm.models.classifier import LLMClassifier
from laplace_llm.options import Evidence, FisherType, KFACApprox, KFACOptions, Truncation
from laplace_llm.posterior.base import load
from laplace_llm.posterior.diag import LoRADiagLaplace
from laplace_llm.posterior.full import LoRAFullLaplace
from laplace_llm.posterior.kron import LoRALaplace
from laplace_llm.prior.centre import prior_mean_from
from laplace_llm.prior.regression import optimize_prior_and_noise
from laplace_llm.tools.baselines import TemperatureScaling

__all__ = [
    # Laplace approximations over LoRA weights, and reading their files
    "LoRALaplace",
    "LoRADiagLaplace",
    "LoRAFullLaplace",
    "load",
    "optimize_prior_and_noise",
    "prior_mean_from",
    # options
    "KFACOptions",
    "FisherType",
    "KFACApprox",
    "Truncation",
    "Evidence",
    # models
    "LLMClassifier",
    "CandidateScorer",
    # baselines
    "TemperatureScaling",
    # transformers' Trainer
    "LaplaceCallback",
    # errors
    "LoRAModelError",
    "NonFiniteError",
    "PosteriorFileError",
    "CollectiveTimeoutError",
]


def __getattr__(name: str):
    # the callback subclasses transformers' TrainerCallback, whose import needs
    # accelerate; it is loaded when first asked for, not with the package
    if name == "LaplaceCallback":
        from laplace_llm.callback import LaplaceCallback

        return LaplaceCallback
    raise AttributeError(f"module 'laplace_llm' has no attribute {name!r}")
