"""Loggers: the per-epoch scalars, metrics.csv, TensorBoard event files, W&B (a recording fake)."""
import csv
import io
import math
import socket
import sys
import types

import pytest

from fairdistill import loggers
from fairdistill.errors import ConfigError

NAN = float("nan")


def record(epoch, test=None, stage="main", **train):
    r = {"stage": stage, "epoch": epoch, "global_epoch": epoch, "lr": 0.1 / epoch, "train": {"loss": 1.0 / epoch, **train}}
    if test is not None:
        r["test"] = test
    return r


TEST = {"accuracy": 0.75, "deo_a": 0.125, "deo_m": 0.5, "dp_a": NAN, "loss": 0.6, "cell_accuracy": [[1.0, 0.5]],
        "excluded_cells": [], "worst_group_accuracy": 0.5, "flag": True}


def test_scalars_are_every_number_of_the_record():
    s = loggers.scalars(record(2, TEST, ce=0.4, accuracy=0.5))
    assert list(s) == ["lr", "train/accuracy", "train/ce", "train/loss", "test/accuracy", "test/deo_a", "test/deo_m",
                       "test/dp_a", "test/loss", "test/worst_group_accuracy"]
    assert s["lr"] == 0.05 and s["train/loss"] == 0.5 and s["test/deo_m"] == 0.5
    assert math.isnan(s["test/dp_a"])  # an undefined metric is kept as NaN; lists and booleans are not scalars
    assert loggers.scalars({"lr": None, "train": {}}) == {}


def test_csv_has_one_row_per_epoch_and_stable_columns():
    history = [record(1, stage="hint", fitnet=2.0), record(2, TEST, ce=0.4), record(3, ce=0.3)]
    rows = list(csv.DictReader(io.StringIO(loggers.csv_text(history))))
    assert len(rows) == 3
    header = list(rows[0])
    assert header[:3] == ["global_epoch", "stage", "epoch"]
    # every column of every epoch, in first-seen order; the test columns appear with epoch 2
    assert header[3:] == ["lr", "train/fitnet", "train/loss", "train/ce", "test/accuracy", "test/deo_a", "test/deo_m",
                          "test/dp_a", "test/loss", "test/worst_group_accuracy"]
    assert rows[0]["test/accuracy"] == "" and rows[2]["test/deo_a"] == "" and rows[1]["train/fitnet"] == ""
    assert [r["stage"] for r in rows] == ["hint", "main", "main"]
    # numbers round-trip exactly (repr), NaN stays nan
    assert float(rows[2]["lr"]) == 0.1 / 3 and float(rows[1]["test/deo_a"]) == 0.125
    assert rows[1]["test/dp_a"] == "nan"


def test_csv_logger_rewrites_the_whole_history(tmp_path):
    done = [record(1), record(2, TEST)]
    lg = loggers.CSVLogger(tmp_path, done)  # a resumed run: the file starts with the epochs done
    assert (tmp_path / "metrics.csv").read_text() == loggers.csv_text(done)
    lg.log(record(3, TEST))
    assert (tmp_path / "metrics.csv").read_text() == loggers.csv_text([*done, record(3, TEST)])
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 4


def test_missing_package_names_the_extra(monkeypatch):
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None if name in ("tensorboard", "wandb") else real(name))
    with pytest.raises(ConfigError, match=r"loggers: tensorboard needs the tensorboard package.*pip install 'fairdistill\[tensorboard\]'"):
        loggers.check_loggers(["csv", "tensorboard"])
    with pytest.raises(ConfigError, match=r"pip install 'fairdistill\[wandb\]'"):
        loggers.open_loggers(["wandb"], "unused")
    loggers.check_loggers(["csv"])  # csv needs nothing
    with pytest.raises(ConfigError, match="unknown logger 'tb'"):
        loggers.check_loggers(["tb"])


def _tb_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    history = [record(1), record(2, TEST), record(3, TEST)]
    with loggers.open_loggers(["tensorboard"], tmp_path, config_text="seed: 0\n") as lg:
        for r in history:
            lg.log(r)
    got = _tb_scalars(tmp_path)
    assert set(got) == set(loggers.scalars(history[1]))
    assert got["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]  # float32 in the event file
    assert got["test/deo_a"] == [(2, 0.125), (3, 0.125)]
    # a resumed run (epochs 1-2 done) purges the killed attempt's epoch 3 and logs it again
    with loggers.open_loggers(["tensorboard"], tmp_path, history=history[:2]) as lg:
        lg.log(record(3, {"accuracy": 0.25}))
        lg.log(record(4, {"accuracy": 0.5}))
    got = _tb_scalars(tmp_path)
    assert got["test/accuracy"] == [(2, 0.75), (3, 0.25), (4, 0.5)]


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = {"init": [], "log": [], "finish": []}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self, exit_code=0):
            calls["finish"].append(exit_code)

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setattr(loggers, "check_loggers", lambda names: None)
    return calls


