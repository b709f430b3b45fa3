"""Samplers: uniform and sequential orders, and MFD's group-balanced (SS) sampler."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from fairdistill.data.samplers import balanced_indices, check_sampler, sequential_indices, uniform_indices
from fairdistill.errors import ConfigError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cells_of(sizes: dict[tuple[int, int], int]) -> tuple[torch.Tensor, torch.Tensor]:
    """labels, groups with ``sizes[(g, y)]`` items per cell, items of different cells interleaved."""
    pairs = [gy for gy, n in sizes.items() for _ in range(n)]
    perm = torch.randperm(len(pairs), generator=gen(123)).tolist()
    pairs = [pairs[i] for i in perm]
    return torch.tensor([y for _, y in pairs]), torch.tensor([g for g, _ in pairs])


def test_uniform_and_sequential():
    a = uniform_indices(50, gen(0))
    assert sorted(a.tolist()) == list(range(50))
    assert torch.equal(a, uniform_indices(50, gen(0))) and not torch.equal(a, uniform_indices(50, gen(1)))
    assert sequential_indices(5).tolist() == [0, 1, 2, 3, 4]


def test_balanced_epoch_length_and_round_robin():
    # G = 2, C = 2: cells (g, y) -> id g*2 + y; cell (1, 1) is empty
    sizes = {(0, 0): 7, (0, 1): 3, (1, 0): 1}
    labels, groups = cells_of(sizes)
    order = balanced_indices(labels, groups, 2, 2, batch_size=8, generator=gen(0))
    quota = 8 // 4  # 2
    rounds = 7 // quota  # 3 rounds; one item of the largest cell is left out
    assert order.numel() == rounds * quota * 3
    cell_id = (groups * 2 + labels)[order].tolist()
    # round-robin: quota from cell 0, quota from cell 1, quota from cell 2, then again
    expect = [c for _ in range(rounds) for c in (0, 1, 2) for _ in range(quota)]
    assert cell_id == expect


def test_balanced_oversampling_uses_whole_fresh_shuffles():
    sizes = {(0, 0): 12, (0, 1): 5, (1, 0): 2, (1, 1): 12}
    labels, groups = cells_of(sizes)
    order = balanced_indices(labels, groups, 2, 2, batch_size=4, generator=gen(1))  # quota 1
    assert order.numel() == 12 * 4
    cell = (groups * 2 + labels)
    for k, n in enumerate([12, 5, 2, 12]):
        picked = order[cell[order] == k].tolist()
        assert len(picked) == 12
        counts = Counter(picked)
        assert set(counts) == set(torch.nonzero(cell == k).flatten().tolist())  # every member drawn
        # concatenated shuffles: each member appears floor(12/n) or ceil(12/n) times, and the first
        # n draws of the cell are one full shuffle
        assert max(counts.values()) - min(counts.values()) <= 1
        assert len(set(picked[:n])) == n


def test_balanced_matches_mfd_cifar10s_epoch_sizes():
    # reference mfd.md 2.4: CIFAR-10S r=0.8 -> 79,920 samples (624 full batches of 128); r=0.95 -> 94,920
    for major, expect in ((4000, 79_920), (4750, 94_920)):
        minor = 5000 - major
        labels = torch.arange(10).repeat_interleave(5000)
        groups = torch.ones(50_000, dtype=torch.long)
        for c in range(10):
            n_gray = major if c < 5 else minor
            groups[c * 5000 : c * 5000 + n_gray] = 0
        order = balanced_indices(labels, groups, 10, 2, batch_size=128, generator=gen(0))
        assert order.numel() == expect
        if major == 4000:
            assert order.numel() // 128 == 624
        cell = (groups * 10 + labels)[order]
        assert torch.bincount(cell, minlength=20).tolist() == [expect // 20] * 20


def test_balanced_is_deterministic_per_generator():
    labels, groups = cells_of({(0, 0): 9, (1, 0): 2, (0, 1): 4, (1, 1): 6})
    a = balanced_indices(labels, groups, 2, 2, 8, gen(5))
    assert torch.equal(a, balanced_indices(labels, groups, 2, 2, 8, gen(5)))
    assert not torch.equal(a, balanced_indices(labels, groups, 2, 2, 8, gen(6)))


def test_balanced_quota_is_at_least_one():
    labels, groups = cells_of({(0, 0): 3, (0, 1): 2})
    order = balanced_indices(labels, groups, 2, 1, batch_size=1, generator=gen(0))  # 1 // 2 -> quota 1
    assert order.numel() == 3 * 1 * 2


def test_unknown_sampler_is_a_config_error():
    with pytest.raises(ConfigError, match="Did you mean 'balanced'"):
        check_sampler("balance")
