"""Progress bars that stay quiet where nobody watches them.

tqdm redraws a bar with carriage returns, which a terminal overwrites but a log file (CI,
``nohup``, a pipe) keeps: a few thousand lines of one run. :func:`progress_bar` follows
tqdm's own convention for that case (``disable=None``): a bar on a terminal, nothing on
a stream that is not one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True,
                 **kwargs: Any) -> tqdm.tqdm:
    """Return a ``tqdm`` bar over ``iterable``, shown when ``enabled`` and on a terminal.

    Parameters
    ----------
    iterable : iterable, optional
    enabled : bool, default True
        ``False`` never shows a bar (the library's ``progress=False``).
    **kwargs
        passed to ``tqdm.tqdm`` (``desc``, ``total``, ``leave``, ``file``…).
    """
    return tqdm.tqdm(iterable, disable=None if enabled else True, **kwargs)
