"""LightningDataModule serving any map-style datasets in the SFLCKR sample format."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset


class SegmentationDataModule(L.LightningDataModule):
    """Train/validation loaders for segmentation-conditioned image datasets.

    `size` and `n_labels` are the numbers the rest of the config reads (first-stage and
    cond-stage checks); they are checked against the datasets here.
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
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        for split, dataset in (("train", train), ("validation", validation)):
            dataset_labels = getattr(dataset, "n_labels", n_labels)
            if dataset_labels != n_labels:
                raise ValueError(
                    f"data.{split} yields {dataset_labels} labels but data.n_labels={n_labels}; make them agree"
                )
            if len(dataset) == 0:  # type: ignore[arg-type]
                raise ValueError(f"data.{split} is empty ({type(dataset).__name__})")
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
        self.class_names = class_names
        self.root = root

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )
