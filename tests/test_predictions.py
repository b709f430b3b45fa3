"""Per-item predictions: the CSV format, the row order under torchrun, and the round trip from a
finished run (`eval --predictions`, `save_predictions: true`) back to result.json's metrics."""
import numpy as np
import pytest
import torch

from fairdistill.data import BatchLoader, build_dataset
from fairdistill.errors import ConfigError, DataError
from fairdistill.predictions import (PredictionRecorder, Predictions, check_task, merge_ranks, read_predictions,
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


def fake_logits(x):
    return x.flatten(1)[:, :10] * 3.0


def record(loader):
    rec = PredictionRecorder()
    for x, y, g in loader.epoch(0):
        rec.update(fake_logits(x), y, g)
    return rec.batches


def test_ranks_merge_back_into_test_set_order():
    """3 processes' loaders (rows rank::3 of each global batch; a last batch of 48 rows) give the
    one-process predictions once merged."""
    test = build_dataset("digits-s", split="test", seed=0)
    one = merge_ranks([record(BatchLoader(test, 150, sampler="sequential"))])
    three = merge_ranks([record(BatchLoader(test, 50, sampler="sequential", rank=r, world_size=3)) for r in range(3)])
    assert len(test) % 150 != 0
    for k in ("index", "label", "group", "prediction"):
        assert np.array_equal(getattr(three, k), getattr(one, k))
    np.testing.assert_allclose(three.probs, one.probs, rtol=1e-6)
    assert np.array_equal(three.label, test.labels.numpy()) and np.array_equal(three.index, np.arange(len(test)))
    with pytest.raises(DataError, match="different numbers of batches"):
        merge_ranks([record(BatchLoader(test, 600, sampler="sequential")), []])


def test_recorder_keeps_test_set_order():
    test = build_dataset("digits-s", split="test", seed=0).subset(torch.arange(130))
    loader = BatchLoader(test, 64, sampler="sequential")
    rec = PredictionRecorder()
    logits = []
    for x, y, g in loader.epoch(0):
        logits.append(fake_logits(x))
        rec.update(logits[-1], y, g)
    p = rec.result()
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


# ----------------------------------------------------------------------------- from a finished run

import csv  # noqa: E402
import json  # noqa: E402

from fairdistill.cli import main  # noqa: E402
from fairdistill.config import load_config  # noqa: E402
from fairdistill.engine import train  # noqa: E402
from fairdistill.fairness import group_metrics  # noqa: E402

COMMON = ["data.batch_size=64", "model.options.image_size=8", "epochs=1", "progress=false", "seed=3"]
KEYS = ("accuracy", "deo_a", "deo_m", "dp_a", "dp_m", "eodds_a", "eodds_m", "worst_group_accuracy")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "run"
    train(load_config("configs/digits_s/scratch.yaml", [*COMMON, f"out={out}", "save_predictions=true"]))
    return out


def by_hand(rows, key_of):
    """gap per class of a per-(group, class) rate computed with plain Python; (mean, max)."""
    gaps = []
    for c in sorted({int(r["label"]) for r in rows}):
        rates = []
        for g in sorted({int(r["group"]) for r in rows}):
            num, den = key_of(rows, g, c)
            if den:
                rates.append(num / den)
        if len(rates) > 1:
            gaps.append(max(rates) - min(rates))
    return sum(gaps) / len(gaps), max(gaps)


def test_saved_predictions_give_result_json_exactly(saved_run):
    result = json.loads((saved_run / "result.json").read_text())
    p, names = read_predictions(saved_run / "predictions.csv")
    test = build_dataset("digits-s", split="test", seed=3)
    assert names == list(test.class_names) and np.array_equal(p.index, np.arange(len(test)))
    assert np.array_equal(p.label, test.labels.numpy()) and np.array_equal(p.group, test.groups.numpy())
    np.testing.assert_allclose(p.probs.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(p.probs[np.arange(len(p.index)), p.prediction], p.probs.max(1))  # the most probable class
    m = group_metrics(p.prediction, p.label, p.group, len(names), len(result["group_names"]))
    for k in KEYS:
        assert m[k] == result["final"][k], k
    assert m["cell_accuracy"] == result["cell_accuracy"] and m["cell_count"] == result["cell_count"]
    # and with nothing but the CSV and plain Python: DEO (accuracy per cell) and DP (P(pred = c | g))
    with (saved_run / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))

    def cell_accuracy(rows, g, c):
        cell = [r for r in rows if int(r["group"]) == g and int(r["label"]) == c]
        return sum(r["prediction"] == r["label"] for r in cell), len(cell)

    def selection(rows, g, c):
        group = [r for r in rows if int(r["group"]) == g]
        return sum(int(r["prediction"]) == c for r in group), len(group)

    deo_a, deo_m = by_hand(rows, cell_accuracy)
    dp_a, dp_m = by_hand(rows, selection)
    assert deo_m == result["final"]["deo_m"] and dp_m == result["final"]["dp_m"]
    assert deo_a == pytest.approx(result["final"]["deo_a"], rel=1e-14, abs=0)
    assert dp_a == pytest.approx(result["final"]["dp_a"], rel=1e-14, abs=0)


def test_eval_predictions_writes_the_same_file(saved_run, tmp_path, capsys):
    f = tmp_path / "again.csv"
    assert main(["eval", str(saved_run), "--predictions", str(f)]) == 0
    assert str(f) in capsys.readouterr().out
    assert f.read_text() == (saved_run / "predictions.csv").read_text()


def test_only_rank_zero_reports(monkeypatch, capsys):
    """Under torchrun every process runs `train`; only RANK 0 prints the `finished` line."""
    import fairdistill.engine

    fake = {"task": "classification", "wall_time_s": 1.0,
            "final": {"accuracy": 0.5, "deo_a": 0.1, "deo_m": 0.2, "loss": 1.0}}
    monkeypatch.setattr(fairdistill.engine, "train", lambda cfg, resume=False, **kw: fake)
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "configs/digits_s/scratch.yaml"]) == 0
        assert ("finished" in capsys.readouterr().out) is printed


def test_other_processes_write_no_file(tmp_path, monkeypatch):
    """A process that is not rank 0 trains, evaluates and gathers, but writes nothing: no
    metrics.csv, no predictions.csv (rank 0 writes them once)."""
    from fairdistill.distributed import DistContext
    from fairdistill.engine import trainer

    class NotMain(DistContext):  # one process that plays a rank other than 0 (no collectives needed)
        is_main = property(lambda self: False)

    monkeypatch.setattr(trainer, "setup_distributed", lambda device: (NotMain(), torch.device("cpu")))
    out = tmp_path / "rank1"
    result = train(load_config("configs/digits_s/scratch.yaml", [*COMMON, f"out={out}", "save_predictions=true",
                                                                 "loggers=[csv]"]))
    assert result["final"]["accuracy"] > 0
    assert not out.exists() or not any(out.iterdir())
