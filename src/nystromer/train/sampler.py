"""A seeded, resumable order over a map-style dataset: the data position is (epoch, batch)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler:
    """Endless batches of indices in a seeded order that a run can resume at any step.

    Each epoch is a permutation of ``range(num_samples)`` drawn from ``(seed, epoch)`` alone,
    cut into ``num_samples // batch_size`` global batches (the incomplete tail is dropped, as
    in the authors' LRA training). Global batch ``b`` of epoch ``e`` is the same whatever the
    number of processes; process ``rank`` of ``world_size`` gets the contiguous slice
    ``[rank·B/W, (rank+1)·B/W)`` of it, so W processes together see exactly the batch one
    process would see.

    Because the order depends only on the seed, ``step`` global batches consumed put the
    sampler at ``divmod(step, batches_per_epoch)``: a resumed run starts there and sees the
    batches an uninterrupted run would have seen.

    Args:
        num_samples: size of the dataset (≥ batch_size).
        batch_size: B, the global batch size (a multiple of ``world_size``).
        seed: seed of the order.
        start_step: number of global batches already consumed.
        rank, world_size: this process and the number of processes.
        shuffle: False keeps the dataset order (every epoch the same).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if num_samples < batch_size:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one batch "
                f"(batch_size={batch_size})"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 ≤ rank < world_size, got rank={rank}, world={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size must be divisible by the number of processes, got "
                f"batch_size={batch_size} and {world_size} processes"
            )
        if start_step < 0:
            raise ValueError(f"start_step must be ≥ 0, got {start_step}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.batches_per_epoch = num_samples // batch_size
        self.epoch, self.batch = divmod(start_step, self.batches_per_epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (all processes agree on it)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def position(self, step: int) -> dict[str, int]:
        """Where batch number ``step`` (0-based, global) comes from: ``{"epoch", "batch"}``.

        Computed from the step rather than read from the iterator, which a prefetching
        ``DataLoader`` advances ahead of the training loop.
        """
        epoch, batch = divmod(step, self.batches_per_epoch)
        return {"epoch": epoch, "batch": batch}

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch_size // self.world_size
        while True:
            order = self.order(self.epoch)
            while self.batch < self.batches_per_epoch:
                start = self.batch * self.batch_size + self.rank * local
                self.batch += 1
                yield order[start : start + local].tolist()
            self.epoch += 1
            self.batch = 0
