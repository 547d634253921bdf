"""Training batches that a crash does not disturb: each epoch's order is a pure function of
``(seed, epoch)`` (:func:`epoch_order`), split across processes like ``DistributedSampler``
(:class:`EpochSampler`), and a DataLoader (:class:`ResumableDataLoader`) whose
``state_dict()`` says how many batches of which epoch it has handed out, so that a fit
resumed from a mid-epoch checkpoint sees exactly the batches the interrupted fit had not
seen yet, in the same order, then the next epochs as the uninterrupted fit would.

How Lightning (2.6) uses it:

* The fit loop stores ``state_dict()`` of every training DataLoader that has
  ``state_dict``/``load_state_dict`` in the checkpoint (``loops.fit_loop.state_dict.
  combined_loader``) and, on a resume that restarts an unfinished epoch (or any resume
  when ``max_steps`` is set), calls ``load_state_dict`` before iterating. (Not when the
  loader was set up before the loops' state was restored, as ``configure_optimizers``
  asking for ``trainer.estimated_stepping_batches`` in a fit bounded by ``max_epochs``
  does: ``IMEXModule`` loads it then, when training starts, still before the first batch.)
* It calls ``set_epoch(epoch)`` on the loader's *sampler* (not on a batch sampler) at the
  start of every epoch, after it has already called ``iter()`` on the loader for the first
  epoch of a fit; the iterator here therefore starts the sampler only at its first
  ``next()`` (then too when worker processes prefetch indices).
* The sampler is a ``DistributedSampler`` (without its process-group lookup at
  construction): Lightning replaces a training sampler only when it is not one, so with the
  default ``use_distributed_sampler=True`` it keeps this one, and with ``False`` nothing
  changes either. The rank and world size are ``torch.distributed``'s when a process
  group is initialized (read when used), or given explicitly.

The count is of batches returned by the loader's iterator in the main process, which is
what the training step sees: the DataLoader's worker processes may prefetch ahead, but
only the main process counts, and Lightning's fetcher does not read ahead of a loader
that has a length (ours always has one). An epoch that Lightning cuts short
(``limit_train_batches``) is complete at its limit, which the datamodule passes on as
:attr:`ResumableDataLoader.batches_per_epoch`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from ..validate import integer

__all__ = ["EpochSampler", "ResumableDataLoader", "epoch_order"]


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The order of ``range(size)`` in epoch ``epoch``: a permutation drawn by numpy's
    PCG64 seeded from ``SeedSequence(seed, spawn_key=(epoch,))``, i.e. the ``epoch``-th
    child that ``SeedSequence(seed).spawn()`` gives: numpy's hashing of the seed and the
    epoch into independent, well-mixed streams (distinct from ``default_rng(seed)``, the
    stream of the data's splits). Computed from nothing else, by any process, without
    replaying earlier epochs."""
    for name, value in (("size", size), ("seed", seed), ("epoch", epoch)):
        integer(f"epoch_order: {name}", value, 0)
    sequence = np.random.SeedSequence(int(seed), spawn_key=(int(epoch),))
    return np.random.Generator(np.random.PCG64(sequence)).permutation(int(size)).tolist()


