"""The training DataLoader whose position survives a kill: the resumed run sees the batches it would have seen.

torchdata's `StatefulDataLoader` does the bookkeeping: its ``state_dict`` holds how far the
sampler got and, with worker processes, a snapshot of each worker (its dataset's state, the
worker seeds) taken at the batch the training loop last received, not at the ones prefetched.
Lightning saves it in every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and loads it
before it iterates again. Two choices of ours around it make a resumed epoch the same epoch:

- the order of epoch e is a permutation seeded by (seed, e) (`DistributedSampler`: each DDP rank
  reads its own shard, and Lightning keeps the sampler), so it does not depend on how often
  ``iter()`` ran;
- the loader's generator is reseeded from (seed, epoch) at each new epoch, so the worker seeds
  (base seed + worker id) of every epoch are the same in a resumed run; the generator also keeps
  ``iter()`` off the global RNG the model draws noise from.

Datasets that draw augmentations (random crops and flips with Python's ``random``) save that
generator's state (`AugmentationRandomState`), so their draws after a resume are the ones of the
uninterrupted run, with ``num_workers`` 0 or more (tests/integration/test_resume.py kills a run
with two workers).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def epoch_sampler(dataset: Dataset, shuffle: bool, seed: int) -> DistributedSampler:
    """This rank's shard, in an order seeded by (seed, epoch)."""
    rank, num_replicas = rank_and_world_size()
    return DistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed % 2**62
    )


class ResumableDataLoader(StatefulDataLoader):
    """StatefulDataLoader over an epoch-seeded sampler whose worker seeds depend on (seed, epoch)."""

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
            sampler = epoch_sampler(dataset, shuffle, self.seed)
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed % 2**62)
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.14
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The loader's state and the sampler's epoch: Lightning creates the resumed iterator before it
        sets the epoch again, so the epoch must be back in place when the state is loaded."""
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "loader": super().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "loader" not in state_dict:  # a StatefulDataLoader state without the epoch
            super().load_state_dict(state_dict)
            return
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(state_dict["epoch"]))
        super().load_state_dict(state_dict["loader"])

    def __iter__(self) -> Iterator[Any]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        if self.generator is not None and getattr(self, "next_iter_state", None) is None:
            # a fresh epoch: its worker seeds from (seed, epoch); a resumed one takes the saved seeds
            self.generator.manual_seed((self.seed + 7919 * (epoch + 1)) % 2**62)
        return super().__iter__()


class AugmentationRandomState:
    """Dataset mixin: the state of Python's ``random`` (what crops and flips draw from), saved in
    the loader's state (in each worker with ``num_workers > 0``) and restored on resume."""

    def state_dict(self) -> dict[str, Any]:
        return {"python_random": random.getstate()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and "python_random" in state_dict:
            state = state_dict["python_random"]
            random.setstate((state[0], tuple(state[1]), state[2]))


__all__ = ["AugmentationRandomState", "ResumableDataLoader", "epoch_sampler", "rank_and_world_size"]
