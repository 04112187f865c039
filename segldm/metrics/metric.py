"""What every metric of generated images offers, so "add a metric" is one class plus a config entry.

A metric is built from config (``metrics.<name>`` in ``conf/eval.yaml`` and
``callbacks.generation_metrics.metrics``), loads what it needs in :meth:`Metric.setup` (weights,
label checks: everything that can fail does, before any sampling), and computes its numbers from one
:class:`EvalSet` (generated images, their masks, the real images). Its :attr:`Metric.directions`
say which of its keys are better high or low: sweeps rank by them (``sweep.objective=val/<key>``)
instead of guessing from a name. A result that can be recomputed on a resample of the evaluated
samples (``MetricResult.resample``) gets a paired bootstrap interval (:func:`paired_bootstrap`).
``segldm.eval``, in-training evaluation (``evaluation/in_training.py``) and the sweep report all
read metrics through this interface only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from segldm.config.metric_directions import register_direction

Direction = str  # "maximize" | "minimize"


@dataclass
class MetricContext:
    """What a metric may check and load before sampling: the device and the dataset's label set."""

    device: Any = "cpu"
    n_labels: int = 0
    ignore_label: int | None = None
    class_names: Sequence[str] | None = None
    num_samples: int = 0
    need_real: bool = True
    model_dir: str = "models"


@dataclass
class EvalSet:
    """One evaluation's images: sample i is ``generated[i]``, made from mask ``labels[i]``, beside
    ``real[i]`` (None when the data has no images). ``shared`` memoises work several metrics need
    (:meth:`shared_value`), e.g. Inception features."""

    names: list[str]
    generated: list[np.ndarray]
    labels: list[np.ndarray]
    real: list[np.ndarray] | None = None
    model: Any = None  # the LDM, for metrics of its parts (the first stage's rFID)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. real-feature cache key parts
    shared: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.generated)

    def shared_value(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]


@dataclass
class MetricResult:
    """A metric's numbers (``values``: key -> float or None), what else goes into metrics.json
    (``details``), and, for bootstrap-able keys, their value on a resample of sample indices."""

    values: dict[str, float | None]
    details: dict[str, Any] = field(default_factory=dict)
    resample: Callable[[np.ndarray], Mapping[str, float]] | None = None


class Metric:
    """Base class: set ``name`` and ``directions``; override :meth:`setup`, :meth:`compute`,
    :meth:`card` and, for a custom report line, :meth:`report_rows`."""

    name: ClassVar[str] = "metric"
    directions: ClassVar[dict[str, Direction]] = {}
    needs_real: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for key, direction in cls.directions.items():
            register_direction(key, direction, owner=f"{cls.__module__}.{cls.__qualname__}")

    def setup(self, context: MetricContext) -> None:
        """Load weights and check the data fits; raise here, before sampling."""

    def compute(self, images: EvalSet) -> MetricResult:
        raise NotImplementedError

    def card(self) -> dict[str, Any]:
        """How the numbers were made (implementation, versions, weights sha256): the protocol card."""
        return {"metric": self.name}

    def report_rows(
        self, result: MetricResult, intervals: Mapping[str, Sequence[float]]
    ) -> list[tuple[str, str, str]]:
        """(label, value with interval, reference) rows of the report's headline table."""
        rows = []
        for key, value in result.values.items():
            rows.append((key, value_text(value, intervals.get(key), 4), ""))
        return rows


def value_text(value: float | None, interval: Sequence[float] | None, digits: int) -> str:
    """'12.3 [10.1, 14.9]' (the value, and its interval when there is one); '–' for no value."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    text = f"{value:.{digits}f}"
    return text if not interval else f"{text} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def paired_bootstrap(
    results: Mapping[str, MetricResult], n: int, draws: int, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Percentile intervals of every bootstrap-able key from ``draws`` resamples of the n samples, the
    same indices for every metric (each generated image with its own mask and real image).

    Each interval is the draws' spread around the full-set value, value + [q_low - median, q_high -
    median]: a resample holds ~63 % distinct samples, which biases FID upwards (by ~12 at N = 256), so
    a plain percentile interval could miss the full-set value altogether.
    """
    resamplers = {name: r for name, r in results.items() if r.resample is not None}
    if n < 2 or draws < 1 or not resamplers:
        return {"draws": 0, "level": level}
    rng = np.random.default_rng(seed)
    drawn: dict[str, list[float]] = {}
    for _ in range(draws):
        idx = rng.integers(0, n, size=n)
        for result in resamplers.values():
            for key, value in result.resample(idx).items():
                drawn.setdefault(key, []).append(float(value))
    tail = (1 - level) / 2 * 100
    out: dict[str, Any] = {"draws": draws, "level": level, "seed": seed}
    estimates = {k: v for r in resamplers.values() for k, v in r.values.items()}
    for key, values in drawn.items():
        estimate = estimates.get(key)
        if estimate is None or not np.isfinite(estimate):
            continue
        low, median, high = np.nanpercentile(values, [tail, 50, 100 - tail])
        shift = float(estimate) - float(median)
        out[key] = [float(low) + shift, float(high) + shift]
        out[f"{key}_resampling_shift"] = -shift  # median of the draws minus the full-set value
    return out


def flat_values(results: Mapping[str, MetricResult]) -> dict[str, float]:
    """Every finite number of every metric, by key (the MLflow metrics and the logged val/* values)."""
    values: dict[str, float] = {}
    for result in results.values():
        for key, value in result.values.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                values[key] = float(value)
    return values


__all__ = [
    "EvalSet",
    "Metric",
    "MetricContext",
    "MetricResult",
    "flat_values",
    "paired_bootstrap",
    "value_text",
]
