"""Laplace approximations over LoRA weights of fine-tuned language models.

Importing this package registers ``subset_of_weights="lora"`` with laplace-torch's
``Laplace`` factory.
"""

from laplace_llm import data, metrics
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
    "data",
    "metrics",
    "KronBlock",
    "LoRAModelError",
    "find_blocks",
]
