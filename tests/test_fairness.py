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


# ----------------------------------------------------------------------------- DP, equalized odds, worst group
from fairdistill.errors import DataError  # noqa: E402
from fairdistill.fairness import classification_counts, classification_metrics_from_counts  # noqa: E402


def test_hand_computed_dp_eodds_worst_group():
    # group 0 is perfect; group 1 calls two of its four class-0 items class 1.
    # class 1: TPR 1 vs 1 (gap 0), FPR 0/4 vs 2/4 (gap 0.5) -> eodds 0.5, DEO gap 0
    # class 0: TPR 1 vs 2/4 (gap 0.5), FPR 0/2 vs 0/2 -> eodds 0.5, DEO gap 0.5
    # DP: P(pred = 1 | g) = 2/6 vs 4/6 -> 1/3 for both classes
    y = [0, 0, 0, 0, 1, 1] * 2
    g = [0] * 6 + [1] * 6
    p = [0, 0, 0, 0, 1, 1] + [1, 1, 0, 0, 1, 1]
    m = group_metrics(torch.tensor(p), torch.tensor(y), torch.tensor(g), 2, 2)
    assert m["deo_gap"] == pytest.approx([0.5, 0.0]) and m["deo_a"] == pytest.approx(0.25)
    assert m["eodds_gap"] == pytest.approx([0.5, 0.5]) and m["eodds_a"] == pytest.approx(0.5)
    assert m["eodds_m"] == pytest.approx(0.5)
    assert m["dp_gap"] == pytest.approx([1 / 3, 1 / 3]) and m["dp_a"] == pytest.approx(1 / 3)
    assert m["dp_m"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(m["selection_rate"], [[4 / 6, 2 / 6], [2 / 6, 4 / 6]])
    assert m["group_accuracy"] == pytest.approx([1.0, 4 / 6]) and m["worst_group_accuracy"] == pytest.approx(4 / 6)
    assert m["cell_count"] == [[4, 2], [4, 2]] and m["excluded_cells"] == []


def test_hand_computed_three_classes_dp():
    # group 0 predicts classes (1, 2, 1) of 4 items; group 1 (2, 2, 1) of 5 items
    y = [0, 0, 1, 2] + [0, 1, 1, 2, 2]
    p = [0, 1, 1, 2] + [0, 1, 0, 2, 1]
    g = [0] * 4 + [1] * 5
    m = group_metrics(p, y, g, 3, 2)
    assert m["dp_gap"] == pytest.approx([0.15, 0.1, 0.05])
    assert m["dp_a"] == pytest.approx(0.1) and m["dp_m"] == pytest.approx(0.15)
    # class 0: TPR 1/2 vs 1/1, FPR 0/2 vs 1/4; class 1: TPR 1 vs 1/2, FPR 1/3 vs 1/3; class 2: TPR 1 vs 1/2
    assert m["eodds_gap"] == pytest.approx([0.5, 0.5, 0.5])
    np.testing.assert_allclose(m["cell_accuracy"], [[0.5, 1.0, 1.0], [1.0, 0.5, 0.5]])


def test_empty_cells_excluded_and_reported():
    # cell (group 1, class 1) is empty: class 1 has no TPR gap, but its FPR gap (0 vs 1) exists
    y, g, p = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1])
    m = group_metrics(p, y, g, 2, 2)
    assert m["excluded_cells"] == [[1, 1]]
    assert m["deo_gap"][0] == pytest.approx(1.0) and math.isnan(m["deo_gap"][1])
    assert m["eodds_gap"] == pytest.approx([1.0, 1.0])  # class 0 from TPR; class 1 from FPR alone
    assert m["dp_gap"] == pytest.approx([0.5, 0.5])
    assert m["cell_count"] == [[1, 1], [1, 0]]


def test_empty_group_left_out_and_no_gap_is_nan():
    # group 2 has no items at all; with one non-empty group nothing has a gap
    y, p, g = [0, 1, 1], [0, 1, 0], [0, 0, 0]
    m = group_metrics(p, y, g, 2, 3)
    assert math.isnan(m["group_accuracy"][2]) and m["worst_group_accuracy"] == pytest.approx(2 / 3)
    for key in ("deo_a", "deo_m", "dp_a", "dp_m", "eodds_a", "eodds_m"):
        assert math.isnan(m[key]), key
    assert m["excluded_cells"] == [[1, 0], [1, 1], [2, 0], [2, 1]]


