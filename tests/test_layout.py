"""The shape of the code: no import cycles inside parity/ and reference/ (function-level imports
count too: a cycle deferred to call time is still a cycle), every subcommand's arguments in one
CLI module, and comments and docstrings that explain the code rather than cite the tracker."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("parity", "reference")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    return out


def packages() -> set[str]:
    return {m for m, p in modules().items() if p.stem == "__init__"}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of this project that `name` imports anywhere in its body."""
    pkg = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                                + ([base] if base else []))
            cands = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in cands if c in known and c != name}
    return out


def test_no_import_cycles():
    mods = modules()
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    # importing a module goes through its packages' __init__ (docstrings only, but for
    # parity.subjects, whose __init__ is the subject runner): keep those edges, except a
    # module's own ancestors, which Python initialises first anyway
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_detector_sees_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: a deferred import that closes a loop is found."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from .b import g\n")
    assert imports("parity.a", a, {"parity.a", "parity.b"}) == {"parity.b"}
    assert "parity.engine" in packages() and "parity.subjects" in packages()


def test_every_subcommand_argument_is_defined_in_the_cli_module():
    where = {str(p.relative_to(ROOT)) for p in (ROOT / "parity").rglob("*.py")
             if re.search(r"\.add_argument\(", p.read_text())}
    assert where == {"parity/cli.py"}, where


def test_every_pytest_option_is_defined_in_the_plugin_module():
    """The `pytest --parity-*` options are pytest's, not the `parity` command's: pytest owns
    their parser and asks for them through the plugin's own `pytest_addoption` hook, and the
    plugin, loaded in every pytest run of the environment, must not import the CLI module's
    dependencies. So they live in one other place, the plugin module, and its gate options
    mirror `parity gate`'s (tests/test_pytest_plugin.py pins that)."""
    where = {str(p.relative_to(ROOT)) for p in (ROOT / "parity").rglob("*.py")
             if re.search(r"\.addoption\(", p.read_text())}
    assert where == {"parity/pytest_plugin.py"}, where


@pytest.mark.parametrize("pkg", PACKAGES)
def test_code_does_not_cite_the_tracker(pkg):
    hits = [f"{p.name}:{n}" for p in sorted((ROOT / pkg).rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"\bissues? \d+\b", line, re.IGNORECASE)]
    assert not hits, hits
