"""Reliability of the run directory: one writer (the OS lock), atomic writes that fail with an
actionable error, checkpoints that verify what they load (checksum, fingerprint, format), and the
command line's ordinary failures (one error line, a non-zero exit, nothing written).

The crafted CIFAR pickle (a data file that must not run code) is pinned in
``tests/test_data_cifar.py``; kills, two writer processes and a full disk in
``tests/test_faults.py``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fairdistill.cli import main
from fairdistill.config import RESUMABLE, dump_yaml, from_dict, load_config, safe_load
from fairdistill.engine import train
from fairdistill.engine.checkpoint import (
    FORMAT, KEYS, checkpoint_progress, config_fingerprint, content_checksum, load_checkpoint, load_run_checkpoint,
    load_weights, save_checkpoint,
)
from fairdistill.errors import ConfigError, RunDirError
from fairdistill.rundir import LOCK, RunDir, RunLock, atomic_write, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data": {"name": "digits-s", "batch_size": 64, "eval_batch_size": 1024},
        "model": {"name": "mfd-cnn", "options": {"image_size": 8}}, "epochs": 1, "progress": False}


def tiny(out, **over):
    return load_config(data={**TINY, "out": str(out), **over})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished one-epoch run, copied by the tests that change it."""
    out = tmp_path_factory.mktemp("runs") / "t0"
    train(tiny(out))
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def state_of(**over) -> dict:
    return {k: {} for k in KEYS} | {"stage": 1, "epoch": 0, "history": [], "elapsed": 0.0} | over


# ----------------------------------------------------------------------------- the writer's lock


def test_a_second_writer_is_refused_naming_the_folder_and_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunDir(run).lock() as lock:
        assert lock.held and (run / LOCK).is_file()
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
        assert RunDir(run).writer().pid == os.getpid()
        t0 = time.monotonic()
        with pytest.raises(RunDirError, match=rf"{run} is being written by process {os.getpid()}"):
            RunLock(run).acquire()
        assert time.monotonic() - t0 < 3.0  # refused at once (after the 0.5 s grace for readers' probes)
    assert not (run / LOCK).exists() and RunDir(run).writer() is None
    assert not run.exists()  # created by the lock, nothing else written: nothing left


def test_the_kernel_releases_the_lock_of_a_killed_holder(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from fairdistill.rundir import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert RunDir(run).writer().pid == child.pid
        with pytest.raises(RunDirError, match=rf"process {child.pid}"):
            RunDir(run).lock().acquire()
    finally:
        child.kill()
        child.wait()
    assert json.loads((run / LOCK).read_text())["pid"] == child.pid  # the stale file stays ...
    assert RunDir(run).writer() is None  # ... but holds no lock
    with RunDir(run).lock():
        assert RunDir(run).writer().pid == os.getpid()


def test_a_reader_probe_never_refuses_a_writer(tmp_path):
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("")
    fd = os.open(run / LOCK, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a reader's momentary probe, held 0.15 s here
    threading.Timer(0.15, lambda: os.close(fd)).start()
    with RunDir(run).lock():
        pass


def test_remove_temporaries_takes_only_interrupted_writes_of_the_run_files(tmp_path):
    rd = RunDir(tmp_path)
    for name in (".checkpoint.pt.ab12cd_9", ".result.json.zzzzzzzz", ".tsne.png.ab12cd34", ".checkpoint.pt.short",
                 "checkpoint.pt", LOCK):
        (tmp_path / name).write_text("x")
    removed = sorted(p.name for p in rd.remove_temporaries())
    assert removed == [".checkpoint.pt.ab12cd_9", ".result.json.zzzzzzzz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.pt.short", ".tsne.png.ab12cd34",
                                                         "checkpoint.pt", LOCK]


# ----------------------------------------------------------------------------- writes that fail


def test_writes_under_a_file_fail_naming_it_and_write_nothing(tmp_path):
    blocker = tmp_path / "result.json"
    blocker.write_text("{}")
    with pytest.raises(RunDirError, match=rf"{blocker} is a file, not a folder"):
        write_text(blocker / "x" / "config.yaml", "a: 1\n")
    with pytest.raises(RunDirError, match=rf"out: {blocker} is a file, not a folder"):
        RunDir(blocker).check_writable()
    with pytest.raises(RunDirError, match=rf"lies under {blocker}, which is a file"):
        RunDir(blocker / "x").check_writable()
    with pytest.raises(RunDirError, match="is a file"):
        RunDir(blocker / "x").lock().acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    RunDir(tmp_path / "new" / "run").check_writable()  # creatable: fine, and nothing made
    assert not (tmp_path / "new").exists()


def test_a_failing_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(RunDirError, match=rf"no space left on device while writing {target}; the previous "
                                          r"checkpoint is intact; free some space, then continue with "
                                          rf"`fairdistill train --resume {tmp_path}`"):
        atomic_write(target, fail)

    class Wrapped(Exception):
        pass

    def torch_like(f):  # torch.save reports a failed write as its own RuntimeError
        try:
            f.write(b"x")
            raise OSError(28, "No space left on device")
        except OSError:
            raise Wrapped("enforce fail at inline_container.cc") from None

    def torch_like_writer(f):
        class Failing:
            def write(self, b):
                raise OSError(28, "No space left on device")
        try:
            f.f = Failing()
            f.write(b"data")
        except OSError:
            raise Wrapped("unexpected pos") from None

    with pytest.raises(RunDirError, match="no space left on device"):
        atomic_write(target, torch_like_writer)
    with pytest.raises(Wrapped):  # an unrelated failure stays what it is
        atomic_write(target, torch_like)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_permission_and_read_only_errors_say_what_to_do(tmp_path):
    err = __import__("fairdistill.rundir", fromlist=["write_error"]).write_error
    assert "read-only" in str(err(tmp_path / "a", OSError(30, "Read-only file system")))
    assert "permission denied; choose a writable folder (out=DIR)" in str(err(tmp_path / "a", PermissionError(13, "x")))


# ----------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("text, why", [
    ('{"final": {"accuracy": 0.5, "deo_a"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"name": "x"}', "no 'final' metrics"),
    ('{"final": {"accuracy": "0.5", "deo_a": 0.1, "deo_m": 0.2}}', "final accuracy is '0.5'"),
    ('{"final": {"accuracy": 7.5, "deo_a": 0.1, "deo_m": 0.2}}', r"final accuracy 7\.5 is outside \[0, 1\]"),
    ("\udcff", "not valid JSON"),
])
def test_a_damaged_result_is_reported_as_damaged(tmp_path, text, why):
    rd = RunDir(tmp_path)
    rd.result.write_bytes(text.encode(errors="surrogateescape"))
    with pytest.raises(RunDirError, match=rf"result\.json is damaged \({why}"):
        rd.read_result()


