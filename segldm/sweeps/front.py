"""`python -m segldm.report <eval multirun folder>`: the quality/alignment front of an evaluation sweep.

An eval multirun (``python -m segldm.eval -m ckpt=... eval.guidance_scale=1,2 eval.sampler=ddim,dpm_solver++``)
leaves one ``metrics.json`` per job folder. This reads them, draws FID against mIoU (any two metric keys:
``--x`` / ``--y``) with both bootstrap intervals as error bars, marks the Pareto front, and writes
``front.png`` and ``front.md`` (the table, Pareto rows starred) into ``<folder>/report``.

Which way is better comes from each run's ``metrics.json["directions"]`` (declared by the metric
classes), never from a metric's name. Runs whose protocol cards differ (``protocol_card.card_key``:
dataset, N, resolution, metric implementations and weights, mask perturbation) are not comparable: they
are refused in one plot, naming what differs; ``--by-card`` draws one plot per card instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from segldm.sweeps.report import ReportError, markdown_table, parse_overrides

METRICS_FILE = "metrics.json"
# what segldm.evaluation.protocol.card_key hashes, file locations left out as it leaves them out (that
# module is a sibling layer of this one: not imported)
CARD_FIELDS = (
    "protocol",
    "dataset",
    "num_samples",
    "resolution",
    "image_format",
    "metrics",
    "mask_perturbation",
)
LOCATION_KEYS = ("path", "weights", "source", "real_features_cache")


@dataclass
class EvalRun:
    """One job of an eval multirun: its folder, the overrides it was started with, its metrics.json."""

    name: str
    folder: Path
    overrides: dict[str, str]
    metrics: dict[str, Any]

    @property
    def card(self) -> dict[str, Any]:
        return self.metrics.get("protocol_card") or {}

    @property
    def card_key(self) -> str:
        return str(self.card.get("card_key", "no card"))

    def value(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    def interval(self, key: str) -> tuple[float, float] | None:
        bounds = (self.metrics.get("bootstrap") or {}).get(key)
        return (float(bounds[0]), float(bounds[1])) if bounds else None


# ------------------------------------------------------------------------------------- the front
def pareto_front(points: Sequence[Sequence[float | None]], directions: Sequence[str]) -> list[bool]:
    """Which points no other point dominates (at least as good on every axis, better on one).

    ``directions[i]`` is ``"minimize"`` or ``"maximize"`` for axis i; a point with a missing or
    non-finite coordinate is never on the front (and dominates nothing)."""
    for direction in directions:
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"direction {direction!r}: expected 'minimize' or 'maximize'")
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    scored = [
        None
        if any(v is None or not math.isfinite(v) for v in point)
        else [s * float(v) for s, v in zip(signs, point, strict=True)]
        for point in points
    ]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(
            x > y for x, y in zip(a, b, strict=True)
        )

    return [
        p is not None and not any(q is not None and dominates(q, p) for q in scored if q is not p)
        for p in scored
    ]


# ------------------------------------------------------------------------------------- reading
def is_eval_multirun(path: Path) -> bool:
    """A folder whose job folders hold eval's metrics.json (a ``segldm.eval -m`` sweep)."""
    return path.is_dir() and any(path.glob(f"*/{METRICS_FILE}"))


def load_eval_runs(folder: Path) -> tuple[list[EvalRun], list[str]]:
    """The jobs with a metrics.json (job-number order), and the names of job folders without one."""
    jobs = sorted(
        {p.parent for p in folder.glob(f"*/{METRICS_FILE}")} | {p.parent for p in folder.glob("*/.hydra")},
        key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
    )
    runs, missing = [], []
    for job in jobs:
        if not (job / METRICS_FILE).is_file():
            missing.append(job.name)
            continue
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        metrics = json.loads((job / METRICS_FILE).read_text())
        runs.append(EvalRun(job.name, job, parse_overrides(overrides or []), metrics))
    if not runs:
        raise ReportError(
            f"{folder} holds no */{METRICS_FILE}; give the folder of a `python -m segldm.eval -m ...` run"
        )
    return runs, missing