class EpochSampler(DistributedSampler):
    """Indices of ``dataset`` in :func:`epoch_order` ``(len(dataset), seed, epoch)``, this
    process's share only: like ``DistributedSampler(shuffle=True, drop_last=False)``, the
    order is padded with its own first indices to a multiple of ``num_replicas`` and rank
    ``r`` takes positions ``r, r + num_replicas, ...``, so that the shares are disjoint
    (but for the padding), equal in size, and together the whole epoch.

    ``num_replicas`` and ``rank`` default to ``torch.distributed``'s world size and rank
    when a process group is initialized, else 1 and 0, read each time they are used.
    ``set_epoch`` picks the epoch (Lightning calls it at every epoch's start). A
    :class:`ResumableDataLoader` sets :attr:`skip` to resume an epoch part-way."""

    def __init__(self, dataset: Sized, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        # DistributedSampler.__init__ is not called: it asks torch.distributed for the rank
        # and world size at once, and fails without a process group
        integer("EpochSampler: seed", seed, 0)
        for name, value, minimum in (("num_replicas", num_replicas, 1), ("rank", rank, 0)):
            integer(f"EpochSampler: {name}", value, minimum, optional=True)
        if num_replicas is not None and rank is not None and rank >= num_replicas:
            raise ValueError(f"EpochSampler: rank must be < num_replicas = {num_replicas}, got {rank}")
        self.dataset, self.seed, self.shuffle, self.drop_last = dataset, seed, True, False
        self._num_replicas, self._rank = num_replicas, rank
        self.epoch = 0
        self.epoch_set = False  # set_epoch called since the loader last started an epoch
        self.skip = 0  # positions of this share that the next iteration leaves out (then reset)

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        rank = self._rank if self._rank is not None else (
            dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
        if rank >= self.num_replicas:
            raise ValueError(f"EpochSampler: rank must be < num_replicas = {self.num_replicas}, got {rank}")
        return rank

    @property
    def num_samples(self) -> int:
        """The size of every process's share."""
        return math.ceil(len(self.dataset) / self.num_replicas)

    @property
    def total_size(self) -> int:
        return self.num_samples * self.num_replicas

    def share(self, epoch: int) -> list[int]:
        """This process's indices in epoch ``epoch``, in order."""
        order = epoch_order(len(self.dataset), self.seed, epoch)
        if order:
            order += (order * math.ceil(self.total_size / len(order)))[:self.total_size - len(order)]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.share(self.epoch)[skip:])

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.epoch_set = epoch, True


# what a state must match to be resumed here
_IDENTITY = ("seed", "dataset_size", "batch_size", "drop_last", "num_replicas")


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` (same arguments) over an :class:`EpochSampler` that resumes an
    epoch part-way: ``state_dict()`` holds the epoch and the number of its batches this
    loader has returned (with the seed, dataset size, batch size, ``drop_last`` and number
    of processes, checked by ``load_state_dict``, which raises a one-line ``ValueError``
    on a mismatch); after ``load_state_dict`` the next iteration returns the remaining
    batches of that epoch, the same as the interrupted run would have, and nothing when
    the epoch was complete. ``len()`` stays the whole epoch's number of batches, as
    Lightning expects when it resumes.

    Which epoch an iteration runs (decided at its first ``next()``):

    * after ``load_state_dict``: the saved epoch from its next batch, or the epoch after it
      when the saved one was complete (:attr:`epoch_length` batches returned), whatever
      ``set_epoch`` said meanwhile; later ``set_epoch`` calls move on from there by as
      many epochs as they move. (Lightning 2.6, resuming a checkpoint saved at an epoch's
      end of a fit bounded by ``max_steps``, passes ``set_epoch`` one more than its own
      epoch number from then on, which taken literally would skip an epoch's order; an
      ``IMEXModule`` puts the loop's counters right.)
    * else after ``set_epoch(e)``: epoch ``e`` (Lightning calls it at every epoch's start);
    * else (a plain ``for`` loop): the epoch after the previous one when that one was
      complete, so that every loop sees a new order; otherwise the previous one again,
      from its start.

    Under DDP every process keeps the same count (the shares are equal); a checkpoint holds
    rank 0's state, and each process resumes its own share from it. With any other sampler
    (Lightning's ``overfit_batches`` replaces it with a sequential one) the state is empty
    and nothing is resumed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = self.sampler.epoch if isinstance(self.sampler, EpochSampler) else 0
        self._batches = 0  # batches of self._epoch returned
        self._resume = False  # a loaded state waits for the next iteration
        self._shift = 0  # this loader's epoch minus the caller's set_epoch numbering (see _start)
        self._iterations = 0  # iterations started: the latest one's batches count
        self.batches_per_epoch: int | None = None

    @property
    def epoch_length(self) -> int:
        """The batches an epoch uses: ``len(self)``, or :attr:`batches_per_epoch` when that
        is set and smaller (Lightning's ``limit_train_batches``, which the datamodule sets).
        A state that has returned that many is a complete epoch: whether the fit stopped
        there or was killed there, the next batch is the next epoch's first."""
        return len(self) if self.batches_per_epoch is None else min(len(self), self.batches_per_epoch)

    def _resumable(self) -> bool:
        return (isinstance(self.sampler, EpochSampler) and type(self.batch_sampler) is BatchSampler
                and self.batch_sampler.sampler is self.sampler)

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.sampler.seed, "dataset_size": len(self.sampler.dataset),
                "batch_size": self.batch_sampler.batch_size, "drop_last": self.batch_sampler.drop_last,
                "num_replicas": self.sampler.num_replicas}

    def state_dict(self) -> dict[str, Any]:
        if not self._resumable():
            return {}
        return {"epoch": self._epoch, "batches": self._batches, "num_batches": len(self), **self._identity()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict and not self._resumable():
            return
        if not self._resumable():
            raise ValueError("cannot resume the training loader: its sampler is not an EpochSampler batched by a "
                             "BatchSampler, so it cannot skip the batches a checkpoint's state has already seen")
        missing = [key for key in ("epoch", "batches", *_IDENTITY) if key not in state_dict]
        if missing:
            raise ValueError(f"cannot resume the training loader: its state in the checkpoint lacks "
                             f"{', '.join(missing)} (not a ResumableDataLoader's state)")
        here = self._identity()
        different = [f"{key} {state_dict[key]!r} (here {here[key]!r})" for key in _IDENTITY
                     if state_dict[key] != here[key]]
        if different:
            raise ValueError(f"cannot resume the training loader: the checkpoint's loader had {'; '.join(different)}; "
                             "resume with the same dataset, seed, batch size, drop_last and number of processes, "
                             "or start a new fit")
        epoch, batches = state_dict["epoch"], state_dict["batches"]
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(batches, int) and 0 <= batches <= len(self)):
            raise ValueError(f"cannot resume the training loader: the checkpoint's loader state says epoch {epoch!r}, "
                             f"batch {batches!r}, but an epoch here has {len(self)} batches")
        self._epoch, self._batches, self._resume, self._shift = epoch, batches, True, 0
        self.sampler.epoch, self.sampler.epoch_set = epoch, False

    def _start(self) -> int:
        """Picks the epoch and its first batch for a new iteration; returns its number.
        (A number rather than the iterator: a loader that referred to its iterator would
        form a cycle that only the garbage collector frees, after the queues of the
        iterator's worker processes, which then take seconds to time out.)"""
        self._iterations += 1
        if not self._resumable():
            return self._iterations
        sampler = self.sampler
        requested = sampler.epoch if sampler.epoch_set else None
        if self._resume:  # the loaded state decides, whatever set_epoch said
            complete = self._batches >= self.epoch_length
            epoch, first = (self._epoch + 1, 0) if complete else (self._epoch, self._batches)
            self._shift = 0 if requested is None else epoch - requested
        elif requested is not None:
            epoch, first = requested + self._shift, 0
        else:  # a plain loop: the next epoch once this one is complete
            epoch, first = self._epoch + (self._batches >= self.epoch_length), 0
        self._epoch, self._batches, self._resume = epoch, first, False
        sampler.epoch, sampler.epoch_set = epoch, False
        sampler.skip = first * self.batch_sampler.batch_size
        return self._iterations

    def _returned(self, iteration: int) -> None:
        if iteration == self._iterations:
            self._batches += 1

    def __iter__(self) -> Iterator[Any]:
        return _ResumingIterator(self)


class _ResumingIterator(Iterator):
    """A ``ResumableDataLoader``'s iterator: starts the DataLoader's own iterator (and the
    sampler) at the first ``next()``, and counts the batches it returns."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[Any] | None = None
        self.iteration = 0

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iteration = self.loader._start()
            self.iterator = DataLoader.__iter__(self.loader)
        batch = next(self.iterator)
        self.loader._returned(self.iteration)
        return batch

    def __len__(self) -> int:
        return len(self.loader)
