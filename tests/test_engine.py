"""The trainer end to end on the embedded data: run directory, determinism, resume, errors."""
import json

import pytest
import torch

from fairdistill.config import load_config
from fairdistill.engine import Trainer, evaluate_run, train
from fairdistill.errors import ConfigError, RunDirError, TrainingError
from fairdistill.methods.base import TERMS, Term

BASE = {
    "data": {"name": "digits-s", "batch_size": 64, "eval_batch_size": 512},
    "model": {"name": "mfd-cnn", "options": {"image_size": 8}},
    "epochs": 2,
    "progress": False,
}


def cfg(tmp_path, name="run", **over):
    data = {**BASE, "out": str(tmp_path / name), **over}
    return load_config(data=data)


@TERMS.register("test-nan-after-first-epoch")
class NanAfterFirstEpoch(Term):
    """A test term that turns the loss to NaN from the second epoch on."""

    needs_teacher = False
    needs_features = False

    def forward(self, inp):
        return inp.student.logits.sum() * (float("nan") if inp.epoch >= 1 else 0.0)


class Kill(Exception):
    pass


def kill_after(n):
    def cb(trainer, record):
        if record["global_epoch"] == n:
            raise Kill
    return cb


def test_run_directory_contents(tmp_path):
    result = train(cfg(tmp_path))
    rd = tmp_path / "run"
    assert {p.name for p in rd.iterdir()} >= {"config.yaml", "checkpoint.pt", "metrics.jsonl", "result.json"}
    lines = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    saved = json.loads((rd / "result.json").read_text())
    assert saved["final"] == result["final"]
    assert saved["final"]["accuracy"] == lines[-1]["test"]["accuracy"]
    assert 0.0 <= saved["final"]["deo_a"] <= saved["final"]["deo_m"] <= 1.0
    cells = saved["cell_accuracy"]
    assert len(cells) == 2 and len(cells[0]) == 10
    assert ["test" in r for r in lines] == [False, True]  # eval_every 0: only the final epoch is evaluated
    assert saved["best"]["accuracy"] == lines[-1]["test"]["accuracy"]
    every = train(cfg(tmp_path, "every", eval_every=1))
    every_lines = [json.loads(line) for line in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    assert every["best"]["accuracy"] == max(r["test"]["accuracy"] for r in every_lines)
    assert every["final"] == result["final"]  # evaluating more often changes no training
    # eval re-computes the same metrics from the checkpoint
    again = evaluate_run(str(rd))
    assert again["accuracy"] == pytest.approx(saved["final"]["accuracy"])
    assert again["deo_a"] == pytest.approx(saved["final"]["deo_a"])


def test_same_seed_same_metrics_and_finished_run_kept(tmp_path):
    a = train(cfg(tmp_path, "a", seed=3))
    b = train(cfg(tmp_path, "b", seed=3))
    assert a["final"] == b["final"] and a["cell_accuracy"] == b["cell_accuracy"]
    before = (tmp_path / "a" / "result.json").read_bytes()
    with pytest.raises(RunDirError, match="finished run"):
        Trainer(cfg(tmp_path, "a", seed=3))
    with pytest.raises(RunDirError, match="finished run"):
        Trainer(cfg(tmp_path, "a", seed=3), resume=True)
    assert (tmp_path / "a" / "result.json").read_bytes() == before


@pytest.mark.parametrize("schedule", [{"name": "plateau", "patience": 0}, {"name": "cosine"}])
def test_resume_after_kill_gives_same_result(tmp_path, schedule):
    over = {"epochs": 3, "schedule": schedule, "method": "ss"}
    full = train(cfg(tmp_path, "full", **over))
    with pytest.raises(Kill):
        train(cfg(tmp_path, "killed", **over), callbacks=[kill_after(2)])
    assert not (tmp_path / "killed" / "result.json").exists()
    with pytest.raises(RunDirError, match="--resume"):
        Trainer(cfg(tmp_path, "killed", **over))
    resumed = train(cfg(tmp_path, "killed", **over), resume=True)
    assert resumed["final"] == full["final"]
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_resume_refuses_a_changed_config(tmp_path):
    with pytest.raises(Kill):
        train(cfg(tmp_path, "k"), callbacks=[kill_after(1)])
    with pytest.raises(RunDirError, match="changed: optim"):
        Trainer(cfg(tmp_path, "k", optim={"lr": 0.01}), resume=True)


def test_teacher_and_hkd(tmp_path):
    train(cfg(tmp_path, "teacher", epochs=1))
    over = {"method": "hkd", "teacher": {"run": str(tmp_path / "teacher")}, "epochs": 2}
    result = train(cfg(tmp_path, "hkd", **over))
    lines = [json.loads(x) for x in (tmp_path / "hkd" / "metrics.jsonl").read_text().splitlines()]
    assert "kd" in lines[0]["train"] and lines[0]["train"]["kd"] >= 0
    assert result["teacher"] == str(tmp_path / "teacher")
    with pytest.raises(ConfigError, match=r"terms\.kd: this term needs a teacher"):
        Trainer(cfg(tmp_path, "noteacher", method="hkd"))
    with pytest.raises(ConfigError, match="not a finished run"):
        Trainer(cfg(tmp_path, "bad", method="hkd", teacher={"run": str(tmp_path / "nothing")}))


def test_teacher_weights_must_fit(tmp_path):
    train(cfg(tmp_path, "teacher", epochs=1))
    sd = torch.load(tmp_path / "teacher" / "checkpoint.pt", weights_only=True)["model"]
    torch.save(sd, tmp_path / "t.pt")
    teacher = {"checkpoint": str(tmp_path / "t.pt"), "model": {"name": "mfd-cnn", "options": {"image_size": 16}}}
    with pytest.raises(ConfigError, match="weights do not fit"):
        Trainer(cfg(tmp_path, "x", method="hkd", teacher=teacher))
    teacher["model"]["options"]["image_size"] = 8
    Trainer(cfg(tmp_path, "y", method="hkd", teacher=teacher))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = cfg(tmp_path, "nan", epochs=3, terms={"bad": {"type": "test-nan-after-first-epoch"}})
    with pytest.raises(TrainingError, match=r"non-finite part: bad"):
        train(c)
    ck = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and len(ck["history"]) == 1
    assert not (tmp_path / "nan" / "result.json").exists()


def test_multistage_trains_only_named_parts(tmp_path):
    train(cfg(tmp_path, "teacher", epochs=1))
    over = {
        "method": "hkd", "teacher": {"run": str(tmp_path / "teacher")}, "epochs": 2,
        "stages": [{"name": "warm", "epochs": 1, "terms": [], "ce_weight": 1.0}, {"name": "main"}],
    }
    train(cfg(tmp_path, "ms", **over))
    lines = [json.loads(x) for x in (tmp_path / "ms" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in lines] == [("warm", 1), ("main", 1), ("main", 2)]
    assert "kd" not in lines[0]["train"] and "kd" in lines[1]["train"]