def directions_of(runs: Sequence[EvalRun], keys: Sequence[str]) -> list[str]:
    """Each key's direction as the runs' metrics.json declare it (all runs must agree)."""
    out = []
    for key in keys:
        declared = {run.metrics.get("directions", {}).get(key) for run in runs}
        if None in declared or len(declared) != 1:
            raise ReportError(
                f'metrics.json["directions"][{key!r}] is {"missing in some runs" if None in declared else "not the same in every run"} '
                f"({sorted(map(str, declared))}); the front needs each axis' direction as the metric declared it "
                "(re-run those evaluations with the current segldm.eval)"
            )
        out.append(declared.pop())
    return out


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A card's fields as dotted keys, without file locations (the same weights elsewhere are the same)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in LOCATION_KEYS and isinstance(v, str | None):
                continue
            if k in LOCATION_KEYS and isinstance(v, Mapping):  # of a location mapping only its sha256s count
                v = {name: digest for name, digest in v.items() if "sha256" in str(name)}
            out |= flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


def card_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """What two protocol cards' keys are made of and they do not share: 'num_samples: 64 vs 256'."""
    left = flat({k: a.get(k) for k in CARD_FIELDS})
    right = flat({k: b.get(k) for k in CARD_FIELDS})
    return [
        f"{key}: {json.dumps(left.get(key), default=str)} vs {json.dumps(right.get(key), default=str)}"
        for key in sorted(set(left) | set(right))
        if left.get(key) != right.get(key)
    ]


def group_by_card(runs: Sequence[EvalRun]) -> dict[str, list[EvalRun]]:
    groups: dict[str, list[EvalRun]] = {}
    for run in runs:
        groups.setdefault(run.card_key, []).append(run)
    return groups


def mixed_cards_error(groups: Mapping[str, Sequence[EvalRun]]) -> ReportError:
    keys = list(groups)
    first = groups[keys[0]][0]
    lines = []
    for key in keys[1:]:
        other = groups[key][0]
        diff = card_difference(first.card, other.card) or ["(the cards' fields agree: an older card key?)"]
        lines.append(
            f"job {first.name} (card {keys[0]}) vs job {other.name} (card {key}): " + "; ".join(diff)
        )
    return ReportError(
        f"these runs have {len(keys)} different protocol cards, so their numbers do not stand in one plot:\n  "
        + "\n  ".join(lines)
        + "\npass --by-card for one plot per card, or report the runs of one card"
    )


# ------------------------------------------------------------------------------------- output
def varying_overrides(runs: Sequence[EvalRun]) -> list[str]:
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    return [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]


def value_text(run: EvalRun, key: str, digits: int) -> str:
    value, interval = run.value(key), run.interval(key)
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return text if interval is None else f"{text} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def axis_label(key: str, direction: str) -> str:
    return f"{key} ({'lower' if direction == 'minimize' else 'higher'} is better)"


