"""Writing a benchmark's rows with the command and machine that produced them."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys

import torch

PACKAGES = ("torch", "transformers", "peft", "laplace-torch", "curvlinops-for-pytorch",
            "asdfghjkl", "bayesian-lora", "laplace-llm")


def versions() -> dict[str, str]:
    """Installed version of each package the benchmarks touch (``"not installed"``)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict:
    """Platform, cores, torch threads, the load average at the start and the GPU, if any."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": list(os.getloadavg()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_results(path: str, rows: list[dict], table: str) -> None:
    """JSON with ``command``, ``machine`` (platform, cores, torch threads, load, GPU),
    ``versions``, ``rows`` and the printed ``table``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(
            {
                "command": "python " + " ".join(sys.argv),
                "machine": {**machine(), "torch": torch.__version__},
                "versions": versions(),
                "rows": rows,
                "table": table,
            },
            fh,
            indent=1,
        )
