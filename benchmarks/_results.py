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
    """Platform, cores, torch threads, the load average (when called) and the GPU, if any."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": list(os.getloadavg()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def peak_meter(device):
    """``(start, stop)``: ``stop(start())`` is the peak bytes above the level at ``start()``.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors
    only, the allocator's cache excluded). CPU: the process's resident high-water mark
    (``VmHWM``), reset to the current resident size by writing 5 to
    ``/proc/self/clear_refs`` (Linux); memory that the allocator keeps from earlier steps
    is reused and not counted. ``None`` where neither is available.
    """
    if torch.device(device).type == "cuda":
        def start():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def stop(base):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base

        return start, stop

    def start():
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the high-water mark to the current RSS
            return _rss("VmRSS")
        except OSError:
            return None

    def stop(base):
        return None if base is None else max(_rss("VmHWM") - base, 0)

    return start, stop


def write_results(path: str, rows: list[dict], table: str) -> None:
    """JSON with ``command``, ``machine`` (platform, cores, torch threads, load when written, GPU),
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