@pytest.mark.parametrize("C,G", [(2, 2), (3, 4), (7, 3)])
def test_streamed_counts_equal_whole_and_cell_counts(C, G):
    rng = np.random.default_rng(C * 10 + G)
    y, g, p = (torch.tensor(rng.integers(0, k, 500)) for k in (C, G, C))
    parts = [classification_counts(p[i:i + 128], y[i:i + 128], g[i:i + 128], C, G) for i in range(0, 500, 128)]
    whole = classification_counts(p, y, g, C, G)
    assert whole.dtype == torch.int64 and whole.shape == (G, C, C) and int(whole.sum()) == 500
    assert torch.equal(sum(parts), whole)
    correct, total = cell_counts(p, y, g, C, G)
    assert torch.equal(torch.diagonal(whole, dim1=1, dim2=2), correct) and torch.equal(whole.sum(2), total)
    for gg, t, q in [(0, 0, 1), (G - 1, C - 1, 0)]:
        assert int(whole[gg, t, q]) == int(((g == gg) & (y == t) & (p == q)).sum())
    full, reduced = classification_metrics_from_counts(whole), metrics_from_counts(correct, total)
    assert set(reduced) <= set(full)
    for k in reduced:
        np.testing.assert_allclose(np.array(full[k], dtype=float), np.array(reduced[k], dtype=float))
    # equalized odds bounds the TPR gap; selection rates of each group sum to 1
    assert all(e >= d - 1e-12 for e, d in zip(full["eodds_gap"], full["deo_gap"]))
    np.testing.assert_allclose(np.array(full["selection_rate"]).sum(1), 1.0)


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError, match="labels must lie in"):
        group_metrics([0, 1], [0, 2], [0, 0], 2, 1)
    with pytest.raises(DataError, match="groups must lie in"):
        classification_counts([0, 1], [0, 1], [0, 1], 2, 1)
    with pytest.raises(DataError, match="predictions must lie in"):
        cell_counts(torch.tensor([0, 5]), torch.tensor([0, 1]), torch.tensor([0, 0]), 2, 1)
    with pytest.raises(DataError, match="one entry per item"):
        group_metrics([0, 1, 1], [0, 1], [0, 0], 2, 1)
    with pytest.raises(DataError, match="integers"):
        group_metrics(torch.tensor([0.0, 1.0]), [0, 1], [0, 0], 2, 1)


# ----------------------------------------------------------------------------- against fairlearn's MetricFrame


@pytest.mark.parametrize("C,G,seed", [(2, 2, 0), (3, 2, 1), (5, 3, 2), (7, 4, 3)])
def test_against_fairlearn_metricframe(C, G, seed):
    fm = pytest.importorskip("fairlearn.metrics")
    from sklearn.metrics import accuracy_score

    rng = np.random.default_rng(seed)
    n = 1500
    y, g = rng.integers(0, C, n), rng.integers(0, G, n)
    # group- and class-dependent accuracy so that the gaps are not all near 0
    p = np.where(rng.random(n) < 0.4 + 0.5 * (g + 1) / G * (y % 2 == 0), y, rng.integers(0, C, n))
    m = group_metrics(p, y, g, C, G)
    assert m["excluded_cells"] == []
    whole = fm.MetricFrame(metrics={"acc": accuracy_score, "n": fm.count}, y_true=y, y_pred=p, sensitive_features=g)
    np.testing.assert_allclose(m["group_accuracy"], whole.by_group["acc"].to_numpy())
    assert m["worst_group_accuracy"] == pytest.approx(whole.group_min()["acc"])
    assert m["accuracy"] == pytest.approx(whole.overall["acc"])
    dp, eo, tpr = [], [], []
    for c in range(C):
        yt, yp = y == c, p == c
        frame = fm.MetricFrame(
            metrics={"sel": fm.selection_rate, "tpr": fm.true_positive_rate, "fpr": fm.false_positive_rate},
            y_true=yt, y_pred=yp, sensitive_features=g)
        diff = frame.difference(method="between_groups")
        np.testing.assert_allclose(np.array(m["selection_rate"])[:, c], frame.by_group["sel"].to_numpy())
        np.testing.assert_allclose(np.array(m["cell_accuracy"])[:, c], frame.by_group["tpr"].to_numpy())
        assert m["dp_gap"][c] == pytest.approx(fm.demographic_parity_difference(yt, yp, sensitive_features=g))
        assert m["eodds_gap"][c] == pytest.approx(fm.equalized_odds_difference(yt, yp, sensitive_features=g))
        dp.append(diff["sel"]), eo.append(max(diff["tpr"], diff["fpr"])), tpr.append(diff["tpr"])
    assert m["dp_a"] == pytest.approx(np.mean(dp)) and m["dp_m"] == pytest.approx(np.max(dp))
    assert m["eodds_a"] == pytest.approx(np.mean(eo)) and m["eodds_m"] == pytest.approx(np.max(eo))
    assert m["deo_a"] == pytest.approx(np.mean(tpr)) and m["deo_m"] == pytest.approx(np.max(tpr))
    np.testing.assert_array_equal(m["cell_count"], [[int(((g == k) & (y == c)).sum()) for c in range(C)]
                                                    for k in range(G)])


def test_fairlearn_scores_an_empty_cell_as_zero_we_leave_it_out():
    fm = pytest.importorskip("fairlearn.metrics")
    y, g, p = np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0, 1, 1])
    frame = fm.MetricFrame(metrics=fm.true_positive_rate, y_true=y == 1, y_pred=p == 1, sensitive_features=g)
    assert frame.difference() == pytest.approx(1.0)  # group 1 has no class-1 item: TPR taken as 0
    m = group_metrics(p, y, g, 2, 2)
    assert math.isnan(m["deo_gap"][1]) and m["excluded_cells"] == [[1, 1]]
