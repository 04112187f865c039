"""The package's layers (docs/architecture.md) hold: import-linter's contracts in pyproject.toml, and
no function-level import of segldm left anywhere in the package (such imports hide cycles)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "segldm"


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") >= 2


def function_level_segldm_imports(path: Path, root: Path = REPO) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                names = []
                if isinstance(inner, ast.ImportFrom) and inner.module:
                    names = [inner.module]
                elif isinstance(inner, ast.Import):
                    names = [a.name for a in inner.names]
                found += [
                    f"{path.relative_to(root)}:{inner.lineno} {n}" for n in names if n.startswith("segldm")
                ]
    return found


def test_no_function_level_imports_of_the_package() -> None:
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in function_level_segldm_imports(path)]
    assert found == [], "import at module level (a cycle means a module is in the wrong room): " + str(found)


def test_the_checker_sees_a_function_level_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import segldm\n\ndef f():\n    from segldm.config import resolvers\n    return resolvers\n"
    )
    assert function_level_segldm_imports(probe, tmp_path) == ["probe.py:4 segldm.config"]


def test_docs_architecture_tree_is_current() -> None:
    script = REPO / "experiments" / "architecture" / "tree.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, f"docs/architecture.md is stale: run {script.relative_to(REPO)}"
