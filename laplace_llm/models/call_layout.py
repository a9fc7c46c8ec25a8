"""The layout of a module call: which positions are real and whose example each row is.

A model that runs its LoRA modules on rows other than its output batch's (e.g.
:class:`~laplace_llm.models.candidates.CandidateScorer`, one row per candidate) sets a
``call_layout``; the curvature backends (:mod:`laplace_llm.curvature.kfac`) read it during
each call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["CallLayout"]


class CallLayout(NamedTuple):
    """Which positions of a module call are real, and whose example each row is.

    Attributes
    ----------
    mask : torch.Tensor
        ``(R, T)``, 1 on real positions of the call's ``R`` rows of ``T`` positions (a
        call on ``(R, d)`` inputs has ``T = 1``).
    example : torch.Tensor
        ``(R,)`` long, the index in the model's output batch of each row's example.
    """

    mask: torch.Tensor
    example: torch.Tensor
