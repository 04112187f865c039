"""LightningDataModule serving any map-style datasets in the SFLCKR sample format."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from segldm.config.construction import constructor_arguments
from segldm.data.resumable import ResumableDataLoader
from segldm.data.transforms import SKIPPED_KEY, check_on_error, collate_samples

log = logging.getLogger(__name__)


def batch_size_problems(batch_size: int, val_batch_size: int | None, key: str = "data") -> list[str]:
    """Batch sizes that load nothing (``val_batch_size`` None: the training batch size)."""
    problems = []
    if batch_size <= 0:
        problems.append(f"{key}.batch_size={batch_size} must be positive")
    if val_batch_size is not None and val_batch_size <= 0:
        problems.append(f"{key}.val_batch_size={val_batch_size} must be positive (or null: {key}.batch_size)")
    return problems


class SegmentationDataModule(L.LightningDataModule):
    """Train/validation loaders for segmentation-conditioned image datasets.

    `size` and `n_labels` are the numbers the rest of the config reads (first-stage and
    cond-stage checks); they are checked against the datasets here, and so is `instance_edges`
    (each sample then carries `instance_map`, which the condition turns into an edge channel). Batches are collated with
    `collate_samples`: samples a dataset skipped (`on_error=skip`) are dropped from their batch and
    counted in `skipped_samples`. Other keys of the data config (file lists, folders, flip, ...) are
    read by the dataset configs through interpolation and kept in `dataset_keys`.
    """

    def __init__(
        self,
        train: Dataset,
        validation: Dataset,
        size: int,
        n_labels: int,
        batch_size: int = 12,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        shuffle: bool = True,
        class_names: list[str] | None = None,
        root: str | None = None,
        ignore_label: int | None = None,
        one_hot_in_loader: bool = False,
        instance_edges: bool = False,
        on_error: str = "raise",
        seed: int | None = None,
        **dataset_keys: Any,
    ) -> None:
        super().__init__()
        problems = batch_size_problems(batch_size, val_batch_size)
        if problems:
            raise ValueError("; ".join(problems))
        for split, dataset in (("train", train), ("validation", validation)):
            dataset_labels = getattr(dataset, "n_labels", n_labels)
            if dataset_labels != n_labels:
                raise ValueError(
                    f"data.{split} yields {dataset_labels} labels but data.n_labels={n_labels}; make them agree"
                )
            if len(dataset) == 0:  # type: ignore[arg-type]
                raise ValueError(f"data.{split} is empty ({type(dataset).__name__})")
            if bool(getattr(dataset, "instance_edges", False)) != bool(instance_edges):
                raise ValueError(
                    f"data.instance_edges={bool(instance_edges)} but data.{split} ({type(dataset).__name__}) "
                    f"{'yields' if getattr(dataset, 'instance_edges', False) else 'yields no'} instance maps; "
                    "only the presets with instance maps (data=cityscapes, data=cocostuff with its instance "
                    "folders) can set data.instance_edges=true"
                )
        self.train_dataset = train
        self.val_dataset = validation
        self.size = size
        self.n_labels = n_labels
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.shuffle = shuffle
        # the training order of epoch e is seeded by (seed, e); None: the process seed (train.py's `seed`)
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self.class_names = class_names
        self.root = root
        self.ignore_label = ignore_label
        self.one_hot_in_loader = one_hot_in_loader
        self.instance_edges = bool(instance_edges)
        self.on_error = check_on_error(on_error)
        self.dataset_keys = dataset_keys
        self.skipped_samples: list[str] = []  # every skip seen by the loaders, in order
        self._reported: set[str] = set()

    @classmethod
    def startup_problems(cls, config: Mapping[str, Any], key: str) -> list[str]:
        """What the constructor would refuse that the config alone shows (before any data is read)."""
        arguments = constructor_arguments(cls, config)
        return batch_size_problems(int(arguments["batch_size"]), arguments["val_batch_size"], key)

    def train_dataloader(self) -> DataLoader:
        # resumable: its position is saved in checkpoints, so a resumed run sees the same batches
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_samples,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(self.seed % 2**62),  # iter() leaves the global RNG alone
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_samples,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count and log the samples the dataset skipped; an all-skipped batch becomes None."""
        if not isinstance(batch, dict) or SKIPPED_KEY not in batch:
            return batch
        skipped = batch.pop(SKIPPED_KEY)
        self.skipped_samples.extend(skipped)
        for message in skipped:
            if message not in self._reported:  # each bad file once, not once per epoch
                self._reported.add(message)
                log.warning(
                    "skipped a sample (data.on_error=skip; %d skips so far, %d distinct): %s",
                    len(self.skipped_samples),
                    len(self._reported),
                    message,
                )
        return batch or None
