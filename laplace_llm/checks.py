"""Checks of a training loader and its batches before they reach the curvature.

Each check raises an error that names the batch, the problem and the fix, before the
batch's forward pass, so a bad input leaves the model and the posterior unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

__all__ = ["loader_size", "check_batch", "check_regression_targets"]


def loader_size(
    train_loader: DataLoader,
    name: str = "The train loader",
    fix: str = "pass a torch DataLoader over a sized dataset",
) -> int:
    """Return the data set size ``N`` of ``train_loader`` (which scales the curvature).

    The one check of a loader's length, for ``fit`` and for the Trainer callback.

    Parameters
    ----------
    train_loader : DataLoader
    name : str
        what the messages call the loader.
    fix : str
        what the message of a loader without length suggests.

    Raises
    ------
    TypeError
        The loader has no sized ``dataset`` (e.g. an ``IterableDataset``).
    ValueError
        The dataset is empty.
    """
    dataset = getattr(train_loader, "dataset", None)
    try:
        N = len(dataset)
    except TypeError:
        raise TypeError(
            f"{name} needs a `dataset` with a length (the data set size N scales the "
            f"curvature); {fix}."
        ) from None
    if N == 0:
        raise ValueError(f"{name} is empty (its dataset has length 0).")
    return N


def check_batch(
    data: Any,
    i: int,
    n_outputs: int | None,
    device: torch.device,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
    likelihood: str = "classification",
    dtype: torch.dtype | None = None,
) -> tuple[Any, torch.Tensor]:
    """Split batch ``i`` into inputs and labels (or regression targets), checked against the model.

    Parameters
    ----------
    data : dict or tuple
        a dict batch with ``dict_key_x`` and ``dict_key_y``, or an ``(X, y)`` pair.
    i : int
        the batch's index, for the messages.
    n_outputs : int or None
        the model's number of outputs: labels must lie in ``0..n_outputs - 1``.
    device : torch.device
        the model's device; every tensor of the batch must be on its device type.
    dict_key_x, dict_key_y : str
        keys of the inputs and the labels in dict batches.
    likelihood : str, default "classification"
        ``"regression"`` checks real-valued targets ``(batch, n_outputs)``
        (:func:`check_regression_targets`); any other likelihood
        integer labels.
    dtype : torch.dtype, optional
        dtype of regression targets (the posterior's); default the targets' own.

    Returns
    -------
    X : dict or torch.Tensor
        what the model is called with (the whole dict for dict batches).
    y : torch.Tensor
        ``(batch,)`` labels on ``device``, or ``(batch, n_outputs)`` regression targets.

    Raises
    ------
    KeyError
        a dict batch lacks ``dict_key_x`` or ``dict_key_y``.
    TypeError
        labels that are not integers (regression: targets that are not floats).
    ValueError
        a batch on another device, labels of the wrong shape or out of range.
    """
    if isinstance(data, Mapping):
        for key in (dict_key_x, dict_key_y):
            if key not in data:
                raise KeyError(
                    f"Batch {i} has no '{key}' (keys: {sorted(data.keys())}). Batches are "
                    f"dicts with '{dict_key_x}', optional 'attention_mask', and "
                    f"'{dict_key_y}'; set dict_key_x/dict_key_y if yours differ."
                )
        X, y = data, data[dict_key_y]
        x_main = data[dict_key_x]
    else:
        X, y = data
        x_main = X
    for t in (X.values() if isinstance(X, Mapping) else [X]):
        if isinstance(t, torch.Tensor) and t.device.type != device.type:
            raise ValueError(
                f"Batch {i} is on {t.device} but the model is on {device}; move the "
                "batch (or the model) so that both are on the same device."
            )
    batch_size = x_main.shape[0] if isinstance(x_main, torch.Tensor) else len(x_main)
    if likelihood == "regression":
        y = check_regression_targets(y, batch_size, n_outputs, i, device, dtype)
        return X, y
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(
            f"Labels of batch {i} have dtype {y.dtype}; classification labels must be "
            "integer class indices (torch.long), not probabilities or floats."
        )
    if y.ndim != 1 or y.shape[0] != batch_size:
        raise ValueError(
            f"Labels of batch {i} have shape {tuple(y.shape)} but the batch has "
            f"{batch_size} inputs; give one integer label per input."
        )
    if n_outputs is not None and y.numel() and (y.min() < 0 or y.max() >= n_outputs):
        raise ValueError(
            f"Labels of batch {i} lie in [{int(y.min())}, {int(y.max())}] but the model has "
            f"{n_outputs} outputs; labels must be in 0..{n_outputs - 1}."
        )
    return X, y.to(device)


def check_regression_targets(
    y, batch_size: int, n_outputs: int | None, i: int, device, dtype
) -> torch.Tensor:
    """Targets of batch ``i`` as a ``(batch_size, n_outputs)`` floating tensor.

    Raises
    ------
    TypeError
        integer or boolean targets (class labels given to a regression).
    ValueError
        a shape other than ``(batch_size, n_outputs)``, or non-finite targets.
    """
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if not y.is_floating_point():
        raise TypeError(
            f"Targets of batch {i} have dtype {y.dtype}; likelihood='regression' needs "
            "real-valued targets (float) of shape (batch, k). For class labels use "
            "likelihood='classification'."
        )
    k = n_outputs if n_outputs is not None else (y.shape[-1] if y.ndim == 2 else None)
    if y.ndim != 2 or y.shape[0] != batch_size or (k is not None and y.shape[1] != k):
        hint = " (use y.unsqueeze(-1) for one output)" if y.ndim == 1 else ""
        raise ValueError(
            f"Targets of batch {i} have shape {tuple(y.shape)}; the model outputs "
            f"({batch_size}, {k}), and regression targets must have that shape{hint}."
        )
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"Targets of batch {i} contain NaN or Inf.")
    return y.to(device=device, dtype=dtype if dtype is not None else y.dtype)
