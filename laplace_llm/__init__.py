"""Laplace approximations over LoRA weights of fine-tuned language models.

Importing this package registers ``subset_of_weights="lora"`` with laplace-torch's
``Laplace`` factory. The command line, the demo and the evaluation helpers live in
:mod:`laplace_llm.app`, which this core never imports.
"""

import warnings

with warnings.catch_warnings():
    # asdl, imported by laplace-torch, calls the deprecated torch.jit.script at import
    # time; the notice concerns neither this package nor its users.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    import laplace  # noqa: F401

from laplace_llm import data, memory, metrics
from laplace_llm.classifier import LLMClassifier
from laplace_llm.curvature import LoRAKFAC
from laplace_llm.discovery import KronBlock, find_blocks
from laplace_llm.errors import LoRAModelError, NonFiniteError, PosteriorFileError
from laplace_llm.lora_laplace import LoRALaplace
from laplace_llm.matrix import LowRankFactor, LowRankKron, LowRankKronDecomposed
from laplace_llm.options import FisherType, KFACApprox, KFACOptions

__all__ = [
    # Laplace approximations
    "LoRALaplace",
    # options
    "KFACOptions",
    "FisherType",
    "KFACApprox",
    # curvature
    "LoRAKFAC",
    "LowRankFactor",
    "LowRankKron",
    "LowRankKronDecomposed",
    # models and data
    "LLMClassifier",
    "KronBlock",
    "find_blocks",
    "data",
    "metrics",
    "memory",
    # errors
    "LoRAModelError",
    "NonFiniteError",
    "PosteriorFileError",
]
