"""Data-loading throughput: one-hot masks built in the loader vs integer label maps expanded on the device.

Writes a small S-FLCKR-layout dataset (photo-sized JPEGs, 182-label PNG masks) to a temporary
folder, then times `SegmentationDataModule`'s train loader over it both ways, with the same
workers, batch size and crop size, alternating the two modes in every round so that load on a
shared machine hits both alike. "To model input" adds what `LatentDiffusion.get_input` does on the
device (CPU here unless --device cuda): `one_hot_from_label_map` for label maps, the
(B, H, W, C) -> (B, C, H, W) contiguous copy for the loader's one-hot. "Loader only" leaves it out.

    .venv/bin/python experiments/data_loading/measure.py --workers 0 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from einops import rearrange

from segldm.condition import one_hot_from_label_map
from segldm.data.datamodule import SegmentationDataModule
from segldm.data.sflckr import FlickrSegTrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the suite: not installed with segldm
from segldm_bench.suite import write_sflckr_like  # noqa: E402

N_LABELS = 182


def write_dataset(root: Path, n: int, seed: int = 0) -> None:
    """n pairs of ~landscape-sized JPEGs (smaller side 256..320, pixel noise +-20) and blocky 182-label masks."""
    write_sflckr_like(root, n, N_LABELS, seed, noise=20)


def batch_bytes(batch: dict) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))


def to_model_input(batch: dict, one_hot: bool, device: torch.device) -> torch.Tensor:
    """The (B, n_labels, H, W) float condition, as LatentDiffusion.get_input builds it on `device`."""
    if one_hot:  # the reference `segmentation` key: move 47 MB/sample, permute to channels-first
        seg = batch["segmentation"].to(device, non_blocking=True)
        return rearrange(seg, "b h w c -> b c h w").contiguous().float()
    return one_hot_from_label_map(batch["label_map"].to(device, non_blocking=True), N_LABELS)


def time_loader(
    root: Path,
    one_hot: bool,
    workers: int,
    batch_size: int,
    size: int,
    batches: int,
    device: torch.device,
    convert: bool,
) -> tuple[float, float]:
    """(samples/s, MB per batch) over the first `batches` batches; with `convert`, to model input."""
    dataset = FlickrSegTrain(size=size, root=str(root), one_hot=one_hot)
    dm = SegmentationDataModule(
        dataset,
        dataset,
        size=size,
        n_labels=N_LABELS,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    # Timed from the iterator's creation (worker start-up included, the same in both modes), so
    # batches prefetched by workers cannot inflate the rate.
    start = time.perf_counter()
    iterator = iter(dm.train_dataloader())
    size_mb = 0.0
    for _ in range(batches):
        batch = next(iterator)
        size_mb = batch_bytes(batch) / 2**20
        if convert:
            cond = to_model_input(batch, one_hot, device)
            assert cond.shape == (batch_size, N_LABELS, size, size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del iterator
    return batches * batch_size / elapsed, size_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96, help="pairs written to the temporary dataset")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating repetitions (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )
    print(
        f"dataset: {args.samples} JPEG/PNG pairs (smaller side 256-320 px), crop {args.size}, "
        f"{N_LABELS} labels, batch {args.batch_size}, {args.batches} timed batches, median of {args.rounds} "
        "alternating rounds\n"
    )
    modes = [(True, "one-hot in loader"), (False, "label map, one-hot on device")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sflckr"
        write_dataset(root, args.samples)
        table: dict[tuple[int, bool, bool], float] = {}
        sizes: dict[bool, float] = {}
        for workers in args.workers:
            runs: dict[tuple[bool, bool], list[float]] = {}
            for _ in range(args.rounds):
                for convert in (False, True):
                    for one_hot, _name in modes:
                        rate, sizes[one_hot] = time_loader(
                            root, one_hot, workers, args.batch_size, args.size, args.batches, device, convert
                        )
                        runs.setdefault((one_hot, convert), []).append(rate)
            for (one_hot, convert), rates in runs.items():
                table[(workers, one_hot, convert)] = statistics.median(rates)
        print(
            "| workers | mode | batch in memory | loader only, samples/s | loader + model input, samples/s |"
        )
        print("|---|---|---|---|---|")
        for workers in args.workers:
            for one_hot, name in modes:
                print(
                    f"| {workers} | {name} | {sizes[one_hot]:.2f} MB | {table[(workers, one_hot, False)]:.1f} | "
                    f"{table[(workers, one_hot, True)]:.1f} |"
                )
        print(
            "\n| workers | ratio label map / one-hot: loader only | loader + model input | batch bytes one-hot / label map |"
        )
        print("|---|---|---|---|")
        for workers in args.workers:
            print(
                f"| {workers} | {table[(workers, False, False)] / table[(workers, True, False)]:.1f}x | "
                f"{table[(workers, False, True)] / table[(workers, True, True)]:.1f}x | "
                f"{sizes[True] / sizes[False]:.0f}x |"
            )


if __name__ == "__main__":
    main()
