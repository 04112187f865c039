"""Write the package tree (one line per module: its docstring's first sentence), the benchmark suite's
tree beside it (experiments/bench/, outside the package) and the layers of pyproject.toml's
import-linter contract into docs/architecture.md, between its generated markers.

    .venv/bin/python experiments/architecture/tree.py          # rewrite the generated part
    .venv/bin/python experiments/architecture/tree.py --check  # exit 1 when the page is stale
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- tree:begin (experiments/architecture/tree.py) -->", "<!-- tree:end -->"


def purpose(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    return re.split(r"(?<!\bal)\. ", first)[0].rstrip(".")


BENCH = ROOT / "experiments" / "bench"
BENCH_PURPOSE = (
    "The benchmark suite (`make bench`) beside its results: it imports segldm, segldm never imports it"
)


def tree(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.rglob("*.py"), key=lambda p: (p.parent.parts, p.name != "__init__.py", p.name)):
        rel = path.relative_to(folder.parent)
        name = str(rel.parent) + "/" if path.name == "__init__.py" else str(rel)
        depth = len(rel.parts) - (2 if path.name == "__init__.py" else 1)
        lines.append(
            f"{'  ' * depth}{name.split('/')[-2] + '/' if path.name == '__init__.py' else path.name:<28} {purpose(path)}"
        )
    return lines


def layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    contract = next(c for c in config if c["type"] == "layers")
    return [f"{i + 1}. " + layer.replace("segldm.", "") for i, layer in enumerate(contract["layers"])]


def generated() -> str:
    body = [
        "```",
        *tree(ROOT / "segldm"),
        "```",
        "",
        "Outside the package (not in the wheel):",
        "",
        "```",
        f"{'experiments/bench/':<28} {BENCH_PURPOSE}",
        *tree(BENCH),
        "```",
        "",
        "Layers, top to bottom (`a | b`: independent rooms of one layer):",
        "",
        *layers(),
    ]
    return "\n".join([BEGIN, *body, END])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = PAGE.read_text()
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + generated() + text[stop:]
    if args.check:
        return 0 if new == text else 1
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
