"""``python benchmarks/paper_table.py …`` runs :mod:`benchmarks.quality.paper_table`.

The comparison lives in ``benchmarks/quality/`` and runs as a module
(``python -m benchmarks.quality.paper_table``); this file keeps the path the issue and
older notes give working. It puts the repository root first on the import path, which
running a file by path does not.
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    runpy.run_module("benchmarks.quality.paper_table", run_name="__main__", alter_sys=True)
