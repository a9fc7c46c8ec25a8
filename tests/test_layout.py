"""Package layout: the dependency arrows run one way, down the written layer order.

:data:`LAYERS` is the layer order of the package, written once (CONTRIBUTING.md and
docs/architecture.md show it): a module imports only modules of its own layer or of the
layers before it. Within a layer, the imports form no circle; the whole package, the
application included, forms none. The core (``laplace_llm`` outside ``laplace_llm.app``)
never imports the application subpackage, and no core module imports the package root
(``laplace_llm/__init__.py`` imports the public names from them). Imports inside
functions count.
"""

import ast
import subprocess
import sys
from pathlib import Path

import laplace_llm

PACKAGE = Path(laplace_llm.__file__).parent

#: The layer order, lowest first: each entry names the top-level modules or subpackages of
#: ``laplace_llm`` of one layer ("" is the package root, the public API).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "options", "progress", "signals"),
    ("matrix",),
    ("data", "checks"),
    ("serialization",),
    ("distributed", "sharding", "digests"),
    ("models",),
    ("curvature",),
    ("prior",),
    ("posterior",),
    ("tools",),
    ("callback",),
    ("",),
    ("app",),
]

#: Modules kept only so that an old import path still works: each re-exports the names of
#: the module it names, which may stand in a higher layer. They hold nothing but imports
#: and ``__all__``, and no module of the package imports them.
OLD_PATHS: dict[str, str] = {
    "laplace_llm.models.generation": "laplace_llm.posterior.generation",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_in(source: str, name: str, is_package: bool, modules=None) -> set[str]:
    """The modules of ``modules`` that the source of module ``name`` imports, at module
    level or inside functions (``from a import b`` counts as ``a.b`` when that is a module,
    else as ``a``)."""
    modules = MODULES if modules is None else modules
    out = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules)
    out.discard(name)
    return out


def imports_of(name: str) -> set[str]:
    """The package's modules that module ``name`` imports."""
    path = MODULES[name]
    return imports_in(path.read_text(), name, path.name == "__init__.py")


def layer_of(name: str) -> int:
    """Index in :data:`LAYERS` of module ``name`` (``ValueError`` if it has none)."""
    parts = name.split(".")
    assert parts[0] == "laplace_llm", name
    top = parts[1] if len(parts) > 1 else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise ValueError(f"{name} is in no layer of LAYERS: add {top!r} to one")


def inversions(graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``graph`` (module → modules it imports) that run up the layer order."""
    return [f"{n} (layer {layer_of(n)}) imports {m} (layer {layer_of(m)})"
            for n in sorted(graph) for m in sorted(graph[n])
            if n not in OLD_PATHS and layer_of(m) > layer_of(n)]


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


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)
    tops = {n.split(".")[1] for n in MODULES if n != "laplace_llm"} | {""}
    named = {t for layer in LAYERS for t in layer}
    assert named <= tops, named - tops


def test_no_import_runs_up_the_layer_order():
    bad = inversions({n: imports_of(n) for n in MODULES})
    assert not bad, "imports against LAYERS:\n" + "\n".join(bad)


def test_the_layer_check_finds_a_planted_inversion():
    # a low module (matrix) importing the posterior, once at module level, once in a function
    source = ("import torch\n"
              "from laplace_llm.posterior.base import LoRALaplaceBase\n"
              "def f():\n"
              "    from laplace_llm.tools import metrics\n"
              "    from .errors import NonFiniteError\n")
    modules = {"laplace_llm.matrix", "laplace_llm.posterior.base", "laplace_llm.tools",
               "laplace_llm.tools.metrics", "laplace_llm.errors"}
    found = imports_in(source, "laplace_llm.matrix", False, modules)
    assert found == {"laplace_llm.posterior.base", "laplace_llm.tools.metrics",
                     "laplace_llm.errors"}
    bad = inversions({"laplace_llm.matrix": found})
    assert len(bad) == 2 and "posterior.base" in bad[0] and "tools.metrics" in bad[1]
    # the same imports from the top of the order are fine
    assert not inversions({"laplace_llm.app.cli": found})


def test_old_paths_only_re_export_and_nothing_imports_them():
    for old, new in OLD_PATHS.items():
        tree = ast.parse(MODULES[old].read_text())
        for node in tree.body:
            assert isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign)), (
                f"{old} holds more than re-exports")
            if isinstance(node, ast.Assign):
                assert [t.id for t in node.targets] == ["__all__"]
        assert imports_of(old) == {new}
        users = [n for n in MODULES if old in imports_of(n)]
        assert not users, f"{users} import the old path {old}; import {new}"


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
