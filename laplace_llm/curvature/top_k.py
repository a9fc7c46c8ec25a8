"""The GLM predictive over many classes at the cost of its ``k`` most probable ones.

The GLM predictive's logit covariance ``J P⁻¹ Jᵀ`` needs the Jacobian of every logit:
one backward pass per class, ``C`` per batch (and the Jacobians of ``C`` logits in
memory). With ``C`` in the hundreds or thousands (an answer vocabulary, a label set)
that is hundreds of times a training step. ``top_k`` computes it for each example's
``k`` logits of highest MAP value (its ``k`` most probable classes) and for the rest of
the classes merged into one, from ``k + 1`` backward passes:

- the **selected** logits ``f_S`` get their exact GLM variances and covariances (the
  same Jacobians contracted with the same posterior as the full GLM's);
- the **rest** ``R`` (the other ``C − k`` classes) moves as one class: the Jacobian of
  their log-sum-exp ``f_R = log Σ_{c∈R} exp f_c`` is ``J_R = Σ_{c∈R} q_c J_c`` with
  ``q = softmax(f_R)`` at the MAP (one backward pass with cotangent ``q``), and every
  class of the rest takes ``J_R`` as its Jacobian. So a sample moves all of them by one
  common amount: their share of the rest's probability stays the MAP's, and the
  rest's total probability is spread as the GLM of the model with the rest merged into
  one class spreads it;
- ``f_mu`` is the MAP logits, all ``C`` of them, as without ``top_k``.

In matrix form the covariance is ``A Σ Aᵀ``, ``Σ`` the full GLM covariance and ``A`` the
``C × C`` map that keeps each selected logit and replaces each other one by ``qᵀ f``
(block-diagonal over the batch with ``joint=True``). It is a covariance (positive
semi-definite), it equals the full GLM's on the selected rows and columns, and it is the
full GLM exactly when ``k ≥ C − 1`` (``k ≥ C`` computes the full GLM itself, bit for
bit). What it leaves out is the spread of the classes of the rest against each other:
small when the MAP puts little probability there, and measured against the full GLM in
``benchmarks/bench_classes.py``, beside the simpler choice of zero variance for the
rest. The NN-sampling predictive (``pred_type="nn"``, ``S`` forwards whatever ``C``)
leaves nothing out.
"""

from __future__ import annotations

import torch

__all__ = ["check_top_k", "expand_covariance", "merge_rest", "rest_weights", "top_classes"]


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
        ``(B, top_k)`` long, in decreasing order of the logit (``torch.topk``'s order).
    """
    top_k = check_top_k(top_k)
    if top_k is None or top_k >= f.shape[-1]:
        return None
    return torch.topk(f.detach(), top_k, dim=-1).indices


def rest_weights(f: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``q``: the softmax of the logits outside ``classes``, 0 on ``classes``.

    The cotangent whose backward pass gives the Jacobian of the rest's log-sum-exp.

    Parameters
    ----------
    f : torch.Tensor
        ``(B, C)`` MAP logits.
    classes : torch.Tensor
        ``(B, k)`` selected classes, ``k < C``.

    Returns
    -------
    torch.Tensor
        ``(B, C)`` in ``f``'s dtype, each row summing to 1 over the rest.
    """
    selected = torch.zeros(f.shape, dtype=torch.bool, device=f.device)
    selected.scatter_(1, classes.to(f.device), True)
    rest = f.detach().masked_fill(selected, float("-inf"))
    return torch.softmax(rest, dim=-1)


def _coarse_index(classes: torch.Tensor, C: int) -> torch.Tensor:
    """``(B, C)``: the coarse index of each class: ``i`` for ``classes[:, i]``, ``k`` else."""
    B, k = classes.shape
    index = torch.full((B, C), k, dtype=torch.long, device=classes.device)
    positions = torch.arange(k, device=classes.device).expand(B, k)
    return index.scatter_(1, classes, positions)


def expand_covariance(
    f_var: torch.Tensor, classes: torch.Tensor, C: int, joint: bool = False
) -> torch.Tensor:
    """Spread the covariance of the ``k`` selected logits and the rest over all ``C``.

    Parameters
    ----------
    f_var : torch.Tensor
        ``(B, k + 1, k + 1)``: entry ``[n, i, j]`` the covariance of logits
        ``classes[n, i]`` and ``classes[n, j]`` of example ``n``, index ``k`` the rest's
        log-sum-exp; or ``(B·(k+1), B·(k+1))`` with ``joint``, example by example.
    classes : torch.Tensor
        ``(B, k)`` selected classes of each example (distinct within a row).
    C : int
        the number of classes.
    joint : bool
        ``f_var`` is the joint covariance across the batch.

    Returns
    -------
    torch.Tensor
        ``(B, C, C)``, or ``(B·C, B·C)`` with ``joint``: every class of the rest takes
        the rest's row and column (values copied, not computed: the selected block is
        ``f_var``'s bit for bit).
    """
    B, k = classes.shape
    index = _coarse_index(classes, C)  # (B, C) into 0..k
    if joint:
        flat = (torch.arange(B, device=index.device)[:, None] * (k + 1) + index).reshape(-1)
        return f_var[flat[:, None], flat[None, :]]
    rows = torch.arange(B, device=index.device)[:, None, None]
    return f_var[rows, index[:, :, None], index[:, None, :]]


def merge_rest(
    f_mu: torch.Tensor, f_var: torch.Tensor, top_k: int | None, joint: bool = False
) -> torch.Tensor:
    """Return ``A Σ Aᵀ`` of a covariance ``Σ`` over all classes (see the module docstring).

    What ``top_k`` gives from a full covariance (the explicit Jacobians of the diagonal
    and full posteriors, which cost ``C`` backward passes anyway).

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
        The covariance with the rest merged; ``f_var`` itself for ``None`` or
        ``top_k ≥ C``.
    """
    classes = top_classes(f_mu, top_k)
    if classes is None:
        return f_var
    B, C = f_mu.shape
    q = rest_weights(f_mu, classes).to(f_var)
    eye = torch.eye(C, dtype=f_var.dtype, device=f_var.device).expand(B, C, C)
    index = _coarse_index(classes, C).to(f_var.device)
    A = torch.where((index < classes.shape[1])[:, :, None], eye, q[:, None, :])  # (B, C, C)
    if joint:
        A = torch.block_diag(*A)
        return A @ f_var @ A.T
    return A @ f_var @ A.transpose(1, 2)
