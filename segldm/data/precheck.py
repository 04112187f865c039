"""`data.precheck=off|headers|full`: scan the training and validation files before training starts.

Without it a corrupt, mis-sized or out-of-range file is found only when its batch is loaded, which
can be hours into a run. `precheck_data(cfg.data)` runs right after the config is validated, before
any model is built, and does what `python -m segldm.data.check` does (the same code:
`segldm.data.check.open_split` / `inspect_results` / `record`):

- `headers`: every image and mask exists and pairs, its header decodes (PIL's lazy open, no pixel
  decoded) and the image and mask sizes agree. Seconds per 10k files
  (experiments/precheck/results.md). Then `data.precheck_labels` pairs per split, spread evenly
  over it, have their label ids read, so a dataset whose ids do not fit `data.n_labels` (a wrong
  preset, a wrong label convention) fails here and not at its first batch; rare bad ids in a few
  files need `full`.
- `full`: every file decoded at full size, labels checked against [0, data.n_labels) and the
  ignore label, in `data.num_workers` processes: exactly `segldm.data.check`'s default scan.
- `off`: nothing.

Every problem of both splits is collected first, then one `DataCheckError` counts them, names the
first few files and the ways out (the training entry prints it without a traceback and exits 2).
With `data.on_error=skip` the problems are logged as a warning instead (training drops those
samples anyway); a split that cannot be built at all still fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from segldm.data.check import (
    KINDS,
    OUT_OF_RANGE,
    SplitReport,
    inspect_full,
    inspect_results,
    open_split,
    record,
    scan_size,
)
from segldm.errors import StartupError

log = logging.getLogger(__name__)

PRECHECK_MODES = ("off", "headers", "full")
DEFAULT_MODE = "off"  # a data config without the key (presets set it: conf/data/*.yaml)
SPLITS = ("train", "validation")
SHOWN = 10  # problem lines in the error message
PROGRESS_EVERY_S = 10.0  # a progress log line this often while a big split is scanned
ANNOUNCE_FROM = 5000  # samples in a split from which its scan is announced before it starts
DEFAULT_LABEL_SAMPLE = 0  # data.precheck_labels of a data config without the key


class DataCheckError(StartupError):
    """The training data has problems `python -m segldm.data.check` would report; lists them all.

    A `StartupError` (a `ValueError`): the training entry point prints its message without a traceback.
    """


def precheck_mode(data: Mapping[str, Any]) -> str:
    """`data.precheck`, checked: one of off, headers, full (YAML's unquoted `off` reads as false)."""
    mode = data.get("precheck", DEFAULT_MODE)
    if mode is False:
        mode = "off"
    if mode not in PRECHECK_MODES:
        raise StartupError(
            f"data.precheck={mode!r} is not supported; expected one of {', '.join(PRECHECK_MODES)} "
            "(headers: files exist, pair, headers decode, sizes agree; full: also every pixel and label)"
        )
    return str(mode)


def precheck_data(data: DictConfig, mode: str | None = None) -> list[SplitReport]:
    """Scan `data.train` and `data.validation` as `data.precheck` says; raise `DataCheckError` on problems.

    Returns the split reports (empty when the mode is off).
    """
    mode = precheck_mode(data) if mode is None else precheck_mode({"precheck": mode})
    if mode == "off":
        return []
    started = time.monotonic()
    workers = int(data.get("num_workers", 0) or 0) if mode == "full" else 0
    label_sample = int(data.get("precheck_labels", DEFAULT_LABEL_SAMPLE) or 0) if mode == "headers" else 0
    if label_sample < 0:
        raise StartupError(
            f"data.precheck_labels={label_sample} must be >= 0 (0: read no labels in headers mode)"
        )
    reports = [_scan(data, split, mode, workers, started, label_sample) for split in SPLITS if split in data]
    elapsed = time.monotonic() - started
    n_errors = sum(r.n_errors for r in reports)
    checked = " + ".join(f"{r.checked} {r.split}" for r in reports)
    for r in reports:
        if r.unpaired:
            log.warning(
                "data precheck: %s: %d masks have no image (unused), first: %s",
                r.split,
                len(r.unpaired),
                r.unpaired[0],
            )
    if not n_errors:
        log.info(
            "data precheck (data.precheck=%s): %s samples ok in %.2f s%s",
            mode,
            checked,
            elapsed,
            "" if mode == "full" else "; data.precheck=full also decodes every pixel and checks labels",
        )
        return reports
    message = describe(reports, mode, elapsed)
    fatal = any(r.fatal for r in reports)
    if str(data.get("on_error", "raise")) == "skip" and not fatal:
        log.warning(
            "%s\nTraining goes on: data.on_error=skip drops these samples (logged, counted).", message
        )
        return reports
    raise DataCheckError(message)


def spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when count >= total)."""
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})


def _sample_labels(report: SplitReport, dataset: object, count: int) -> None:
    """Read ``count`` pairs of a split in full and add their label-id problems to its report (a file
    that does not decode was already named by its header, or needs `full`)."""
    if count <= 0 or not hasattr(dataset, "inspect"):
        return
    for index in spread(count, len(dataset)):  # type: ignore[arg-type]
        result = inspect_full(dataset, index)
        for kind, message in result["problems"]:
            if kind == OUT_OF_RANGE and message not in report.problems:
                report.add(kind, message)
        report.out_of_range_ids.update(int(v) for v in result["out_of_range"])


def _scan(
    data: DictConfig, split: str, mode: str, workers: int, started: float, label_sample: int = 0
) -> SplitReport:
    report, dataset = open_split(data, split)
    if dataset is None:
        return report
    total = scan_size(dataset, mode)
    if total >= ANNOUNCE_FROM:
        log.info("data precheck (data.precheck=%s): scanning %d %s samples ...", mode, total, split)
    last = time.monotonic()
    for result in inspect_results(dataset, mode, workers=workers):
        record(report, result)
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            log.info(
                "data precheck: %s %d/%d checked, %d problem(s) so far (%.0f s)",
                split,
                report.checked,
                total,
                report.n_errors,
                now - started,
            )
    _sample_labels(report, dataset, label_sample)
    return report


def _counts(report: SplitReport) -> str:
    if report.fatal:
        return "cannot be built"
    parts = [f"{report.counts[k]} {k}" for k in KINDS if report.counts.get(k)]
    return ", ".join(parts) or "ok"


def describe(reports: list[SplitReport], mode: str, elapsed: float) -> str:
    """Every problem counted, the first `SHOWN` named, and the ways out."""
    n_errors = sum(r.n_errors for r in reports)
    checked = " + ".join(f"{r.checked} {r.split}" for r in reports)
    lines = [
        f"data.precheck={mode} found {n_errors} problem(s) in the training data "
        f"({'; '.join(f'{r.split}: {_counts(r)}' for r in reports)}; "
        f"{checked} samples scanned in {elapsed:.2f} s):"
    ]
    problems = [f"{r.split}: {r.fatal}" for r in reports if r.fatal]
    problems += [f"{r.split}: {p}" for r in reports for p in r.problems]
    lines += [f"  {p}" for p in problems[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"  ... and {len(problems) - SHOWN} more")
    ids = sorted(set().union(*(r.out_of_range_ids for r in reports)))
    if ids:
        lines.append(f"  out-of-range label ids: {ids[:40]}{' ...' if len(ids) > 40 else ''}")
    labels = " set data.n_labels / data.ignore_label / data.label_remap to match the data, or" if ids else ""
    lines.append(
        "Fix or remove these files (`python -m segldm.data.check` with the same data=... overrides lists "
        f"every one), or{labels} train with data.on_error=skip to drop such samples (logged and counted), "
        "or set data.precheck=off to skip this scan."
    )
    return "\n".join(lines)
