"""The errors this package raises for problems a user can fix.

Each names the problem and the fix in its message. :class:`LoRAModelError` and
:class:`PosteriorFileError` are ``ValueError`` subclasses, so code that caught
``ValueError`` keeps working; :class:`NonFiniteError` is a ``FloatingPointError`` and
:class:`CollectiveTimeoutError` a ``RuntimeError`` (as torch.distributed's errors are).
"""

from __future__ import annotations

__all__ = ["LoRAModelError", "NonFiniteError", "PosteriorFileError", "CollectiveTimeoutError"]


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


class CollectiveTimeoutError(RuntimeError):
    """A collective step of a distributed fit failed: a rank did not arrive in time, or died.

    Raised on every rank that waited, within the fit's ``timeout`` (or the process group's
    own); the message names this rank, the step (e.g. "summing the data size", the
    all-reduce of a block's curvature factor, the forward pass of a batch of a sharded
    model), the ranks that had not reached it with the latest step each did reach, the
    timeout and the fix. A ``RuntimeError``, as torch.distributed's own errors are.
    """