def test_wandb_run_is_offline_without_a_key_and_keeps_its_id(fake_wandb, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    said = []
    with loggers.open_loggers(["wandb"], tmp_path, name="mfd seed 0", config={"seed": 0}, log=said.append) as lg:
        lg.log(record(1, TEST))
    first = fake_wandb["init"][0]
    assert first["mode"] == "offline" and first["project"] == "fairdistill" and first["name"] == "mfd seed 0"
    assert first["dir"] == str(tmp_path) and first["config"] == {"seed": 0} and first["resume"] == "allow"
    assert "offline" in said[0] and "wandb sync" in said[0]
    step, data = fake_wandb["log"][0]
    expected = loggers.scalars(record(1, TEST))
    assert step == 1 and list(data) == list(expected) and math.isnan(data.pop("test/dp_a"))
    assert data == {k: v for k, v in expected.items() if k != "test/dp_a"}
    assert fake_wandb["finish"] == [0]
    with pytest.raises(KeyError):  # training fails: the W&B run is marked failed
        with loggers.open_loggers(["wandb"], tmp_path):
            raise KeyError("boom")
    assert fake_wandb["finish"] == [0, 1]
    # --resume continues the same W&B run
    monkeypatch.setenv("WANDB_MODE", "disabled")
    loggers.open_loggers(["wandb"], tmp_path).close()
    assert fake_wandb["init"][2]["id"] == first["id"] == (tmp_path / "wandb_id.txt").read_text().strip()
    assert fake_wandb["init"][2]["mode"] == "disabled"


def test_wandb_mode_goes_online_only_with_a_key_and_an_answering_host(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    try:
        assert loggers.wandb_mode() == "offline"  # the host answers, but there is no key
        (tmp_path / ".netrc").write_text(f"machine 127.0.0.1 login user password {'p' * 40}\n")
        (tmp_path / ".netrc").chmod(0o600)
        assert loggers.wandb_mode() == "online"  # the key of ~/.netrc
        (tmp_path / ".netrc").unlink()
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
        assert loggers.wandb_mode() == "online"
    finally:
        server.close()
    assert loggers.wandb_mode(timeout=0.5) == "offline"  # a key, but the host refuses
    monkeypatch.setenv("WANDB_MODE", "online")
    assert loggers.wandb_mode() == "online"  # the user's choice wins


# ----------------------------------------------------------------------------- progress line


class Stream(io.StringIO):
    def isatty(self):
        return False


def test_progress_line_shows_rate_lr_and_the_runs_eta(monkeypatch):
    from fairdistill import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    clock = progress.RunClock(total=40)  # e.g. 4 epochs of 10 steps
    clock.done = 10  # one epoch done, 20 s after the start
    now[0] = 120.0
    out = Stream()
    bar = progress.Progress(10, "mfd main 2/4", stream=out, clock=clock)
    for _ in range(5):
        now[0] += 2.0
        bar.update(1, "loss 0.5000", images=64, lr=1e-3)
    assert out.getvalue() == ""  # not a terminal: nothing until close
    bar.close("loss 0.4000 acc 0.9000")
    line = out.getvalue()
    # 5 of 10 steps in 10 s; 320 images in 10 s; run: 15 of 40 steps in 30 s -> 50 s left
    assert line == "mfd main 2/4 [##########..........] 5/10 0:10<0:10 32 img/s lr 0.001 loss 0.4000 acc 0.9000 | run 0:30<0:50 38%\n"
    assert progress.RunClock(5).text() == "run 0:00<? 0%"


# ----------------------------------------------------------------------------- in training


def small_config(out, **extra):
    from fairdistill.config import load_config

    return load_config(data={"data": {"batch_size": 64}, "model": {"options": {"image_size": 8}}, "epochs": 2,
                             "eval_every": 2, "progress": False, "out": str(out), **extra})


def test_training_writes_metrics_csv_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from fairdistill.engine.trainer import Trainer
    from fairdistill.plots import read_metrics

    out = tmp_path / "run"
    trainer = Trainer(small_config(out, loggers=["csv", "tensorboard"]))
    trainer.run()
    assert trainer.clock.done == trainer.clock.total == 2 * trainer.steps_per_epoch  # the run's ETA counted every step
    history = read_metrics(out / "metrics.jsonl")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == len(history) == 2
    for row, rec in zip(rows, history):
        assert float(row["train/loss"]) == rec["train"]["loss"] and float(row["lr"]) == rec["lr"]
    assert rows[0]["test/accuracy"] == ""  # eval_every=2: no test metrics in epoch 1
    for key in ("accuracy", "deo_a", "deo_m", "dp_a", "dp_m", "eodds_a", "eodds_m", "worst_group_accuracy", "loss"):
        assert float(rows[1][f"test/{key}"]) == history[1]["test"][key]
    tb = _tb_scalars(out)
    assert tb["test/deo_m"] == [(2, pytest.approx(history[1]["test"]["deo_m"], rel=1e-6))]
    assert [s for s, _ in tb["train/loss"]] == [1, 2]


def test_missing_logger_package_fails_before_training(tmp_path, monkeypatch, capsys):
    from fairdistill.cli import main

    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    out = tmp_path / "run"
    assert main(["train", "configs/digits_s/scratch.yaml", f"out={out}", "loggers=[tensorboard]", "epochs=1"]) == 2
    assert "pip install 'fairdistill[tensorboard]'" in capsys.readouterr().err
    assert not out.exists()  # nothing was built or written