def plot_front(
    runs: Sequence[EvalRun],
    on_front: Sequence[bool],
    keys: Sequence[str],
    directions: Sequence[str],
    path: Path,
    title: str,
) -> Path:
    """x against y with bootstrap intervals as error bars; Pareto points starred and joined; each point
    labelled with its job, whose swept settings are listed beside the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, y_key = keys
    labels_keys = varying_overrides(runs)
    fig, ax = plt.subplots(figsize=(10, 5.6))
    for run, best in zip(runs, on_front, strict=True):
        x, y = run.value(x_key), run.value(y_key)
        if x is None or y is None:
            continue
        xi, yi = run.interval(x_key), run.interval(y_key)
        xerr = [[x - xi[0]], [xi[1] - x]] if xi else None
        yerr = [[y - yi[0]], [yi[1] - y]] if yi else None
        ax.errorbar(
            x,
            y,
            xerr=xerr,
            yerr=yerr,
            fmt="*" if best else "o",
            ms=13 if best else 6,
            color="tab:red" if best else "tab:blue",
            ecolor="grey",
            elinewidth=0.8,
            capsize=2,
        )
        ax.annotate(run.name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = sorted(
        (run.value(x_key), run.value(y_key)) for run, best in zip(runs, on_front, strict=True) if best
    )
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), ls="--", lw=1, color="tab:red", label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel(axis_label(x_key, directions[0]))
    ax.set_ylabel(axis_label(y_key, directions[1]))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    legend = [
        f"{'*' if best else ' '}{run.name:>3}: {', '.join(run.overrides.get(k, '-') for k in labels_keys)}"
        for run, best in zip(runs, on_front, strict=True)
    ]
    heading = "job: " + ", ".join(k.rsplit(".", 1)[-1] for k in labels_keys)
    fig.text(0.74, 0.95, "\n".join([heading, *legend]), va="top", ha="left", fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0, 0.73, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def front_table(runs: Sequence[EvalRun], on_front: Sequence[bool], keys: Sequence[str], level: str) -> str:
    swept = varying_overrides(runs)
    header = ["job", *swept, *(f"{k} [{level}]" for k in keys), "UNet evals / image", "Pareto"]
    rows = []
    for run, best in zip(runs, on_front, strict=True):
        sampler = run.metrics.get("sampler") or {}
        rows.append(
            [
                run.name + (" *" if best else ""),
                *[run.overrides.get(k, "-") for k in swept],
                *[
                    value_text(run, k, 2 if run.metrics.get("directions", {}).get(k) == "minimize" else 4)
                    for k in keys
                ],
                f"{sampler.get('unet_evaluations_per_image', '–')}",
                "yes" if best else "",
            ]
        )
    return markdown_table(header, rows)


def write_front(
    folder: Path, out_dir: Path, keys: Sequence[str] = ("fid", "miou"), by_card: bool = False
) -> dict[str, Any]:
    """Read the eval multirun in ``folder``; write front.png (one per card with ``by_card``) and front.md."""
    runs, missing = load_eval_runs(folder)
    groups = group_by_card(runs)
    if len(groups) > 1 and not by_card:
        raise mixed_cards_error(groups)
    directions = directions_of(runs, keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Quality / alignment front of `{folder}`", ""]
    lines += [
        f"{len(runs)} evaluations; axes {keys[0]} ({directions[0]}) and {keys[1]} ({directions[1]}), directions as "
        "each metrics.json declares them. Starred rows (*) are on the Pareto front: no other run is at least as "
        "good on both axes and better on one. Brackets: the runs' bootstrap intervals.",
        "",
    ]
    if missing:
        lines += [f"Job folders without metrics.json (failed or unfinished): {', '.join(missing)}.", ""]
    files, fronts = [], {}
    for index, (key, group) in enumerate(groups.items()):
        on_front = pareto_front([[run.value(k) for k in keys] for run in group], directions)
        fronts[key] = [run.name for run, best in zip(group, on_front, strict=True) if best]
        card = group[0].card
        boot = group[0].metrics.get("bootstrap") or {}
        level = f"{100 * boot['level']:.0f} % CI" if boot.get("level") and boot.get("draws") else "no CI"
        name = "front.png" if len(groups) == 1 else f"front_{key}.png"
        perturbation = card.get("mask_perturbation")
        title = f"{card.get('dataset')}, N {card.get('num_samples')}, card {key}" + (
            f", masks: {perturbation['name']}" if perturbation else ""
        )
        files.append(plot_front(group, on_front, keys, directions, out_dir / name, title))
        if len(groups) > 1:
            lines += [
                f"## Card `{key}`"
                + (
                    f" (differs from the first: {'; '.join(card_difference(groups[next(iter(groups))][0].card, card))})"
                    if index
                    else ""
                ),
                "",
            ]
        lines += [
            f"Protocol {card.get('protocol') or 'none'} on {card.get('dataset')}, N {card.get('num_samples')}, "
            f"card key `{key}`"
            + (
                f", conditioning masks perturbed: {perturbation['name']} {perturbation['params']}"
                if perturbation
                else ""
            )
            + ".",
            "",
            front_table(group, on_front, keys, level),
            "",
            f"![{keys[0]} against {keys[1]}]({name})",
            "",
        ]
    md = out_dir / "front.md"
    md.write_text("\n".join(lines))
    files.append(md)
    return {"files": files, "fronts": fronts, "runs": runs, "missing": missing}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segldm.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, help="the folder of a `python -m segldm.eval -m ...` multirun")
    parser.add_argument("--x", default="fid", help="metrics.json key on the x axis (default fid)")
    parser.add_argument("--y", default="miou", help="metrics.json key on the y axis (default miou)")
    parser.add_argument(
        "--by-card", action="store_true", help="runs of different protocol cards: one plot per card"
    )
    parser.add_argument("--out", type=Path, help="output folder (default <folder>/report)")
    args = parser.parse_args(argv)
    try:
        made = write_front(args.target, args.out or args.target / "report", (args.x, args.y), args.by_card)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, names in made["fronts"].items():
        print(f"card {key}: Pareto front {', '.join(names) or '(none)'}")
    print("report: " + ", ".join(str(f) for f in made["files"]), flush=True)
    return 0


__all__ = [
    "EvalRun",
    "card_difference",
    "is_eval_multirun",
    "load_eval_runs",
    "main",
    "pareto_front",
    "write_front",
]
