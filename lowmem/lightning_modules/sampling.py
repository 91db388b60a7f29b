"""`ResumableSampler`: a training sampler whose order is a pure function of (seed, epoch, position).

Lightning alone does not resume the data order exactly (measured with Lightning 2.6.6):

- a ``shuffle=True`` DataLoader draws its permutation from the global RNG, which checkpoints do
  not store, so a resumed run sees another order;
- when a run stops mid-epoch Lightning has already fetched one batch ahead, so a loader that
  counts the batches its own iterator produced resumes one batch late;
- on resume Lightning may call ``set_epoch`` with the next epoch's number while it finishes the
  interrupted one.

This sampler draws the permutation of epoch ``e`` from its own generator seeded with
``seed + e`` (as ``DistributedSampler`` does) and, when it is attached to a Trainer that is
fitting, reads the epoch and the number of batches the fit loop has already trained on in that
epoch from the loop's progress counters at the moment iteration starts, and skips those batches.
So a run resumed from any checkpoint (mid-epoch, at an epoch end, after in-fit validation)
continues with exactly the batches the uninterrupted run would have seen, and validation (which
draws from the global RNG) cannot change the training order.

Under DDP it shards like ``DistributedSampler`` (rank ``r`` of ``n`` takes every n-th index of
the permutation, the tail that does not divide evenly is dropped), so ``n`` ranks at batch ``B``
see, step by step, the same samples as one process at batch ``n B``. It *is* a
``DistributedSampler`` subclass, so Lightning (``use_distributed_sampler=True``) keeps it
instead of replacing it with its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from lowmem.lightning_modules.validation import check_bool, check_int, check_positive_int, check_seed, config_error

__all__ = ["ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """Shuffled (or sequential) indices, sharded by rank, resuming at the fit loop's position.

    Args:
        dataset: the map-style dataset (only its length is used).
        batch_size: samples per batch on this rank (to turn trained batches into skipped indices).
        shuffle: draw a new permutation each epoch (``False``: dataset order).
        seed: base seed of the permutation; epoch ``e`` uses ``seed + e``.
        trainer: the Trainer whose fit-loop progress sets the epoch and the start position; without
            it the sampler behaves like ``DistributedSampler`` (``set_epoch``, start at 0).
        drop_last_batch: whether the DataLoader drops the last incomplete batch (its
            ``drop_last``); the epoch length in batches depends on it.
        num_replicas, rank: the DDP world size and this rank; default from ``trainer``, else from
            ``torch.distributed`` if initialized, else 1 and 0.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        trainer: Any = None,
        drop_last_batch: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        check_positive_int("ResumableSampler.batch_size", batch_size, fix="pass the DataLoader's batch_size, e.g. 64")
        check_bool("ResumableSampler.shuffle", shuffle)
        check_seed("ResumableSampler.seed", seed)
        check_bool("ResumableSampler.drop_last_batch", drop_last_batch)
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = trainer.world_size if trainer is not None else dist.get_world_size() if distributed else 1
        if rank is None:
            rank = trainer.global_rank if trainer is not None else dist.get_rank() if distributed else 0
        check_positive_int("ResumableSampler.num_replicas", num_replicas, fix="pass the DDP world size, e.g. 1")
        check_int("ResumableSampler.rank", rank, 0, fix=f"pass this process's rank, 0 to {num_replicas - 1}")
        if rank >= num_replicas:
            raise config_error("ResumableSampler.rank", rank, f"must be below num_replicas={num_replicas}",
                               f"pass this process's rank, 0 to {num_replicas - 1}")  # fmt: skip
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.trainer = trainer
        self.drop_last_batch = drop_last_batch

    def _fit_position(self) -> tuple[int, int] | None:
        """(epoch, batches of it already trained on) from the fit loop, or None if not fitting.

        Derived from the total number of training batches the loop has processed and the epoch
        length, not from Lightning's epoch counter: resuming from a checkpoint written at the end
        of an epoch makes Lightning run an empty epoch and count one epoch too many.
        """
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return None
        done = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        return divmod(done, self._batches_per_epoch(trainer.limit_train_batches))

    def _batches_per_epoch(self, limit: int | float) -> int:
        """Batches Lightning runs per epoch (``len(loader)`` cut by ``limit_train_batches``)."""
        n = len(self) // self.batch_size if self.drop_last_batch else -(-len(self) // self.batch_size)
        return max(1, min(n, limit) if isinstance(limit, int) else int(n * limit))

    def __iter__(self) -> Iterator[int]:
        position = self._fit_position()
        epoch, start = position if position is not None else (self.epoch, 0)
        self.set_epoch(epoch)
        indices = list(super().__iter__())
        return iter(indices[start * self.batch_size :])
