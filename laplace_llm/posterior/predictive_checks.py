"""Checks of the arguments of a predictive call, before anything runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from laplace_llm.curvature.top_k import check_top_k

__all__ = ["check_top_k_call", "refuse_bridge_for_missing_candidates"]


def check_top_k_call(top_k, pred_type: str, link_approx: str, classification: bool):
    """Return a checked ``top_k``, refusing it where it does not apply."""
    top_k = check_top_k(top_k)
    if top_k is None:
        return None
    if not classification:
        raise ValueError(
            "top_k selects the most probable classes of a classification predictive; this "
            "posterior's predictive is a regression (reward models: pass fitting=True for "
            "the pair probabilities). Leave top_k unset."
        )
    if pred_type != "glm":
        raise ValueError(
            f"top_k applies to the GLM predictive (pred_type='glm'); pred_type={pred_type!r} "
            "samples weights and costs n_samples forwards whatever the number of classes, "
            "so it needs no top_k. Leave top_k unset."
        )
    if link_approx in ("bridge", "bridge_norm"):
        raise ValueError(
            f"link_approx={link_approx!r} needs a definite covariance of every logit, and "
            "top_k's is singular (the classes outside the top k move together); use "
            "link_approx='probit' or 'mc' with top_k."
        )
    return top_k


def refuse_bridge_for_missing_candidates(x: Any, pred_type: str, link_approx: str) -> None:
    """Raise ValueError for a bridge link over a batch with missing candidates."""
    missing = x.get("candidate_mask") if isinstance(x, Mapping) else None
    # == against the strings: laplace-torch passes its str enums, whose str() is "LinkApprox.…"
    if (pred_type == "glm" and link_approx in ("bridge", "bridge_norm")
            and missing is not None and not bool(torch.as_tensor(missing).all())):
        raise ValueError(
            f"link_approx={link_approx!r} divides by each logit's variance, which is 0 "
            "for a missing candidate (candidate_mask 0): use link_approx='probit' or 'mc'."
        )
