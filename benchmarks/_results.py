"""Writing a benchmark's rows with the command and machine that produced them."""

from __future__ import annotations

import json
import os
import platform
import sys

import torch


def write_results(path: str, rows: list[dict], table: str) -> None:
    """JSON with ``command``, ``machine`` (platform, cores, torch threads and version),
    ``rows`` and the printed ``table``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(
            {
                "command": "python " + " ".join(sys.argv),
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                },
                "rows": rows,
                "table": table,
            },
            fh,
            indent=1,
        )
