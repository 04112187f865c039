"""Write requirements.lock: the exact versions, installed in this environment, of everything segldm needs.

The set is the closure of pyproject.toml's dependencies and all its extras (dev, loggers, diffusers: what
`make test` and CI run), each pinned to the version installed here; segldm itself is left out (the
Makefile installs it with `pip install --no-deps -e .` after the lock). Nothing else installed by hand
enters. After changing a dependency: install the new set into .venv, then

    .venv/bin/python experiments/lock/write_lock.py            # rewrite requirements.lock (make lock)
    .venv/bin/python experiments/lock/write_lock.py --check    # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
HEADER = """\
# The exact set `make` installs (pip install -r requirements.lock, then pip install --no-deps -e .):
# pyproject.toml's dependencies and all its extras, resolved for Linux x86_64, CPython 3.11, as tested.
# Written by experiments/lock/write_lock.py (make lock) from the .venv it ran in; do not edit by hand.
# torch and torchvision come from the wheel indexes pip is configured with (pip config list).
"""


def declared(pyproject: Path) -> list[Requirement]:
    """pyproject.toml's dependencies plus every optional-dependencies group."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [
        Requirement(r) for r in [*project["dependencies"], *(r for group in extras.values() for r in group)]
    ]


def closure(roots: list[Requirement]) -> dict[str, str]:
    """name -> installed version of every distribution the roots need here (markers evaluated)."""
    env = default_environment()
    pinned: dict[str, str] = {}
    expanded: set[tuple[str, str]] = set()  # (distribution, extra) whose requirements are queued
    todo = [(r, "") for r in roots]
    problems = []
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req} is needed but not installed in {sys.prefix}: pip install it first")
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{req} is needed but {dist.version} is installed")
        name = canonicalize_name(req.name)
        pinned[name] = dist.version
        for wanted in ["", *req.extras]:
            if (name, wanted) not in expanded:
                expanded.add((name, wanted))
                todo += [(Requirement(sub), wanted) for sub in dist.requires or []]
    if problems:
        raise SystemExit("cannot write the lock:\n  " + "\n  ".join(sorted(set(problems))))
    pinned.pop("segldm", None)
    return pinned


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when requirements.lock differs")
    args = parser.parse_args()
    text = render(closure(declared(ROOT / "pyproject.toml")))
    if args.check:
        same = LOCK.is_file() and LOCK.read_text() == text
        print(f"{LOCK.name} is {'current' if same else 'stale: run experiments/lock/write_lock.py'}")
        return 0 if same else 1
    LOCK.write_text(text)
    print(f"wrote {LOCK} ({len(text.splitlines()) - HEADER.count(chr(10))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
