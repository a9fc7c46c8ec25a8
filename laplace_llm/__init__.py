"""Laplace approximations over LoRA weights of fine-tuned language models.

Importing this package registers ``subset_of_weights="lora"`` with laplace-torch's
``Laplace`` factory, for ``hessian_structure`` "kron", "diag" and "full".
"""

import warnings

with warnings.catch_warnings():
    # asdl, imported by laplace-torch, calls the deprecated torch.jit.script at import
    # time; the notice concerns neither this package nor its users.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    import laplace  # noqa: F401

from laplace_llm import data, diagnostics, metrics
from laplace_llm.classifier import LLMClassifier
from laplace_llm.curvature import LoRAKFAC
from laplace_llm.discovery import KronBlock, LoRAModelError, find_blocks
from laplace_llm.lora_laplace import LoRALaplace
from laplace_llm.matrix import LowRankFactor, LowRankKron, LowRankKronDecomposed
from laplace_llm.module_selection import select_blocks
from laplace_llm.per_example import LoRAPerExampleCurvature
from laplace_llm.regression import optimize_prior_and_noise
from laplace_llm.structures import LoRADiagLaplace, LoRAFullLaplace

__all__ = [
    # Laplace approximations
    "LoRALaplace",
    "LoRADiagLaplace",
    "LoRAFullLaplace",
    "optimize_prior_and_noise",
    # curvature
    "LoRAKFAC",
    "LoRAPerExampleCurvature",
    "LowRankFactor",
    "LowRankKron",
    "LowRankKronDecomposed",
    # models and data
    "LLMClassifier",
    "data",
    "diagnostics",
    "metrics",
    "KronBlock",
    "LoRAModelError",
    "find_blocks",
    "select_blocks",
]
