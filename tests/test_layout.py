"""Package layout: the dependency arrows run one way.

The core (``laplace_llm`` outside ``laplace_llm.app``) never imports the application
subpackage, no core module imports the package root (``laplace_llm/__init__.py`` imports
them all), and the core's imports form no circle. Imports inside functions count.
"""

import ast
import subprocess
import sys
from pathlib import Path

import laplace_llm

PACKAGE = Path(laplace_llm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The package's modules that module ``name`` imports (``from a import b`` counts as
    ``a.b`` when that is a module, else as ``a``)."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES)
    out.discard(name)
    return out


def is_app(name: str) -> bool:
    return name == "laplace_llm.app" or name.startswith("laplace_llm.app.")


CORE = sorted(n for n in MODULES if not is_app(n) and n != "laplace_llm")


def test_the_layout_is_what_this_test_reads():
    assert {"laplace_llm.posterior.kron", "laplace_llm.serialization", "laplace_llm.options",
            "laplace_llm.app.cli", "laplace_llm.app.demo", "laplace_llm.app.evaluation"} <= set(MODULES)
    assert "laplace_llm.serialization" in imports_of("laplace_llm.posterior.base")
    assert "laplace_llm.posterior.base" in imports_of("laplace_llm.posterior.kron")
    assert "laplace_llm.app.evaluation" in imports_of("laplace_llm.app.demo")


def test_the_core_never_imports_the_app_or_the_package_root():
    for name in CORE:
        upward = {m for m in imports_of(name) if is_app(m) or m == "laplace_llm"}
        assert not upward, f"{name} imports {sorted(upward)}"


def test_the_core_has_no_import_circle():
    graph = {n: imports_of(n) & set(CORE) for n in CORE}
    state: dict[str, str] = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(graph[n]):
            assert state.get(m) != "open", "import circle: " + " -> ".join(path + [n, m])
            if m not in state:
                visit(m, path + [n])
        state[n] = "done"

    for n in CORE:
        if n not in state:
            visit(n, [])


def test_importing_the_package_loads_no_app_module():
    code = ("import sys, laplace_llm; "
            "print(sorted(m for m in sys.modules if m.startswith('laplace_llm.app')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
