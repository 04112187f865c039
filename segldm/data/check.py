"""`python -m segldm.data.check data=<...>`: scan a dataset before spending GPU days on it.

Builds each split from the same `data` config training uses, then reads every image and mask at
full size (in `data.num_workers` processes): counts, missing and unpaired files, unreadable
images, image/mask size mismatches, labels outside [0, n_labels) other than the ignore label, and
a label histogram. Prints a summary table and exits with status 1 when anything would fail (or be
skipped in) training. `mode=headers` reads only each file's header (existence, pairing, decodable
header, image/mask sizes), in seconds per 10k files.

The scan itself (`open_split`, `inspect_results`, `record`) is also what training runs at start-up
(`data.precheck`, segldm/data/precheck.py): one implementation of the checks.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

import segldm  # noqa: F401  (config resolvers)
from segldm.config.locations import hydra_config_path
from segldm.config.startup import reports_startup_errors
from segldm.data.folder import pair_headers
from segldm.data.transforms import (
    MISSING,
    OUT_OF_RANGE,
    SIZE_MISMATCH,
    UNREADABLE,
    SampleError,
)

KINDS = (MISSING, UNREADABLE, SIZE_MISMATCH, OUT_OF_RANGE)
MODES = ("headers", "full")  # what each sample's check reads: file headers, or every pixel
COLUMNS = {
    MISSING: "missing",
    UNREADABLE: "unreadable",
    SIZE_MISMATCH: "size mismatch",
    OUT_OF_RANGE: "bad labels",
}


@dataclass
class SplitReport:
    """What one split's scan found."""

    split: str
    n_labels: int
    samples: int = 0
    checked: int = 0
    counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)
    fatal: str | None = None
    histogram: np.ndarray | None = None
    images_with_label: np.ndarray | None = None
    ignored: int = 0
    out_of_range_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.histogram = np.zeros(self.n_labels, dtype=np.int64)
        self.images_with_label = np.zeros(self.n_labels, dtype=np.int64)

    @property
    def n_errors(self) -> int:
        return sum(self.counts.values()) + (self.fatal is not None)

    def add(self, kind: str | None, message: str) -> None:
        self.counts[kind or UNREADABLE] += 1
        self.problems.append(message)


def inspect_headers(dataset: Any, index: int) -> dict[str, Any]:
    """`inspect` at header level: the files open, sizes agree. Labels are not read (no histogram).

    A dataset with its own header rule (instance maps, part masks: `PairedSegmentation.inspect_headers`)
    is asked; otherwise the pair's image and mask headers are compared here.
    """
    if hasattr(dataset, "inspect_headers"):
        return dataset.inspect_headers(index)
    return pair_headers(dataset.pairs[index])  # any dataset with image/mask `pairs`


def inspect_full(dataset: Any, index: int) -> dict[str, Any]:
    """Every pixel of the pair at full size (no resize or crop): `PairedSegmentation.inspect`."""
    return dataset.inspect(index)


class _Inspect(Dataset):
    """Runs `inspect(dataset, i)` (a module-level function: picklable) in DataLoader workers."""

    def __init__(
        self, dataset: Any, limit: int, inspect: Callable[[Any, int], dict[str, Any]] = inspect_full
    ) -> None:
        self.dataset = dataset
        self.limit = limit
        self.inspect = inspect

    def __len__(self) -> int:
        return self.limit

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.inspect(self.dataset, index)


class _Samples(_Inspect):
    """Fallback for datasets without `inspect` (e.g. synthetic): load each sample, keep its labels."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        report: dict[str, Any] = {"problems": [], "histogram": None, "ignored": 0, "out_of_range": []}
        try:
            sample = self.dataset[index]
        except Exception as err:  # noqa: BLE001 - any failure to load is what the check reports
            report["problems"].append((getattr(err, "kind", UNREADABLE), f"sample {index}: {err}"))
            return report
        labels = sample["label_map"] if "label_map" in sample else sample["segmentation"].argmax(-1)
        flat = np.asarray(labels).reshape(-1).astype(np.int64)
        n_labels = self.dataset.n_labels
        bad = (flat < 0) | (flat >= n_labels)
        if bad.any():
            ids = sorted(set(np.unique(flat[bad]).tolist()))
            report["problems"].append(
                (OUT_OF_RANGE, f"sample {index}: label ids {ids} outside [0, {n_labels})")
            )
            report["out_of_range"] = ids
        report["histogram"] = np.bincount(flat[~bad], minlength=n_labels)
        return report


def _first(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


def _cause(err: BaseException) -> BaseException:
    """The user-facing error inside Hydra's InstantiationException wrapper."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def build_split(node: DictConfig, split: str) -> Any:
    """Instantiate one split, collecting missing files (on_error=skip) instead of stopping at the first."""
    overrides: dict[str, Any] = {}
    target = get_class(node._target_)
    if "on_error" in inspect.signature(target).parameters:
        overrides["on_error"] = "skip"
    return instantiate(node, **overrides)