def test_a_damaged_config_is_reported_as_damaged(tmp_path):
    rd = RunDir(tmp_path)
    rd.config.write_text("epochs: [1\n")
    with pytest.raises(RunDirError, match=r"config\.yaml is damaged"):
        rd.read_config()
    rd.config.write_text("epochz: 1\n")
    with pytest.raises(RunDirError, match=r"damaged or from another version .*epochz"):
        rd.read_config()


# ----------------------------------------------------------------------------- checkpoints


def test_checksum_is_the_documented_encoding():
    state = {"b": [1, None, 2.5, True], "a": torch.tensor([1.0, -2.0])}  # keys fed sorted: a, b
    head = b"Ttorch.float32(2,)"
    expected = (b"d2:" + b"s1:a" + b"%d:" % len(head) + head + b"8:" + struct.pack("=2f", 1.0, -2.0)
                + b"s1:b" + b"l4:" + b"i1:1" + b"n" + b"f" + struct.pack("<d", 2.5) + b"?1")
    assert content_checksum(state) == hashlib.sha256(expected).hexdigest()
    assert content_checksum({**state, "checksum": "ignored"}) == content_checksum(state)


def test_checksum_tells_apart_what_a_load_would_tell_apart():
    base = {"w": torch.zeros(3), "n": 1}
    c = content_checksum(base)
    assert content_checksum({"n": 1, "w": torch.zeros(3)}) == c  # insertion order does not matter
    assert content_checksum({"w": torch.zeros(3, dtype=torch.int32), "n": 1}) != c  # same bytes, other dtype
    assert content_checksum({"w": torch.zeros(1, 3), "n": 1}) != c  # same bytes, other shape
    assert content_checksum({"w": torch.zeros(3), "n": 1.0}) != c and content_checksum({"w": torch.zeros(3), "n": True}) != c
    flipped = torch.zeros(3)
    flipped.view(torch.int32)[1] ^= 1  # one bit of one weight
    assert content_checksum({"w": flipped, "n": 1}) != c
    assert content_checksum({"w": torch.zeros(6)[::2], "n": 1}) == c  # a strided view hashes its values
    with pytest.raises(TypeError, match=r"checkpoint \.x: cannot checksum a set"):
        content_checksum({"x": {1}})


