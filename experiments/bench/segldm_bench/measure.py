"""Measuring on a shared machine: interleaved rounds, medians, per-round ratios, peak memory, FLOPs.

Other jobs slow every way of running a step alike only if the ways take turns: each round runs every
variant once (in an order rotated per round), a ratio is taken inside each round, and the median of
those ratios is what the tables report. Peak memory is the allocator's high-water mark during one
step: `torch.cuda.max_memory_allocated` on CUDA; on the CPU, the profiler's allocation events
(every CPU tensor allocation and free, in order) on top of what was alive when the step began.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from segldm_bench.machine import load_average


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Run:
    """One variant of a measurement: `prepare` (untimed: switch modes, build the batch) then `work`."""

    work: Callable[[], Any]
    prepare: Callable[[], None] | None = None
    finish: Callable[[], None] | None = None
    items: int = 1  # images (or UNet evaluations) per call of `work`, for the throughput
    warmup: int | None = None  # untimed calls before the rounds (None: interleave's `warmup`)


@dataclass
class Timing:
    """Seconds per call of each variant, one value per round, and the load seen during the rounds."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    load: list[list[float] | None] = field(default_factory=list)
    first_call_s: dict[str, float] = field(default_factory=dict)  # incl. one-off costs (torch.compile)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def throughput(self, name: str) -> float:
        """Items per second at the median time."""
        return self.items[name] / self.median(name)

    def ratio(self, anchor: str, name: str) -> float:
        """Median over rounds of (anchor time / variant time) in the same round: the speed-up."""
        pairs = zip(self.seconds[anchor], self.seconds[name], strict=True)
        return statistics.median(b / v for b, v in pairs)

    def summary(self, anchor: str | None = None) -> dict[str, dict[str, Any]]:
        out = {}
        for name, values in self.seconds.items():
            row: dict[str, Any] = {
                "median_s": self.median(name),
                "min_s": min(values),
                "rounds_s": [round(v, 4) for v in values],
                "items_per_call": self.items[name],
                "items_per_s": self.throughput(name),
            }
            if anchor is not None and anchor in self.seconds:
                row["speedup"] = self.ratio(anchor, name)
            if name in self.first_call_s:
                row["first_call_s"] = self.first_call_s[name]
            out[name] = row
        return out


def compile_cost(first_call_s: float, compiled_s: list[float], eager_s: list[float]) -> dict[str, Any]:
    """torch.compile's one-off cost (the first call beyond a steady one) and the calls it takes to pay
    it back against the eager twin timed in the same rounds (None: compiled is not faster). Both the
    speed-up and the time saved per call are medians of per-round values, so that they agree in sign."""
    compile_s = max(0.0, first_call_s - statistics.median(compiled_s))
    pairs = list(zip(eager_s, compiled_s, strict=True))
    saved = statistics.median(e - c for e, c in pairs)
    return {
        "compile_s": compile_s,
        "speedup_vs_eager": statistics.median(e / c for e, c in pairs),
        "break_even_steps": compile_s / saved if saved > 0 else None,
    }


def interleave(
    runs: Mapping[str, Run], rounds: int, device: torch.device, warmup: int = 1, repeat: int = 1
) -> Timing:
    """Time every run `rounds` times, variants taking turns (order rotated each round).

    Each variant is first run `warmup` times (kernel selection, allocator, lazy optimizer state;
    `Run.warmup` overrides it), the first of those calls timed apart (`Timing.first_call_s`). A timed
    call runs `work` `repeat` times; its time per call is recorded.
    """
    names = list(runs)
    timing = Timing(seconds={n: [] for n in names}, items={n: runs[n].items for n in names})
    for name in names:
        run = runs[name]
        if run.prepare:
            run.prepare()
        for i in range(warmup if run.warmup is None else run.warmup):
            start = time.perf_counter()
            run.work()
            synchronize(device)
            if i == 0:
                timing.first_call_s[name] = time.perf_counter() - start
        if run.finish:
            run.finish()
    for r in range(rounds):
        timing.load.append(load_average())
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = runs[name]
            if run.prepare:
                run.prepare()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeat):
                run.work()
            synchronize(device)
            timing.seconds[name].append((time.perf_counter() - start) / repeat)
            if run.finish:
                run.finish()
    timing.load.append(load_average())
    return timing


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def resident_bytes(
    modules: Iterable[torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    extra: Iterable[torch.Tensor] = (),
) -> int:
    """What stays allocated between steps: parameters, gradients, buffers, optimizer state, extras."""
    tensors: list[torch.Tensor] = []
    for module in modules:
        tensors += list(module.parameters()) + list(module.buffers())
        tensors += [p.grad for p in module.parameters() if p.grad is not None]
    return tensor_bytes([*tensors, *_optimizer_tensors(optimizer), *extra])


def _cpu_allocation_events(profiler: torch.profiler.profile) -> list[tuple[int, int]]:
    """(time ns, bytes +alloc/-free) of every CPU allocator event the profiler saw, in time order."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == "cpu":
                events.append((event.start_time_ns, int(fields.alloc_size)))
        stack.extend(event.children)
    events.sort()
    return events


def peak_memory(work: Callable[[], Any], device: torch.device, resident: int) -> dict[str, int]:
    """Peak bytes allocated while `work` runs, counting `resident` (already allocated) bytes.

    CUDA: the caching allocator's own peak (which already includes what was resident). CPU: the
    running sum of the profiler's allocation events on top of `resident`; frees of tensors allocated
    before the window are not reported by the profiler, so the figure errs high, never low.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        work()
        synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "resident_bytes": start}
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        work()
    live = peak = 0
    for _, delta in _cpu_allocation_events(prof):
        live += delta
        peak = max(peak, live)
    return {"peak_bytes": resident + peak, "resident_bytes": resident}


def count_flops(work: Callable[[], Any]) -> int:
    """Floating-point operations of matmuls/convolutions/attention in `work` (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        work()
    return int(counter.get_total_flops())
