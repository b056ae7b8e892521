"""ruff and mypy --strict are part of the suite (configuration in pyproject.toml)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_linter(argv: list[str]) -> None:
    tool = BIN / argv[0]
    assert tool.exists(), f"{tool} missing: run `make venv`"
    proc = subprocess.run(
        [str(tool), *argv[1:]],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# --- import layering (design §4; BRIEF: "Layering") ---------------------------------------
#
# Every import counts: module level, inside functions (lazy), under TYPE_CHECKING.  A
# package may import nothing from the packages listed for it; the module graph must have
# no cycle (a cycle "broken" by a lazy import is still one: core.py <-> status.py was).

PACKAGE = REPO_ROOT / "kmodd"
_ALL = frozenset({"kmod", "bpf", "policy", "contract", "host", "daemon", "cli"})
FORBIDDEN: dict[str, frozenset[str]] = {
    "helper": _ALL | {"", "errors", "paths", "wire", "atomic"},  # stdlib only
    "bootpublish": _ALL | {"", "errors", "paths", "wire", "atomic"},  # stdlib only, at boot
    "kmod": frozenset({"policy", "contract", "host", "daemon", "cli"}),
    "bpf": frozenset({"policy", "contract", "host", "daemon", "cli"}),
    "policy": frozenset({"contract", "host", "daemon", "cli"}),
    "contract": frozenset({"host", "daemon", "cli"}),
    "host": frozenset({"contract", "daemon", "cli"}),
    "cli": frozenset({"daemon"}),
    "daemon": frozenset({"cli"}),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, known: frozenset[str]) -> set[str]:
    """The kmodd modules SOURCE imports (KNOWN: every module, to tell `from kmodd.daemon
    import status` (a module) from `from kmodd.errors import KmoddError` (a name))."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kmodd")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "kmodd":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(sources: dict[str, str]) -> list[str]:
    """Every forbidden edge and every cycle among SOURCES (module name -> its source)."""
    known = frozenset(sources)
    graph = {m: imported(text, known) for m, text in sources.items()}
    out = [
        f"{m} imports {dep}"
        for m, deps in sorted(graph.items())
        for dep in sorted(deps)
        if layer(dep) in FORBIDDEN.get(layer(m), frozenset())
    ]
    return out + [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(m: str) -> None:
        if m in path:
            found.append([*path[path.index(m) :], m])
            return
        if m in done or m not in graph:
            return
        path.append(m)
        for dep in sorted(graph[m]):
            if not dep.startswith(m + "."):  # a package importing its own submodule
                visit(dep)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    return found


def tree_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_import_layering() -> None:
    assert violations(tree_sources()) == []


LEAKS_OF_B77533E = {  # what the reviews found at b77533e: each must be caught
    "cli.recorded -> daemon.journal": {
        "kmodd.cli.recorded": "from kmodd.daemon.journal import IDENTIFIER, MessageId\n",
    },
    "cli.explain -> daemon.attribution (lazy)": {
        "kmodd.cli.explain": "def attribution():\n"
        "    from kmodd.daemon.attribution import probe  # noqa: PLC0415\n",
    },
    "cli.install -> daemon.modprobe_path (TYPE_CHECKING)": {
        "kmodd.cli.install": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from kmodd.daemon.modprobe_path import ModprobePath\n",
    },
    "daemon.core <-> daemon.status": {
        "kmodd.daemon.core": "def control():\n    from kmodd.daemon import status\n",
        "kmodd.daemon.status": "if TYPE_CHECKING:\n    from kmodd.daemon.core import Core\n",
    },
    "helper -> kmodd": {"kmodd.helper": "from kmodd.errors import KmoddError\n"},
    "policy -> daemon": {"kmodd.policy.engine": "import kmodd.daemon.records\n"},
    "kmod -> policy": {"kmodd.kmod.context": "from kmodd.policy import engine\n"},
}


@pytest.mark.parametrize("leak", list(LEAKS_OF_B77533E))
def test_import_layering_catches_each_leak(leak: str) -> None:
    sources = tree_sources() | LEAKS_OF_B77533E[leak]
    for module in LEAKS_OF_B77533E[leak]:
        sources.setdefault(module, "")
    sources |= {"kmodd.daemon.journal": "", "kmodd.daemon.attribution": ""}
    sources |= {"kmodd.daemon.modprobe_path": "", "kmodd.daemon.records": ""}
    assert violations(sources), leak