def test_round_trip_verifies_checksum_and_fingerprint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = state_of(model={"w": torch.arange(4.0)}, history=[{"epoch": 1, "test": {"accuracy": float("nan")}}])
    save_checkpoint(path, state, fingerprint="f" * 64)
    back = load_checkpoint(path, fingerprint="f" * 64)
    assert back["format"] == FORMAT == 2 and back["fingerprint"] == "f" * 64
    assert back["checksum"] == content_checksum(back) and torch.equal(back["model"]["w"], torch.arange(4.0))
    with pytest.raises(RunDirError, match=r"belongs to another run: its config fingerprint ffffffffffff is not 000000000000"):
        load_checkpoint(path, fingerprint="0" * 64)
    raw = torch.load(path, weights_only=True)
    raw["epoch"] = 7  # an edit that leaves the file perfectly readable
    torch.save(raw, path)
    with pytest.raises(RunDirError, match="do not match their SHA-256 checksum"):
        load_checkpoint(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(RunDirError, match="cannot be read as a fairdistill checkpoint"):
        load_checkpoint(path)


def test_format_1_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "version": "0.1.0", **state_of()}, path)
    with pytest.raises(RunDirError, match=r"format-1 checkpoint \(fairdistill 0\.1\.0\).*no checksum.*"
                                          r"teacher\.checkpoint=.*checkpoint\.pt"):
        load_checkpoint(path)


def test_sparse_bit_flips_never_load_other_contents(finished, tmp_path):
    """1-3 flipped bits anywhere in a real checkpoint: each file is refused, or (a flip in zip
    padding or an unused header field) loads exactly the original contents."""
    run = copy_run(finished, tmp_path / "run")
    good = run.joinpath("checkpoint.pt").read_bytes()
    ref = load_weights(run / "checkpoint.pt")
    rng = random.Random(10)
    verdicts = {"refused": 0, "identical": 0}
    for _ in range(25):
        b = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        (run / "checkpoint.pt").write_bytes(bytes(b))
        try:
            w = load_weights(run / "checkpoint.pt")
        except RunDirError as e:
            assert "checksum" in str(e) or "cannot be read" in str(e)
            verdicts["refused"] += 1
            continue
        assert w.keys() == ref.keys() and all(torch.equal(w[k], ref[k]) for k in ref)
        verdicts["identical"] += 1
    assert verdicts["refused"] >= 20, verdicts  # nearly all of the file is weights


def test_a_checkpoint_copied_from_another_run_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    other = tiny(tmp_path / "other", seed=5)
    RunDir(tmp_path / "other").path.mkdir()
    write_text(RunDir(tmp_path / "other").config, dump_yaml(other))
    shutil.copy(run / "checkpoint.pt", tmp_path / "other" / "checkpoint.pt")
    with pytest.raises(RunDirError, match="belongs to another run"):
        load_run_checkpoint(tmp_path / "other")
    with pytest.raises(RunDirError, match="belongs to another run"):
        load_weights(tmp_path / "other" / "checkpoint.pt")
    assert load_run_checkpoint(run)["stage"] == 1


def test_fingerprint_ignores_place_and_resumable_keys_and_survives_config_yaml():
    cfg = tiny("runs/a")
    fp = config_fingerprint(cfg)
    assert config_fingerprint(tiny("elsewhere/b", device="cpu", threads=3, progress=True)) == fp
    assert {"out", *RESUMABLE} >= {"device", "threads", "progress"}
    for change in ({"seed": 1}, {"epochs": 2}, {"optim": {"lr": 0.01}}, {"name": "x"}):
        assert config_fingerprint(tiny("runs/a", **change)) != fp, change
    checked = 0
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        try:
            c = load_config(path)
        except ConfigError:
            continue  # a partial file meant as a base of others
        back = from_dict(type(c), safe_load(dump_yaml(c)))  # what eval reads back from config.yaml
        assert config_fingerprint(back) == config_fingerprint(c), path
        checked += 1
    assert checked >= 20


# ----------------------------------------------------------------------------- the command line


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("fairdistill 0.")


def test_demo_with_no_seeds_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--seeds", "0", "--out", str(tmp_path / "demo")])
    assert e.value.code == 2 and "--seeds: must be 1 or more, got 0" in capsys.readouterr().err
    from fairdistill.demo import run_demo

    with pytest.raises(ConfigError, match="1 seed or more"):
        run_demo(out=str(tmp_path / "demo"), seeds=0)
    assert not (tmp_path / "demo").exists()


