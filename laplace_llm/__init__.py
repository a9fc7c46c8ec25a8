"""Laplace approximations over LoRA weights of fine-tuned language models.

Importing this package registers ``subset_of_weights="lora"`` with laplace-torch's
``Laplace`` factory.
"""

import warnings

with warnings.catch_warnings():
    # asdl, imported by laplace-torch, calls the deprecated torch.jit.script at import
    # time; the notice concerns neither this package nor its users.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    import laplace  # noqa: F401

from laplace_llm import data, metrics
from laplace_llm.candidates import CandidateScorer
from laplace_llm.classifier import LLMClassifier
from laplace_llm.curvature import LoRAKFAC
from laplace_llm.discovery import KronBlock, LoRAModelError, find_blocks
from laplace_llm.lora_laplace import LoRALaplace
from laplace_llm.matrix import LowRankFactor, LowRankKron, LowRankKronDecomposed

__all__ = [
    # Laplace approximations
    "LoRALaplace",
    # curvature
    "LoRAKFAC",
    "LowRankFactor",
    "LowRankKron",
    "LowRankKronDecomposed",
    # models and data
    "LLMClassifier",
    "CandidateScorer",
    "data",
    "metrics",
    "KronBlock",
    "LoRAModelError",
    "find_blocks",
]
