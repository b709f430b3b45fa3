"""DEO_A / DEO_M against an independent per-cell computation and hand-computed values."""
import math

import numpy as np
import pytest
import torch

from fairdistill.fairness import cell_counts, group_metrics, metrics_from_counts


def reference(pred, y, g, C, G):
    """Plain-Python DEO (MFD paper): per class, max - min over groups of accuracy."""
    acc = np.full((G, C), np.nan)
    for gg in range(G):
        for c in range(C):
            m = [(p, t) for p, t, s in zip(pred, y, g) if s == gg and t == c]
            if m:
                acc[gg, c] = sum(p == t for p, t in m) / len(m)
    gaps = [np.nanmax(acc[:, c]) - np.nanmin(acc[:, c]) for c in range(C) if np.sum(~np.isnan(acc[:, c])) >= 2]
    return sum(p == t for p, t in zip(pred, y)) / len(y), np.mean(gaps), np.max(gaps), acc


def test_hand_computed_two_groups():
    # class 0: group 0 gets 2/2 right, group 1 gets 1/2 -> gap 0.5
    # class 1: group 0 gets 0/1, group 1 gets 1/1 -> gap 1.0
    y = [0, 0, 0, 0, 1, 1]
    g = [0, 0, 1, 1, 0, 1]
    p = [0, 0, 0, 1, 0, 1]
    m = group_metrics(torch.tensor(p), torch.tensor(y), torch.tensor(g), 2, 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["deo_a"] == pytest.approx(0.75)
    assert m["deo_m"] == pytest.approx(1.0)
    assert m["cell_accuracy"] == [[1.0, 0.0], [0.5, 1.0]]


@pytest.mark.parametrize("G", [2, 4])
def test_random_against_reference(G):
    rng = np.random.default_rng(G)
    C, n = 5, 400
    y, g, p = rng.integers(0, C, n), rng.integers(0, G, n), rng.integers(0, C, n)
    p = np.where(rng.random(n) < 0.5, y, p)
    acc, deo_a, deo_m, cells = reference(p.tolist(), y.tolist(), g.tolist(), C, G)
    m = group_metrics(torch.tensor(p), torch.tensor(y), torch.tensor(g), C, G)
    assert m["accuracy"] == pytest.approx(acc)
    assert m["deo_a"] == pytest.approx(deo_a)
    assert m["deo_m"] == pytest.approx(deo_m)
    np.testing.assert_allclose(np.array(m["cell_accuracy"]), cells)


def test_empty_cells_are_left_out():
    # class 1 only appears in group 0: it has no gap; class 0 gap = 1 - 0
    y, g, p = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1])
    m = group_metrics(p, y, g, 2, 2)
    assert m["deo_a"] == pytest.approx(1.0) and m["deo_m"] == pytest.approx(1.0)
    assert math.isnan(m["cell_accuracy"][1][1])


def test_counts_add_up_over_batches():
    rng = np.random.default_rng(0)
    y, g, p = (torch.tensor(rng.integers(0, 3, 90)) for _ in range(3))
    c1, t1 = cell_counts(p[:40], y[:40], g[:40], 3, 3)
    c2, t2 = cell_counts(p[40:], y[40:], g[40:], 3, 3)
    whole = group_metrics(p, y, g, 3, 3)
    merged = metrics_from_counts(c1 + c2, t1 + t2)
    assert merged["deo_a"] == pytest.approx(whole["deo_a"]) and merged["accuracy"] == pytest.approx(whole["accuracy"])


def test_perfect_classifier_is_fair():
    y = torch.arange(10) % 5
    g = torch.arange(10) // 5
    m = group_metrics(y, y, g, 5, 2)
    assert m["accuracy"] == 1.0 and m["deo_a"] == 0.0 and m["deo_m"] == 0.0
