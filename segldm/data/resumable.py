"""A training DataLoader whose position survives a kill: the resumed run sees the batches it would have seen.

A shuffling DataLoader draws a new order from the global torch RNG at every ``iter()``, and Lightning
cannot restore a plain DataLoader mid-epoch, so a resumed run would restart the epoch in another
order. Here epoch e's order is a permutation seeded by (seed, e) (DistributedSampler's recipe, so
each DDP rank reads its own shard and Lightning keeps the sampler), and the loader counts the
batches it hands out. It implements ``state_dict`` / ``load_state_dict``, which Lightning saves in
every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores before it iterates:
the resumed loader starts the saved epoch at the saved batch. Its own generator also keeps
``iter()`` from consuming the global RNG that the model draws noise from.

Exact with ``num_workers=0`` or datasets that are deterministic per index (the synthetic scenes);
with worker processes and random augmentations the order is exact but the augmentation draws of
the resumed epoch are new ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffling (this rank's shard) that can start an epoch part-way through.

    ``skip`` indices of the current epoch are left out of the next iteration only; a ``set_epoch``
    to another epoch cancels it. ``started_epoch`` / ``started_skip`` describe the iteration in progress.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0) -> None:
        rank, num_replicas = rank_and_world_size()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed % 2**62)
        self.skip = 0
        self.started_epoch: int | None = None
        self.started_skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        self.started_epoch, self.started_skip = self.epoch, skip
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """DataLoader over a :class:`ResumableSampler` with Lightning's stateful-loader methods.

    ``state_dict()`` = {seed, epoch, samples consumed in that epoch on this rank}; ``load_state_dict``
    makes the next ``iter()`` continue from there (the next epoch when the saved one was complete).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        sampler: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        self.seed = int(seed)
        self.shuffle = shuffle
        if sampler is None:
            sampler = ResumableSampler(dataset, shuffle=shuffle, seed=self.seed)
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed % 2**62)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs)
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if isinstance(sampler, ResumableSampler):
            sampler.started_epoch = None  # set when the sampler actually starts (lazily, after set_epoch)
            if (
                self.generator is not None
            ):  # worker seeds depend on (seed, epoch), not on how often iter() ran
                self.generator.manual_seed((self.seed + 7919 * (sampler.epoch + 1)) % 2**62)
        self._yielded = 0
        return self._count(super().__iter__())

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler) or self.batch_size is None:
            return {}
        if sampler.started_epoch is None:  # no batch of the current iteration fetched yet
            epoch, samples = sampler.epoch, sampler.skip
        else:
            epoch, samples = sampler.started_epoch, sampler.started_skip + self._yielded * self.batch_size
        return {
            "seed": self.seed,
            "epoch": int(epoch),
            "samples": int(samples),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sampler = self.sampler
        if not state_dict or not isinstance(sampler, ResumableSampler):
            return
        if int(state_dict["seed"]) != self.seed:
            log.warning(
                "the checkpoint's data order seed %s differs from this run's %s: keeping the checkpoint's",
                state_dict["seed"],
                self.seed,
            )
            self.seed = int(state_dict["seed"])
            sampler.seed = self.seed % 2**62
        if int(state_dict.get("batch_size", self.batch_size)) != self.batch_size:
            log.warning(
                "data.batch_size changed from %s to %s: the resumed epoch continues after the %s samples already seen",
                state_dict.get("batch_size"),
                self.batch_size,
                state_dict["samples"],
            )
        epoch, samples = int(state_dict["epoch"]), int(state_dict["samples"])
        per_epoch = len(self) * self.batch_size if self.drop_last else len(sampler)
        if samples >= per_epoch:  # the saved epoch was complete: the next one starts from its beginning
            epoch, samples = epoch + 1, 0
        sampler.set_epoch(epoch)
        sampler.skip = samples


__all__ = ["ResumableDataLoader", "ResumableSampler"]
