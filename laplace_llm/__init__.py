"""Laplace approximations over LoRA weights of fine-tuned language models.

Importing this package registers ``subset_of_weights="lora"`` with laplace-torch's
``Laplace`` factory, for ``hessian_structure`` "kron", "diag" and "full". The command
line, the demo and the evaluation helpers live in :mod:`laplace_llm.app`, which this core
never imports.
"""

import warnings

with warnings.catch_warnings():
    # asdl, imported by laplace-torch, calls the deprecated torch.jit.script at import
    # time; the notice concerns neither this package nor its users.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    import laplace  # noqa: F401

from laplace_llm import data
from laplace_llm.curvature.kfac import LoRAKFAC
from laplace_llm.curvature.per_example import LoRAPerExampleCurvature
from laplace_llm.errors import LoRAModelError, NonFiniteError, PosteriorFileError
from laplace_llm.matrix import LowRankFactor, LowRankKron, LowRankKronDecomposed
from laplace_llm.models.candidates import CandidateScorer
from laplace_llm.models.classifier import LLMClassifier
from laplace_llm.models.discovery import KronBlock, find_blocks
from laplace_llm.models.selection import select_blocks
from laplace_llm.options import Evidence, FisherType, KFACApprox, KFACOptions, Truncation
from laplace_llm.posterior.base import LoRADiagLaplace, LoRAFullLaplace
from laplace_llm.posterior.kron import LoRALaplace
from laplace_llm.prior.regression import optimize_prior_and_noise
from laplace_llm.tools import diagnostics, memory, metrics

__all__ = [
    # Laplace approximations
    "LoRALaplace",
    "LoRADiagLaplace",
    "LoRAFullLaplace",
    "optimize_prior_and_noise",
    # options
    "KFACOptions",
    "FisherType",
    "KFACApprox",
    "Truncation",
    "Evidence",
    # curvature
    "LoRAKFAC",
    "LoRAPerExampleCurvature",
    "LowRankFactor",
    "LowRankKron",
    "LowRankKronDecomposed",
    # models and data
    "LLMClassifier",
    "CandidateScorer",
    "KronBlock",
    "find_blocks",
    "select_blocks",
    "data",
    "diagnostics",
    "metrics",
    "memory",
    # errors
    "LoRAModelError",
    "NonFiniteError",
    "PosteriorFileError",
]
