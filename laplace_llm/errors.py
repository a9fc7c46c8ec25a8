"""The errors this package raises for problems a user can fix.

Each names the problem and the fix in its message; all but :class:`NonFiniteError` are
``ValueError`` subclasses, so code that caught ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["LoRAModelError", "NonFiniteError", "PosteriorFileError"]


class LoRAModelError(ValueError):
    """The model's trainable parameters do not form supported LoRA blocks."""


class NonFiniteError(FloatingPointError):
    """NaN or Inf met in logits or activations."""


class PosteriorFileError(ValueError):
    """A posterior that cannot be used: not ours, damaged, or for another model.

    Also a fit checkpoint that cannot be resumed (``fit(resume_from=...)``): damaged, a
    finished posterior instead, or written by another fit (model, weights, options,
    data, loader, processes).
    """
