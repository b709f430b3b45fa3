"""Per-item predictions: the CSV format, the row order under torchrun, and the round trip from a
finished run (`eval --predictions`, `save_predictions: true`) back to result.json's metrics."""
import numpy as np
import pytest
import torch

from fairdistill.data import BatchLoader, build_dataset
from fairdistill.errors import ConfigError, DataError
from fairdistill.predictions import (PredictionRecorder, Predictions, check_task, read_predictions, rows_of,
                                     write_predictions)


def random_predictions(n=50, c=4, g=3, seed=0):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(n, c)).astype(np.float32))
    probs = logits.softmax(1).numpy()
    return Predictions(np.arange(n), rng.integers(0, c, n), rng.integers(0, g, n), probs.argmax(1), probs)


def test_csv_round_trip(tmp_path):
    p = random_predictions()
    names = ["cat", "dog, big", "0", "x"]
    write_predictions(tmp_path / "p.csv", p, names)
    back, got_names = read_predictions(tmp_path / "p.csv")
    assert got_names == names
    for k in ("index", "label", "group", "prediction"):
        assert np.array_equal(getattr(back, k), getattr(p, k))
    np.testing.assert_allclose(back.probs, p.probs, rtol=1e-7)  # 8 significant digits of float32
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == 'index,label,group,prediction,prob_cat,"prob_dog, big",prob_0,prob_x'
    with pytest.raises(DataError, match="probability columns"):
        write_predictions(tmp_path / "q.csv", p, names[:3])
    (tmp_path / "bad.csv").write_text("index,label,group,prediction,prob_a\n0,1,0,x,0.5\n")
    with pytest.raises(DataError, match="bad.csv: a row is not"):
        read_predictions(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("idx,label\n")
    with pytest.raises(DataError, match="expected the header"):
        read_predictions(tmp_path / "bad.csv")


def test_rows_follow_the_loader_under_several_processes():
    test = build_dataset("digits-s", split="test", seed=0)
    seen = []
    for rank in range(3):  # 3 processes, a last global batch that does not divide evenly
        loader = BatchLoader(test, 50, sampler="sequential", rank=rank, world_size=3)
        rows = rows_of(loader)
        labels = torch.cat([y for _, y, _ in loader.epoch(0)])
        assert torch.equal(test.labels[rows], labels)
        seen.append(rows)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(len(test)))


def test_recorder_keeps_test_set_order():
    test = build_dataset("digits-s", split="test", seed=0).subset(torch.arange(130))
    loader = BatchLoader(test, 64, sampler="sequential")
    rec = PredictionRecorder()
    logits = []
    for x, y, g in loader.epoch(0):
        out = x.flatten(1)[:, :10] * 3.0
        logits.append(out)
        rec.update(out, y, g)
    p = rec.result(loader)
    logits = torch.cat(logits)
    assert np.array_equal(p.index, np.arange(130)) and np.array_equal(p.label, test.labels.numpy())
    assert np.array_equal(p.group, test.groups.numpy()) and np.array_equal(p.prediction, logits.argmax(1).numpy())
    np.testing.assert_allclose(p.probs, logits.softmax(1).numpy(), rtol=1e-6)
    with pytest.raises(ConfigError, match="classification runs only"):
        rec.update(torch.zeros(2, 3, 4, 4), None, None)


def test_dense_tasks_are_refused():
    check_task("classification", "save_predictions")
    for task in ("segmentation", "detection"):
        with pytest.raises(ConfigError, match=f"--predictions: per-item predictions are written for classification "
                                              f"runs only; this run's task is {task}"):
            check_task(task, "--predictions")
