"""Every name a benchmark script imports from the project exists.

The scripts run only on a leased GPU machine, so a rename in the package (a private helper made
public, say) would otherwise surface there, costing the lease. This checks the imports without
running the scripts.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PROJECT = ("pipeline", "stages", "benchmarks")


def project_imports(script: Path) -> list[tuple[str, str]]:
    """(module, name) of each `from <project module> import name` in the script."""
    tree = ast.parse(script.read_text(), filename=str(script))
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT
        for alias in node.names
    ]


@pytest.mark.parametrize("script", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_project_names_a_benchmark_imports_exist(script: Path) -> None:
    missing = []
    for module_name, name in project_imports(script):
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"{script.name} imports names that do not exist: {missing}"
