"""SHA-256 digests of values: LoRA weights and batches as a loader yields them.

A fit checkpoint keeps the digest of the weights it was fitted on and a running digest of
the batches seen, so that a resumed fit refuses other weights or another order of batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from laplace_llm.sharding import is_sharded

__all__ = ["weights_digest", "batch_digest"]


def weights_digest(params: list[torch.Tensor]) -> str:
    """SHA-256 over the values, dtypes and shapes of ``params`` (a sharded one: its local slice)."""
    h = hashlib.sha256()
    for p in params:
        t = p.detach()
        _feed(h, t.to_local() if is_sharded(t) else t)
    return h.hexdigest()


def batch_digest(data: Any) -> str:
    """SHA-256 of a batch as the loader yields it: its tensors' bytes, its keys and values."""
    h = hashlib.sha256()
    _feed(h, data)
    return h.hexdigest()


def _feed(h: Any, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor {t.dtype} {tuple(x.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(x, np.ndarray):
        h.update(f"array {x.dtype} {x.shape};".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, Mapping):
        h.update(f"map {len(x)};".encode())
        for key in sorted(x, key=str):
            _feed(h, str(key))
            _feed(h, x[key])
    elif isinstance(x, (list, tuple)):
        h.update(f"seq {len(x)};".encode())
        for v in x:
            _feed(h, v)
    elif x is None or isinstance(x, (str, int, float, bool)):
        h.update(f"{type(x).__name__} {x!r};".encode())
    else:  # an object without a stable value: its type at least
        h.update(f"object {type(x).__qualname__};".encode())
