"""Writing a benchmark's rows with the command and machine that produced them."""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

#: The repository root: ``python -m benchmarks.<folder>.<script>`` runs from here.
ROOT = Path(__file__).resolve().parents[2]
#: ``sketch_adapt`` of the quality benchmarks whose committed results were fitted before
#: the library adapted half of each sketch's Ω to the first batch (issue 31): 0, the
#: all-Gaussian Ω they were made with, so that rerunning them prints those results
RESULTS_SKETCH_ADAPT = 0

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


def peak_of_call(fn) -> int | None:
    """Peak resident growth (bytes, :func:`peak_meter` on the CPU) of one call of ``fn``,
    after a first call as warm-up (lazy initialisations are not the call's cost)."""
    fn()
    gc.collect()
    start, stop = peak_meter("cpu")
    base = start()
    fn()
    return stop(base)


def command() -> str:
    """The command line of this process: ``python -m <module> ...`` for a script run as a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return " ".join(["python", "-m", spec.name, *sys.argv[1:]])
    return "python " + " ".join(sys.argv)


def module_command(module: str, argv: list[str]) -> tuple[list[str], dict]:
    """``(command, environment)`` that run benchmark ``module`` (``benchmarks.perf.x``) with
    ``argv`` in a fresh process, from any working directory."""
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}
    return [sys.executable, "-m", module, *argv], env


def finish(lines: list[str], rows, out: str | None) -> str:
    """Print the table ``lines`` and, with ``out``, write it with ``rows`` (:func:`write_results`)."""
    table = "\n".join(lines)
    print(table)
    if out:
        write_results(out, rows, table)
    return table


def write_results(path: str, rows: list[dict], table: str) -> None:
    """JSON with ``command``, ``machine`` (platform, cores, torch threads, load when written, GPU),
    ``versions``, ``rows`` and the printed ``table``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(
            {
                "command": command(),
                "machine": {**machine(), "torch": torch.__version__},
                "versions": versions(),
                "rows": rows,
                "table": table,
            },
            fh,
            indent=1,
        )


def best_time(fn, repeat: int) -> float:
    """The fastest of ``repeat`` calls of ``fn`` (seconds), each after a garbage collection."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc), so that a
    resident-memory peak measured next starts from what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: freed memory may stay, the peaks undercount
        pass


def cpu_peak(fn) -> int | None:
    """Resident-memory peak (bytes) of one call of ``fn`` above the level before it, after
    :func:`release_memory` (``None`` where :func:`peak_meter` has no meter)."""
    release_memory()
    start, stop = peak_meter("cpu")
    base = start()
    fn()
    return stop(base)


def child_peak_mib(module: str, argv: list[str], mmap_threshold: int = 65536) -> float | None:
    """Run benchmark ``module`` with ``argv`` in a fresh single-threaded process whose last
    printed line is a JSON peak in bytes (or ``null``); that peak in MiB. glibc's mmap
    threshold is fixed at ``mmap_threshold`` bytes there, so that freed large blocks leave
    the resident set."""
    cmd, env = module_command(module, argv)
    env = {**env, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    value = json.loads(out.stdout.strip().splitlines()[-1])
    return None if value is None else value / 2**20
