"""Write docs/benchmarks.md: published FID/mIoU per dataset, one table per evaluation protocol, and what
each protocol did (read from conf/eval/protocol/*.yaml).

Numbers computed under different protocols are not comparable, so they never share a table.

    .venv/bin/python experiments/benchmarks/write_table.py          # rewrite docs/benchmarks.md
    .venv/bin/python experiments/benchmarks/write_table.py --check  # exit 1 when the page is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "segldm" / "evaluation" / "published_results.yaml"
PROTOCOL_DIR = ROOT / "conf" / "eval" / "protocol"
PAGE = ROOT / "docs" / "benchmarks.md"
COMMAND = ".venv/bin/python experiments/benchmarks/write_table.py"

DATASETS = {
    "ade20k": "ADE20K",
    "cocostuff": "COCO-Stuff",
    "cityscapes": "Cityscapes",
    "celebamask_hq": "CelebAMask-HQ",
}
PROTOCOLS = ("spade", "oasis", "sdm", "own")
ROW_KEYS = {"method", "dataset", "protocol", "fid", "miou", "source", "notes"}


def cell(value: Any) -> str:
    """A markdown table cell: '-' for null, pipes escaped, one line."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return " ".join(str(value).split()).replace("|", "\\|")


def load_rows(path: Path = RESULTS) -> list[dict[str, Any]]:
    rows = yaml.safe_load(path.read_text()) or []
    for i, row in enumerate(rows):
        where = f"{path} row {i} ({row.get('method')!r})"
        if set(row) != ROW_KEYS:
            raise ValueError(f"{where}: keys {sorted(row)} should be exactly {sorted(ROW_KEYS)}")
        if row["dataset"] not in DATASETS:
            raise ValueError(f"{where}: dataset {row['dataset']!r} is not one of {list(DATASETS)}")
        if row["protocol"] not in PROTOCOLS:
            raise ValueError(f"{where}: protocol {row['protocol']!r} is not one of {list(PROTOCOLS)}")
    return rows


def load_protocols(folder: Path = PROTOCOL_DIR) -> dict[str, dict[str, Any]]:
    protocols = {}
    for path in sorted(folder.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if spec.get("name"):
            protocols[spec["name"]] = spec
    return protocols


def results_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for dataset, title in DATASETS.items():
        lines += [f"## {title} (`data={dataset}`)", ""]
        for protocol in PROTOCOLS:
            chosen = [r for r in rows if r["dataset"] == dataset and r["protocol"] == protocol]
            if not chosen:
                continue
            heading = (
                "own setups (each row its own; not comparable with each other)"
                if protocol == "own"
                else f"protocol `{protocol}`"
            )
            lines += [
                f"**{heading}**",
                "",
                "| method | FID | mIoU | source | notes |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {cell(r['method'])} | {cell(r['fid'])} | {cell(r['miou'])} | {cell(r['source'])} | {cell(r['notes'])} |"
                for r in chosen
            ]
            lines.append("")
    return lines


def protocol_section(protocols: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "## The protocols",
        "",
        "Settings as written in `conf/eval/protocol/<name>.yaml`; the sources of each value are",
        "the comments in that file (repo@commit file:line, issue threads). `-` = not found.",
        "",
    ]
    for name in PROTOCOLS:
        spec = protocols.get(name)
        if spec is None:
            continue
        lines += [f"### `{name}` (`eval/protocol={name}`)", ""]
        lines += [
            f"- {key}: {cell(spec.get(key))}"
            for key in ("paper", "code", "fid_implementation", "image_format", "fid_resize_before_inception")
        ]
        lines += [f"- {cell(note)}" for note in spec.get("notes") or []]
        lines += [
            "",
            "| dataset | size (HxW) | real split | N | real resize | segmenter | mIoU ignores |",
            "|---|---|---|---|---|---|---|",
        ]
        datasets = spec.get("datasets") or {}
        for dataset, s in datasets.items():
            lines.append(
                f"| {dataset} | {cell(s.get('size'))} | {cell(s.get('real_split'))} | {cell(s.get('num_samples'))} "
                f"| {cell(s.get('real_resize'))} | {cell(s.get('segmenter'))} | {cell(s.get('miou_ignore'))} |"
            )
        lines.append("")
        lines += [f"- {dataset}: {cell(s['notes'])}" for dataset, s in datasets.items() if s.get("notes")]
        lines.append("")
    return lines


def page(rows: list[dict[str, Any]], protocols: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Published results on the SIS benchmarks",
        "",
        f"Generated by `{COMMAND}` from `segldm/evaluation/published_results.yaml` and",
        "`conf/eval/protocol/*.yaml`; edit those, not this page.",
        "",
        "Each number was computed under one evaluation protocol (image size, real reference set and its resize,",
        "FID code, segmenter and its settings). Numbers under different protocols are not comparable, so each",
        "dataset has one table per protocol. Most numbers were read on benchmark aggregators or in issue",
        "threads, not in the papers' PDFs: the `source` column says where; check the PDF before citing.",
        "",
    ]
    lines += results_section(rows) + protocol_section(protocols)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/benchmarks.md is not what this script writes"
    )
    args = parser.parse_args()
    text = page(load_rows(), load_protocols())
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
