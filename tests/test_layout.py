"""Package layout: the dependency arrows run one way.

The core (``laplace_llm`` outside ``laplace_llm.app``) never imports the application
subpackage, no core module imports the package root (``laplace_llm/__init__.py`` imports
the public names from them), and the imports of the whole package, the application included, form no
circle. Imports inside functions count.
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
    assert {"laplace_llm.posterior.base", "laplace_llm.posterior.kron",
            "laplace_llm.posterior.diag", "laplace_llm.posterior.full",
            "laplace_llm.curvature.kfac", "laplace_llm.prior.evidence",
            "laplace_llm.models.classifier", "laplace_llm.tools.metrics",
            "laplace_llm.serialization", "laplace_llm.options", "laplace_llm.app.cli",
            "laplace_llm.app.demo", "laplace_llm.app.evaluation"} <= set(MODULES)
    assert "laplace_llm.serialization" in imports_of("laplace_llm.posterior.base")
    assert "laplace_llm.posterior.base" in imports_of("laplace_llm.posterior.kron")
    assert "laplace_llm.app.evaluation" in imports_of("laplace_llm.app.demo")


def test_the_core_never_imports_the_app():
    for name in CORE:
        upward = {m for m in imports_of(name) if is_app(m)}
        assert not upward, f"{name} imports {sorted(upward)}"


def test_no_core_module_imports_the_package_root():
    # the root imports the public names from the core; the app may use them
    for name in CORE:
        assert "laplace_llm" not in imports_of(name), f"{name} imports laplace_llm"


def find_circle(modules: list[str]) -> list[str] | None:
    """Return an import circle among ``modules`` (a path that ends where it began), or None."""
    graph = {n: imports_of(n) & set(modules) for n in modules}
    state: dict[str, str] = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return path + [n, m]
            if m not in state:
                circle = visit(m, path + [n])
                if circle:
                    return circle
        state[n] = "done"
        return None

    for n in modules:
        if n not in state:
            circle = visit(n, [])
            if circle:
                return circle
    return None


def test_the_package_has_no_import_circle_app_included():
    circle = find_circle(sorted(n for n in MODULES if n != "laplace_llm"))
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_finds_a_circle(monkeypatch):
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    monkeypatch.setattr(sys.modules[__name__], "imports_of", lambda n: fake[n])
    assert find_circle(["a", "b", "c", "d"]) == ["a", "b", "c", "a"]
    fake["c"] = set()
    assert find_circle(["a", "b", "c", "d"]) is None


def test_importing_the_package_loads_no_app_module():
    code = ("import sys, laplace_llm; "
            "print(sorted(m for m in sys.modules if m.startswith('laplace_llm.app')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