@contextmanager
def _quiet_skips() -> Iterator[None]:
    """Building with on_error=skip logs 'skipping N samples'; here each one is reported instead."""
    logger = logging.getLogger("segldm.data.folder")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def open_split(data: DictConfig, split: str) -> tuple[SplitReport, Any]:
    """Build `data.<split>` for scanning: its report (missing files, unpaired masks) and the dataset.

    The dataset is None when the split cannot be built at all (`report.fatal` says why).
    """
    report = SplitReport(split, int(data.n_labels))
    node = data.get(split)
    if node is None:
        report.fatal = f"data.{split} is not in this data config"
        return report, None
    try:
        with _quiet_skips():
            dataset = build_split(node, split)
    except Exception as err:  # noqa: BLE001 - reported, then the other splits are still checked
        cause = _cause(err)
        report.fatal = f"{type(cause).__name__}: {cause}"
        if isinstance(cause, SampleError) and cause.kind:
            report.counts[cause.kind] += 1
        return report, None
    for message in getattr(dataset, "skipped", []):
        report.add(MISSING, message)
    if hasattr(dataset, "unpaired_masks"):
        report.unpaired = [str(p) for p in dataset.unpaired_masks()]
    report.samples = len(dataset) + len(getattr(dataset, "skipped", []))
    return report, dataset


def scan_size(dataset: Any, mode: str, limit: int | None = None) -> int:
    """How many samples `inspect_results` will check: header mode needs files (`dataset.pairs`)."""
    if mode == "headers" and not hasattr(dataset, "pairs"):
        return 0  # no files (e.g. data=synthetic): no header to read
    return len(dataset) if limit is None else min(int(limit), len(dataset))


def inspect_results(dataset: Any, mode: str, limit: int | None = None, workers: int = 0) -> Iterator[dict]:
    """Each checked sample's report, in order: headers in this process, full reads in `workers`."""
    if mode not in MODES:
        raise ValueError(f"scan mode {mode!r} is not one of {', '.join(MODES)}")
    n = scan_size(dataset, mode, limit)
    if mode == "headers":
        for index in range(n):
            yield inspect_headers(dataset, index)
        return
    wrapper = _Inspect(dataset, n) if hasattr(dataset, "inspect") else _Samples(dataset, n)
    yield from DataLoader(wrapper, batch_size=1, num_workers=int(workers), collate_fn=_first)


def record(report: SplitReport, result: dict[str, Any]) -> None:
    """Add one sample's check (`inspect_results`) to its split's report."""
    report.checked += 1
    for kind, message in result["problems"]:
        report.add(kind, message)
    if result["histogram"] is not None:
        report.histogram += result["histogram"]
        report.images_with_label += result["histogram"] > 0
    report.ignored += int(result["ignored"])
    report.out_of_range_ids.update(int(v) for v in result["out_of_range"])


def scan_split(cfg: DictConfig, split: str, progress: Progress) -> SplitReport:
    report, dataset = open_split(cfg.data, split)
    if dataset is None:
        return report
    mode = str(cfg.get("mode", "full"))
    task = progress.add_task(f"checking {split}", total=scan_size(dataset, mode, cfg.limit))
    for result in inspect_results(dataset, mode, cfg.limit, int(cfg.workers)):
        record(report, result)
        progress.advance(task)
    return report


def summary_table(reports: list[SplitReport]) -> Table:
    table = Table(title="dataset check")
    for column in ("split", "samples", "checked", *(COLUMNS[k] for k in KINDS), "unpaired masks", "status"):
        table.add_column(column, justify="left" if column in ("split", "status") else "right")
    for r in reports:
        status = "[red]FAILED[/]" if r.n_errors else "[green]ok[/]"
        if r.fatal:
            status = "[red]cannot load[/]"
        table.add_row(
            r.split,
            str(r.samples),
            str(r.checked),
            *(str(r.counts.get(kind, 0)) for kind in KINDS),
            str(len(r.unpaired)),
            status,
        )
    return table


