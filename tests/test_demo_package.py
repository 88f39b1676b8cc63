"""The demo is its own package: the gateway never imports it, and it has no import cycles.

``stepup_demo`` depends on the product (``gateway``), never the other way round:
``stepup-gateway demo`` finds it at run time (``importlib``), so the gateway installs
and runs without it. Both checks read the source (the AST), so an import inside a
function or under ``if TYPE_CHECKING:`` counts as much as one at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = "stepup_demo"


def imports(source: str, module: str) -> Iterator[tuple[str, str | None]]:
    """Every import in ``source`` (the text of ``module``): (module, name imported from it).

    ``import a.b`` gives ("a.b", None); ``from a import b`` gives ("a", "b"), where ``b``
    may be a submodule; relative imports are resolved against ``module``'s package.
    """
    package = module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            yield from ((base, alias.name) for alias in node.names)


def imported_modules(source: str, module: str) -> Iterator[str]:
    """The dotted names ``source`` imports; ``from a import b`` gives ``a`` and ``a.b``."""
    for base, name in imports(source, module):
        yield base
        if name is not None:
            yield f"{base}.{name}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_demo(name: str) -> bool:
    return name == DEMO or name.startswith(f"{DEMO}.")


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import stepup_demo", True),
        ("import stepup_demo.idp as idp", True),
        ("from stepup_demo import pages", True),
        ("from stepup_demo.bank import DemoBank", True),
        ("def f():\n    from stepup_demo import main", True),
        ("if TYPE_CHECKING:\n    import stepup_demo.factors", True),
        ("import gateway.demo_helpers", False),
        ("from gateway import stepup", False),
        ("from . import stepup_demo_like", False),
    ],
)
def test_the_import_finder_sees_every_form(source: str, found: bool) -> None:
    names = list(imported_modules(source, "gateway.cli"))
    assert any(imports_demo(name) for name in names) is found, names


def test_nothing_in_gateway_imports_the_demo() -> None:
    modules = sorted((ROOT / "gateway").rglob("*.py"))
    assert len(modules) > 10  # the walk found the package
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules
        for name in imported_modules(path.read_text(encoding="utf-8"), module_name(path))
        if imports_demo(name)
    ]
    assert offenders == []


def demo_import_graph() -> dict[str, set[str]]:
    """stepup_demo module -> the stepup_demo modules it imports.

    ``from stepup_demo import pages`` depends on the submodule ``stepup_demo.pages``,
    not on the package's ``__init__``.
    """
    files = {module_name(path): path for path in (ROOT / DEMO).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for base, name in imports(path.read_text(encoding="utf-8"), module):
            submodule = f"{base}.{name}" if name is not None else None
            target = submodule if submodule in files else base
            if target in files and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the path that closes it (depth-first search)."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_the_cycle_finder_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_demo_has_no_import_cycles() -> None:
    graph = demo_import_graph()
    assert {"stepup_demo.idp", "stepup_demo.idp_core", "stepup_demo.backchannel"} <= set(graph)
    assert "stepup_demo.idp_core" in graph["stepup_demo.idp"]  # the graph has edges
    assert "stepup_demo.backchannel" in graph["stepup_demo.idp_core"]
    assert cycles(graph) == []


def run_cli(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_gateway_loads_without_the_demo() -> None:
    """Every gateway module imports with stepup_demo unimportable, and none loads it."""
    result = run_cli(
        "import pkgutil, sys, importlib\n"
        "sys.modules['stepup_demo'] = None  # importing it now raises ModuleNotFoundError\n"
        "import gateway\n"
        "modules = pkgutil.walk_packages(gateway.__path__, 'gateway.')\n"
        "names = [m.name for m in modules if m.name != 'gateway.__main__']  # it runs main()\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 10


def test_demo_without_the_demo_package_is_one_clear_line() -> None:
    result = run_cli(
        "import sys\n"
        "sys.modules['stepup_demo'] = None  # as if not installed\n"
        "from gateway.cli import main\n"
        "sys.exit(main(['demo', '--port', '0']))\n"
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: the demo is not installed (no package 'stepup_demo')")
    assert "pip install ." in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
