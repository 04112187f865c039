"""What pyproject.toml promises a user: every import declared, console scripts that exist, a current lock.

Building and installing the wheel: tests/integration/test_wheel.py (slow)."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import importlib.util
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files of segldm that import it (absolute imports outside the stdlib)."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "segldm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "segldm":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_declared():
    declared = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    for group in PROJECT.get("optional-dependencies", {}).values():
        declared |= {canonicalize_name(Requirement(r).name) for r in group}
    providers = metadata.packages_distributions()
    undeclared = {
        module: sorted(files)
        for module, files in third_party_imports().items()
        if not {canonicalize_name(d) for d in providers.get(module, [module])} & declared
    }
    assert undeclared == {}, (
        f"declare these in pyproject.toml [project] dependencies (or an extra): {undeclared}"
    )


def test_no_dependency_is_pinned_exactly():
    pinned = [r for r in PROJECT["dependencies"] if "==" in r]
    assert pinned == [], "a range a user's environment can meet (exact versions go in requirements.lock)"


def test_console_scripts_point_at_mains():
    scripts = PROJECT["scripts"]
    assert {"segldm-train", "segldm-eval", "segldm-sample", "segldm-convert", "segldm-report"} <= set(scripts)
    assert "segldm-check" in scripts
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        path = REPO / (module.replace(".", "/") + ".py")
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"{name} = {target}: {path} defines no {function}()"


def test_requirements_lock_is_current():
    """The lock is the installed closure of pyproject.toml; a new or changed dependency needs `make lock`."""
    spec = importlib.util.spec_from_file_location(
        "write_lock", REPO / "experiments" / "lock" / "write_lock.py"
    )
    assert spec is not None and spec.loader is not None
    write_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(write_lock)
    expected = write_lock.render(write_lock.closure(write_lock.declared(REPO / "pyproject.toml")))
    assert (REPO / "requirements.lock").read_text() == expected, "requirements.lock is stale: run make lock"
