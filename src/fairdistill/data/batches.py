"""The epoch plan shared by the batch loaders: which rows each process takes at each step.

Every process draws the same *global* index order of an epoch from a CPU generator seeded from
``(seed, epoch)`` (:func:`epoch_generator`), cuts it into global batches of
``batch_size * world_size`` rows and keeps rows ``rank::world_size`` of each. Two processes with
``batch_size=64`` therefore see exactly the rows one process with ``batch_size=128`` sees, and
any epoch can be replayed on its own (exact resume). The balanced (SS) sampler's per-cell quota
is computed from the global batch over (group, label) cells, ``num_labels`` labels (a data set's
classes, or a dense data set's image-level labels).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .samplers import balanced_indices, balanced_quota, check_sampler, sequential_indices, uniform_indices


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``(seed, epoch)``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochPlan:
    """Sampler, batch sizes and process share of a loader (see the module docstring).

    ``drop_last=True`` drops the last, smaller global batch; with ``drop_last=False`` every row
    is delivered (evaluation must see every item), so when that last batch has fewer rows than
    processes some processes get an empty (0-row) batch in the last step. Every process yields
    ``len(loader)`` batches, so collective calls stay in step.
    """

    def __init__(self, dataset, batch_size: int, *, sampler: str, drop_last: bool, seed: int, rank: int,
                 world_size: int, num_labels: int):
        self.sampler = check_sampler(sampler)
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ConfigError(f"rank must be in 0..world_size-1 with world_size >= 1, got rank={rank}, world_size={world_size}")
        self.dataset, self.num_labels = dataset, int(num_labels)
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.global_batch = self.batch_size * self.world_size
        self.epoch_size = self._epoch_size()
        if self.epoch_size == 0 and len(dataset):
            quota = balanced_quota(self.global_batch, self.num_labels, dataset.num_groups)
            raise ConfigError(
                f"sampler 'balanced': the largest (group, label) cell of {dataset.name} has "
                f"{int(dataset.cell_counts().max())} items, fewer than the per-cell quota {quota} = "
                f"batch {self.global_batch} // {dataset.num_groups * self.num_labels} cells; use a smaller batch_size"
            )

    def _epoch_size(self) -> int:
        """Indices the sampler gives per epoch (all processes together)."""
        if self.sampler != "balanced":
            return len(self.dataset)
        counts = self.dataset.cell_counts().flatten()
        counts = counts[counts > 0]
        if not counts.numel():
            return 0
        quota = balanced_quota(self.global_batch, self.num_labels, self.dataset.num_groups)
        return int(counts.max()) // quota * quota * counts.numel()

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """The epoch's global index order (the generator's first draws)."""
        ds, n = self.dataset, len(self.dataset)
        if self.sampler == "uniform":
            return uniform_indices(n, generator)
        if self.sampler == "sequential":
            return sequential_indices(n)
        return balanced_indices(ds.labels, ds.groups, self.num_labels, ds.num_groups, self.global_batch, generator)

    def global_batches(self) -> list[tuple[int, int]]:
        """(start, stop) of each global batch within the epoch's index order."""
        full, rest = divmod(self.epoch_size, self.global_batch)
        bounds = [(i * self.global_batch, (i + 1) * self.global_batch) for i in range(full)]
        if rest and not self.drop_last:
            bounds.append((full * self.global_batch, self.epoch_size))
        return bounds

    def rows(self, start: int, stop: int) -> slice:
        """This process's rows of the global batch [start, stop)."""
        return slice(start + self.rank, stop, self.world_size)

    def __len__(self) -> int:
        return len(self.global_batches())

    @property
    def num_samples(self) -> int:
        """Rows this process receives per epoch (the sum of its batch sizes)."""
        return sum(len(range(start + self.rank, stop, self.world_size)) for start, stop in self.global_batches())