def histogram_table(reports: list[SplitReport], rows: int, class_names: list[str] | None) -> Table | None:
    loaded = [r for r in reports if r.fatal is None and r.histogram is not None]
    if not loaded:
        return None
    total = sum(r.histogram for r in loaded)
    images = sum(r.images_with_label for r in loaded)
    ignored = sum(r.ignored for r in loaded)
    pixels = int(total.sum()) + ignored
    table = Table(title=f"labels (top {rows} by pixels, all splits)")
    for column in ("label", "name", "pixels %", "images"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for label in (int(i) for i in np.argsort(-total, kind="stable")[:rows]):
        if total[label] == 0:
            break
        name = class_names[label] if class_names and label < len(class_names) else ""
        table.add_row(str(label), name, f"{100 * total[label] / max(pixels, 1):.2f}", str(int(images[label])))
    if ignored:
        table.add_row("ignore", "", f"{100 * ignored / max(pixels, 1):.2f}", "")
    return table


def write_json(path: Path, reports: list[SplitReport]) -> None:
    data = {
        r.split: {
            "samples": r.samples,
            "checked": r.checked,
            "counts": dict(r.counts),
            "fatal": r.fatal,
            "problems": r.problems,
            "unpaired_masks": r.unpaired,
            "histogram": r.histogram.tolist(),
            "images_with_label": r.images_with_label.tolist(),
            "ignored_pixels": r.ignored,
            "out_of_range_ids": sorted(r.out_of_range_ids),
        }
        for r in reports
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def run_check(cfg: DictConfig, console: Console | None = None) -> int:
    """Scan the configured splits, print the report; returns the number of errors."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: wide enough for the tables
            console = Console(width=140)
    logging.getLogger("segldm.data").setLevel(logging.ERROR)  # problems are reported below, once
    mode = str(cfg.get("mode", "full"))
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        reports = [scan_split(cfg, split, progress) for split in cfg.splits]
    console.print(summary_table(reports))
    names = cfg.data.get("class_names")
    hist = None
    if mode == "full":  # headers mode reads no labels
        hist = histogram_table(
            reports, int(cfg.histogram_rows), None if names is None else [str(n) for n in names]
        )
    if hist is not None:
        console.print(hist)
        seen = sum(r.histogram for r in reports if r.fatal is None)
        never = [i for i in range(int(cfg.data.n_labels)) if seen[i] == 0]
        if never:
            console.print(
                f"{len(never)} of {cfg.data.n_labels} labels never occur: {never[:40]}{' ...' if len(never) > 40 else ''}"
            )
    n_errors = 0
    for r in reports:
        if r.fatal:
            console.print(f"[red]{r.split}: {r.fatal}[/]", markup=True, highlight=False)
        for message in r.problems[: int(cfg.show_problems)]:
            console.print(f"{r.split}: {message}", markup=False, highlight=False)
        if len(r.problems) > int(cfg.show_problems):
            console.print(f"{r.split}: ... and {len(r.problems) - int(cfg.show_problems)} more problems")
        if r.out_of_range_ids:
            console.print(f"{r.split}: out-of-range label ids: {sorted(r.out_of_range_ids)[:40]}")
        if r.unpaired:
            console.print(
                f"{r.split}: warning: {len(r.unpaired)} masks have no image, first: {r.unpaired[0]}"
            )
        n_errors += r.n_errors
    if cfg.report:
        write_json(Path(cfg.report), reports)
        console.print(f"report written to {cfg.report}")
    if n_errors:
        console.print(
            f"[red]FAILED: {n_errors} problem(s).[/] Fix the files, adjust data.n_labels / data.ignore_label / "
            "data.label_remap, or train with data.on_error=skip to drop such samples (logged and counted)."
        )
    elif mode == "headers":
        console.print(
            "[green]OK[/]: every checked sample exists, pairs, has a readable header and matches in size "
            "(mode=headers: pixels and labels not read; mode=full reads them)."
        )
    else:
        console.print(
            "[green]OK[/]: every checked sample loads, pairs, matches in size and has valid labels."
        )
    return n_errors


@hydra.main(version_base="1.3", config_path=hydra_config_path(), config_name="check")
@reports_startup_errors
def main(cfg: DictConfig) -> None:
    if run_check(cfg):
        sys.exit(1)


if __name__ == "__main__":
    main()
