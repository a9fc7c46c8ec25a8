"""The arguments of the benchmarks, written once.

Each script names the options it takes with their defaults in one call of
:func:`parser`; the type, the help and the form of each option follow from here.
"""

from __future__ import annotations

import argparse

#: The help of the options several scripts take.
HELP = {
    "hidden": "hidden size of the Llama",
    "layers": "its number of layers",
    "vocab": "its vocabulary",
    "seq": "tokens per sequence",
    "n_fit": "sequences the posterior is fitted on",
    "n_kfac": "rank of the low-rank Kronecker factors",
    "targets": "the LoRA modules",
    "repeat": "report the fastest of this many runs",
    "threads": "torch threads",
    "no_memory": "skip the child-process memory runs",
    "quick": "tiny sizes (for the test that runs the script)",
    "tiny": "smallest run (for the test that runs the script)",
    "out": "write the rows, the table, the command and the machine as JSON here",
}


def parser(description: str | None, *, raw: bool = False, **options) -> argparse.ArgumentParser:
    """Return an ``ArgumentParser`` with ``--name`` for each of ``options``.

    ``name=default`` or ``name=dict(**add_argument's keywords)``. The default gives the
    type: a list takes ``nargs="+"`` of its elements' type, ``False`` makes a flag,
    ``None`` or a string a string; ``raw`` keeps the description's line breaks.
    """
    formatter = argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter
    p = argparse.ArgumentParser(description=description, formatter_class=formatter)
    for name, spec in options.items():
        spec = dict(spec) if isinstance(spec, dict) else {"default": spec}
        default = spec.get("default")
        if name in HELP:
            spec.setdefault("help", HELP[name])
        if default is False:
            spec.setdefault("action", "store_true")
        elif isinstance(default, list):
            spec.setdefault("nargs", "+")
            if default and not isinstance(default[0], str):
                spec.setdefault("type", type(default[0]))
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            spec.setdefault("type", type(default))
        p.add_argument("--" + name.replace("_", "-"), **spec)
    return p
