"""Index orders for one epoch: uniform, sequential and the group-balanced (SS) sampler.

Every function returns a 1-D int64 CPU tensor of dataset positions; random ones draw only from
the ``torch.Generator`` they are given, so an order is reproducible from the generator's seed.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import suggest

SAMPLERS = ("uniform", "balanced", "sequential")


def uniform_indices(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``0..n-1``: every item once per epoch."""
    return torch.randperm(n, generator=generator)


def sequential_indices(n: int) -> torch.Tensor:
    """``0..n-1`` in order (evaluation)."""
    return torch.arange(n)


def balanced_quota(batch_size: int, num_classes: int, num_groups: int) -> int:
    """Indices taken from each (group, label) cell per round: ``max(1, B // (G * C))``."""
    return max(1, batch_size // (num_groups * num_classes))


def balanced_indices(
    labels: torch.Tensor,
    groups: torch.Tensor,
    num_classes: int,
    num_groups: int,
    batch_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The SS baseline's order: equal quotas from every (group, label) cell (MFD ``--labelwise``).

    Reference ``mfd.md`` §2.4: each cell (cell id ``g * C + y``) is shuffled and oversampled, by
    concatenating fresh shuffles, up to the size ``M`` of the largest cell; then rounds of
    ``quota = balanced_quota(B, C, G)`` indices are taken from each cell in turn (cells in id
    order). The epoch has ``floor(M / quota) * quota * K`` indices, K = number of non-empty
    cells. Empty cells are skipped: nothing can be drawn from them, and counting them would
    only shorten the epoch.
    """
    labels, groups = labels.reshape(-1).cpu(), groups.reshape(-1).cpu()
    quota = balanced_quota(batch_size, num_classes, num_groups)
    cells = groups * num_classes + labels
    members = [torch.nonzero(cells == k).squeeze(1) for k in range(num_groups * num_classes)]
    members = [m for m in members if m.numel()]
    if not members:
        return torch.empty(0, dtype=torch.long)
    largest = max(m.numel() for m in members)
    rounds = largest // quota
    streams = []
    for m in members:
        copies = -(-largest // m.numel())
        order = torch.cat([m[torch.randperm(m.numel(), generator=generator)] for _ in range(copies)])
        streams.append(order[: rounds * quota])
    # (cells, rounds, quota) -> round-major: round r holds quota indices of cell 0, then cell 1, ...
    return torch.stack(streams).view(len(members), rounds, quota).transpose(0, 1).reshape(-1)


def check_sampler(name: str) -> str:
    """``name`` if it is a known sampler, else a ConfigError listing the choices."""
    if name not in SAMPLERS:
        raise ConfigError(
            f"sampler: unknown sampler {name!r}.{suggest(name, SAMPLERS)} Valid choices: {', '.join(SAMPLERS)}."
        )
    return name