def test_eval_of_a_damaged_checkpoint_fails_instead_of_scoring(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    b = bytearray((run / "checkpoint.pt").read_bytes())
    b[len(b) // 2] ^= 0x10
    (run / "checkpoint.pt").write_bytes(bytes(b))
    rc, out, err = run_cli(["eval", run], capsys)
    assert rc == 2 and out == "" and "is damaged" in err and err.count("\n") == 1


def test_eval_says_a_run_is_unfinished_and_being_written(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    (run / "result.json").unlink()
    with RunDir(run).lock():
        rc, out, err = run_cli(["eval", run, "--json"], capsys)
    assert rc == 0
    assert f"warning: {run} is still being written by process {os.getpid()}" in err
    assert f"warning: {run} is an unfinished run (no result.json): its checkpoint is after epoch 1 of 1" in err
    metrics = json.loads(out)
    assert metrics["finished"] is False and metrics["epochs_done"] == 1
    rc, out, err = run_cli(["eval", finished, "--json"], capsys)
    assert err == "" and json.loads(out)["finished"] is True


def test_eval_json_into_a_closed_pipe_exits_quietly(finished, capsys, monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("fairdistill.cli._quiet_stdout", lambda: None)  # the real one re-points fd 1
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["eval", str(finished), "--json"]) == 141


def test_train_of_a_run_folder(finished, tmp_path, capsys):
    rc, _, err = run_cli(["train", finished], capsys)
    assert rc == 2 and f"{finished} is a finished run folder; evaluate it with `fairdistill eval {finished}`" in err
    run = copy_run(finished, tmp_path / "run")
    (run / "result.json").unlink()
    rc, _, err = run_cli(["train", run], capsys)
    assert rc == 2 and f"to continue it: fairdistill train --resume {run}" in err
    rc, _, err = run_cli(["train", run, "epochs=5", "--resume"], capsys)
    assert rc == 2 and "epochs: cannot change when resuming" in err and "out=NEW_DIR" in err


def test_resume_config_is_the_saved_one_here(finished, tmp_path):
    moved = copy_run(finished, tmp_path / "moved")
    cfg = RunDir(moved).resume_config(["threads=1", "progress=true"])
    saved = RunDir(moved).read_config()
    assert cfg.out == str(moved) and saved.out == str(finished)
    assert cfg.threads == 1 and cfg.progress is True
    assert config_fingerprint(cfg) == config_fingerprint(saved)


def test_checkpoint_progress_reads_where_a_run_stopped(finished):
    prog = checkpoint_progress(finished / "checkpoint.pt")
    assert prog["stage"] == 1 and prog["epoch"] == 0 and prog["epochs_done"] == 1 and prog["last"]["epoch"] == 1
    assert checkpoint_progress(finished / "nothing.pt") is None


def test_report_and_demo_go_on_past_damaged_files(finished, tmp_path, capsys):
    from fairdistill.demo import table
    from fairdistill.report import sweep_status_line

    status = tmp_path / "sweep_status.json"
    status.write_text('{"runs": 3, "reu')
    line = sweep_status_line(status)
    assert line == "Last `fairdistill sweep` of this folder: unknown (sweep_status.json is damaged)."
    assert "sweep_status.json is damaged (not valid JSON" in capsys.readouterr().err
    write_json(status, {"runs": 3})
    assert "unknown" in sweep_status_line(status) and "no valid 'reused' entry" in capsys.readouterr().err
    good = RunDir(finished).read_result()
    md = table([("Teacher", [good, None])])
    assert "| Teacher |" in md and md.splitlines()[-1].endswith("| 1/2 |")


def test_a_damaged_teacher_is_refused_by_run_and_by_file(finished, tmp_path):
    from fairdistill.engine import Trainer

    run = copy_run(finished, tmp_path / "teacher")
    b = bytearray((run / "checkpoint.pt").read_bytes())
    b[len(b) // 3] ^= 0x04
    (run / "checkpoint.pt").write_bytes(bytes(b))
    model = {"name": "mfd-cnn", "options": {"image_size": 8}}
    for i, teacher in enumerate(({"run": str(run)}, {"checkpoint": str(run / "checkpoint.pt"), "model": model})):
        with pytest.raises(RunDirError, match=r"checkpoint\.pt is damaged: its contents do not match"):
            Trainer(tiny(tmp_path / f"student{i}", method="hkd", teacher=teacher))
        assert not (tmp_path / f"student{i}").exists()


def test_fingerprint_ignores_keys_at_their_defaults():
    """A key added to the schema later appears in old configs at its default: the fingerprint
    (what a config sets beyond the defaults) must not change, so old runs still resume."""
    from fairdistill.config import load_config

    base = ROOT / "configs" / "digits_s" / "hkd.yaml"
    plain = config_fingerprint(load_config(base))
    assert config_fingerprint(load_config(base, ["eval_every=1", "teacher.dropout=false", "data.augment={}"])) == plain
    assert config_fingerprint(load_config(base, ["eval_every=2"])) != plain
    assert config_fingerprint(load_config(base, ["out=elsewhere", "threads=1"])) == plain
