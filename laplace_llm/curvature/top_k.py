"""The GLM predictive over many classes at the cost of its ``k`` most probable ones.

The GLM predictive's logit covariance ``J P⁻¹ Jᵀ`` needs the Jacobian of every logit:
one backward pass per class, so ``C`` backward passes per batch (and the Jacobians of
``C`` logits in memory). With ``C`` in the hundreds or thousands (an answer vocabulary,
a label set) that is hundreds of times a training step. ``top_k`` computes the variance
and covariances of each example's ``k`` logits of highest MAP value (its ``k`` most
probable classes under the MAP model) from ``k`` backward passes, and gives every other
class its MAP logit with zero variance:

- ``f_mu`` is the MAP logits, all ``C`` of them, as without ``top_k``;
- ``f_var[n, i, j]`` equals the full GLM's for ``i, j`` both among example ``n``'s
  selected classes (the same Jacobians contracted with the same posterior), and is 0
  otherwise (``joint=True``: the same for the ``(B·C, B·C)`` covariance);
- ``k ≥ C`` is the full computation, exactly.

What is left out: the spread of the logits of the classes outside the top ``k``. Under
the probit link a class keeps ``κ = 1`` on its MAP logit; under the Monte-Carlo link its
logit is not sampled. The classes left out hold the MAP probability mass
``1 − Σ_{top k} p_c``; their predictive probability can differ from the full GLM's only
through their own logits' spread, which moves probability between them and the rest. On
a fine-tuned model whose MAP mass sits on a few classes that mass is small, and
``benchmarks/bench_classes.py`` measures the total-variation distance to the full GLM
predictive for several ``k``. The NN-sampling predictive (``pred_type="nn"``, ``S``
forwards whatever ``C``) is the alternative that leaves nothing out.
"""

from __future__ import annotations

import torch

__all__ = ["check_top_k", "keep_top_k", "scatter_covariance", "top_classes"]


def check_top_k(top_k) -> int | None:
    """Return ``top_k`` as an int (``None`` stays ``None``), refusing anything but ``k ≥ 1``.

    Raises
    ------
    TypeError
        ``top_k`` is not an integer (a bool included).
    ValueError
        ``top_k < 1``.
    """
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(
            f"top_k must be a positive integer (the number of most probable classes whose "
            f"variance the GLM computes) or None for all classes; got {top_k!r}."
        )
    if top_k < 1:
        raise ValueError(
            f"top_k must be at least 1, got {top_k}: pass the number of most probable "
            "classes whose variance the GLM computes, or None for all classes."
        )
    return top_k


def top_classes(f: torch.Tensor, top_k: int | None) -> torch.Tensor | None:
    """Each example's ``top_k`` classes of highest logit, or ``None`` for all classes.

    Parameters
    ----------
    f : torch.Tensor
        ``(B, C)`` MAP logits.
    top_k : int or None
        ``None`` or ``top_k ≥ C`` mean every class (``None`` is returned).

    Returns
    -------
    torch.Tensor or None
        ``(B, top_k)`` long, in decreasing order of the logit (the order of
        ``torch.topk``).
    """
    top_k = check_top_k(top_k)
    if top_k is None or top_k >= f.shape[-1]:
        return None
    return torch.topk(f.detach(), top_k, dim=-1).indices


def scatter_covariance(
    f_var: torch.Tensor, classes: torch.Tensor, C: int, joint: bool = False
) -> torch.Tensor:
    """Place the covariance of the selected classes in a zero covariance over all ``C``.

    Parameters
    ----------
    f_var : torch.Tensor
        ``(B, k, k)``, entry ``[n, i, j]`` the covariance of logits ``classes[n, i]``
        and ``classes[n, j]`` of example ``n``; or ``(B·k, B·k)`` with ``joint``, rows
        ordered example by example, class by class as in ``classes``.
    classes : torch.Tensor
        ``(B, k)`` class indices of each example (distinct within a row).
    C : int
        the number of classes.
    joint : bool
        ``f_var`` is the joint covariance across the batch.

    Returns
    -------
    torch.Tensor
        ``(B, C, C)``, or ``(B·C, B·C)`` with ``joint``; 0 outside the selected entries.
    """
    B, k = classes.shape
    if joint:
        flat = (torch.arange(B, device=classes.device)[:, None] * C + classes).reshape(-1)
        out = f_var.new_zeros(B * C, B * C)
        out[flat[:, None], flat[None, :]] = f_var
        return out
    out = f_var.new_zeros(B, C * C)
    index = (classes[:, :, None] * C + classes[:, None, :]).reshape(B, k * k)
    return out.scatter_(1, index, f_var.reshape(B, k * k)).reshape(B, C, C)


def keep_top_k(
    f_mu: torch.Tensor, f_var: torch.Tensor, top_k: int | None, joint: bool = False
) -> torch.Tensor:
    """Zero the covariance outside each example's ``top_k`` most probable classes.

    What ``top_k`` gives from a covariance computed over all classes (the explicit
    Jacobians of the diagonal and full posteriors, which cost ``C`` backward passes
    anyway): the same values as :func:`scatter_covariance` of the selected entries.

    Parameters
    ----------
    f_mu : torch.Tensor
        ``(B, C)`` MAP logits (not flattened).
    f_var : torch.Tensor
        ``(B, C, C)``, or ``(B·C, B·C)`` with ``joint``.
    top_k : int or None
    joint : bool

    Returns
    -------
    torch.Tensor
        ``f_var`` with the entries outside the selection set to 0 (``f_var`` itself for
        ``None`` or ``top_k ≥ C``).
    """
    classes = top_classes(f_mu, top_k)
    if classes is None:
        return f_var
    keep = torch.zeros(f_mu.shape, dtype=torch.bool, device=f_var.device)
    keep.scatter_(1, classes.to(f_var.device), True)
    if joint:
        keep = keep.reshape(-1)
        both = keep[:, None] & keep[None, :]
    else:
        both = keep[:, :, None] & keep[:, None, :]
    return torch.where(both, f_var, torch.zeros((), dtype=f_var.dtype, device=f_var.device))
