"""Fault injection: ``fairdistill train`` processes killed with SIGKILL at chosen and random
moments (inside checkpoint writes too) and resumed end with the metrics of an uninterrupted
run; a second writer of a run folder is refused; a full disk and a read-only folder give one
actionable error; every ordinary bad input gets one error line, a non-zero exit and writes
nothing.

A data file that would run code (the crafted CIFAR pickle) is pinned in
``tests/test_data_cifar.py::test_crafted_pickle_is_refused_before_it_runs``; the lock, the
checksum and the command line's own checks in ``tests/test_reliability.py``.

Time: the killed and resumed processes of a four-epoch digits-s run are forked from a fork
server that imported fairdistill once (the kernel sees separate processes; SIGKILL is real);
the closed-pipe check and the lock's kill test (tests/test_reliability.py) run fresh
interpreters. Each process is bounded by a timeout.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fairdistill
from fairdistill.cli import main
from fairdistill.config import dump_yaml, load_config
from fairdistill.engine import Trainer, train
from fairdistill.engine.checkpoint import checkpoint_progress, load_run_checkpoint
from fairdistill.errors import ConfigError, RunDirError
from fairdistill.models import build_model
from fairdistill.rundir import LOCK, RunDir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "digits_s" / "teacher.yaml")
RUN = ["epochs=4", "progress=false", "data.batch_size=64", "data.eval_batch_size=1024"]
TIMEOUT = 180
SRC = str(Path(fairdistill.__file__).resolve().parents[1])  # the children run the fairdistill imported here

# Kill points inside the checkpoint writes, chosen by FD_KILL (torn: half-way through
# torch.save's bytes; synced: the temporary complete but not renamed; renamed: the new checkpoint
# in place, metrics.jsonl not yet rewritten) at the FD_KILL_AT-th checkpoint the process writes.
HOOKS = r"""
import os, signal
from pathlib import Path
mode, at = os.environ.get("FD_KILL", ""), int(os.environ.get("FD_KILL_AT", "1"))
if mode:
    import fairdistill.engine.checkpoint as ck
    real, real_replace, count = ck.atomic_write, os.replace, [0]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    def atomic_write(path, write):
        count[0] += 1
        if mode == "torn" and count[0] == at:
            def torn(f):
                class Half:
                    calls = 0
                    def write(self, b):
                        Half.calls += 1
                        if Half.calls == 3:
                            f.write(bytes(b)[: len(b) // 2]); f.flush(); die()
                        return f.write(b)
                    def flush(self):
                        f.flush()
                write(Half())
            return real(path, torn)
        real(path, write)
        if mode == "renamed" and count[0] == at:
            die()

    def replace(src, dst):
        if mode == "synced" and count[0] == at and Path(dst).name == "checkpoint.pt":
            die()
        return real_replace(src, dst)

    ck.atomic_write, os.replace = atomic_write, replace
"""


def _forked(argv: list[str], kill: str, at: int, log: str) -> None:
    """A ``fairdistill`` process forked from the fork server (modules already imported, no
    thread pool inherited): stdout and stderr to ``log``, then ``main(argv)``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
    os.environ.update(FD_KILL=kill, FD_KILL_AT=str(at))
    exec(HOOKS, {})
    from fairdistill.cli import main as cli

    rc = cli(argv)
    sys.stdout.flush()
    os._exit(rc)


@pytest.fixture(scope="module")
def forks():
    """Start processes of ``fairdistill`` without their imports: ``forks(argv, kill, at) -> (rc, log)``."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fairdistill.cli", "fairdistill.engine", "fairdistill.data", "sklearn.datasets"])
    logs = []

    def start(argv: list[str], kill: str = "", at: int = 1):
        log = f"/tmp/fairdistill-faults-{os.getpid()}-{len(logs)}.log"
        logs.append(log)
        proc = ctx.Process(target=_forked, args=([str(a) for a in argv], kill, at, log))
        proc.start()
        return proc, log

    def run(argv: list[str], kill: str = "", at: int = 1, started=None) -> tuple[int, str]:
        proc, log = started or start(argv, kill, at)
        proc.join(TIMEOUT)
        if proc.exitcode is None:
            proc.kill()
            pytest.fail(f"fairdistill {' '.join(map(str, argv))} did not end within {TIMEOUT} s")
        return proc.exitcode, Path(log).read_text()

    run.start = start
    yield run
    for log in logs:
        Path(log).unlink(missing_ok=True)


def records(run: Path) -> list[dict]:
    keep = ("stage", "epoch", "global_epoch", "lr", "train", "test", "val")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def temporaries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process (threads restored afterwards)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("ref") / "run"
    try:
        result = train(load_config(CONFIG, [*RUN, f"out={out}"]))
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_kills_inside_checkpoint_writes_and_at_a_random_moment_resume_exactly(reference, forks, tmp_path, capsys):
    ref_dir, ref = reference
    out = tmp_path / "run"
    verdicts = []

    # 1. killed half-way through writing the 2nd checkpoint: a torn temporary, the 1st checkpoint intact
    rc, log = forks(["train", CONFIG, *RUN, f"out={out}"], "torn", 2)
    assert rc == -signal.SIGKILL, log
    torn = temporaries(out)
    assert torn and all(t.startswith(".checkpoint.pt.") for t in torn), torn
    assert load_run_checkpoint(out)["epoch"] == 1 and len(records(out)) == 1
    assert (out / LOCK).is_file() and RunDir(out).writer() is None  # the kernel let go
    assert main(["eval", str(out)]) == 0
    assert f"{out} is an unfinished run (no result.json): its checkpoint is after epoch 1 of 4" in capsys.readouterr().err
    verdicts.append("torn write")

    # 2. resumed, killed with its first checkpoint complete but not yet renamed
    rc, log = forks(["train", "--resume", out], "synced", 1)
    assert rc == -signal.SIGKILL, log
    assert f"removed {len(torn)} temporary file(s) of interrupted writes" in log
    assert temporaries(out) != torn and len(temporaries(out)) == 1
    assert checkpoint_progress(out / "checkpoint.pt")["epochs_done"] == 1
    verdicts.append("complete temporary, not renamed")

    # 3. resumed, killed right after its first checkpoint was renamed (metrics.jsonl one epoch behind)
    rc, log = forks(["train", "--resume", out], "renamed", 1)
    assert rc == -signal.SIGKILL, log
    assert checkpoint_progress(out / "checkpoint.pt")["epochs_done"] == 2 and len(records(out)) == 1
    assert temporaries(out) == []
    verdicts.append("renamed, metrics behind")

    # 4. resumed; a second writer is refused while it runs; then SIGKILL at a random moment
    started = forks.start(["train", "--resume", out])
    proc = started[0]
    deadline = time.monotonic() + TIMEOUT
    while RunDir(out).writer() is None and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.is_alive():
        holder = RunDir(out).writer()
        assert holder is not None and holder.pid == proc.pid
        assert main(["train", "--resume", str(out)]) == 2
        assert f"{out} is being written by process {proc.pid}" in capsys.readouterr().err
        with pytest.raises(RunDirError, match=f"being written by process {proc.pid}"):
            Trainer(load_config(CONFIG, [*RUN, f"out={out}"]), resume=True)
        delay = random.Random(int(time.time())).uniform(0.0, 0.8)
        time.sleep(delay)
        proc.kill()
        verdicts.append(f"random moment ({delay:.2f} s after the lock)")
    rc, log = forks(["train", "--resume", out], started=started)
    assert rc in (0, -signal.SIGKILL), log

    # 5. resumed to the end (unless the random kill came too late)
    if not RunDir(out).finished:
        rc, log = forks(["train", "--resume", out])
        assert rc == 0, log
    result = json.loads((out / "result.json").read_text())
    assert records(out) == records(ref_dir)
    for key in ("final", "best", "cell_accuracy", "epochs"):
        assert result[key] == ref[key], key
    assert temporaries(out) == [] and not (out / LOCK).exists()
    print("kills:", "; ".join(verdicts))


def test_eval_json_into_a_closed_pipe_exits_without_a_traceback(reference):
    ref_dir, _ = reference
    proc = subprocess.Popen([sys.executable, "-m", "fairdistill", "eval", str(ref_dir), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")})
    proc.stdout.close()  # the reader is gone before anything is written (`| head` that has quit)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=TIMEOUT) == 141 and "Traceback" not in err and "Exception ignored" not in err, err


# ----------------------------------------------------------------------------- file systems


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only): ``mount(size_bytes, read_only=False) -> Path``."""
    mounted = []

    def mount(size: int, read_only: bool = False) -> Path:
        target = tmp_path / f"fs{len(mounted)}"
        target.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)],
                                               capture_output=True).returncode != 0:
            pytest.skip("needs root and tmpfs mounts")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_disk_full_keeps_the_previous_checkpoint_and_a_moved_copy_resumes(reference, tmpfs, tmp_path, capsys):
    ref_dir, ref = reference
    size = (ref_dir / "checkpoint.pt").stat().st_size
    fs = tmpfs(int(size * 1.5))  # the first checkpoint fits, the second's temporary does not
    out = fs / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", CONFIG, *RUN, f"out={out}"]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert (f"no space left on device while writing {out / 'checkpoint.pt'}; the previous checkpoint is intact; free "
            f"some space, then continue with `fairdistill train --resume {out}`") in err and err.count("error") == 1
    assert load_run_checkpoint(out)["epoch"] == 1 and temporaries(out) == [] and not (out / LOCK).exists()
    moved = shutil.copytree(out, tmp_path / "moved")
    try:
        assert main(["train", "--resume", str(moved)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert records(moved) == records(ref_dir)
    assert json.loads((moved / "result.json").read_text())["final"] == ref["final"]


def test_a_read_only_output_folder_is_refused_before_anything_runs(tmp_path, tmpfs, capsys):
    if os.geteuid() == 0:
        folder = tmpfs(1 << 20, read_only=True)
        why = "on a read-only file system"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        why = "not writable"
    assert main(["train", CONFIG, *RUN, f"out={folder / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"out: {folder} is {why}, so {folder / 'run'} cannot be written; choose another out=DIR" in err
    assert list(folder.iterdir()) == []


# ----------------------------------------------------------------------------- ordinary bad inputs


@pytest.mark.parametrize("argv, message", [
    (["config", CONFIG, "data.options.seed=3"], "data.options.seed: set by the run; use the top-level key seed instead"),
    (["config", CONFIG, "data.options.root=x"], "data.options.root: set by the run; use data.root instead"),
    (["config", CONFIG, "data.options.split=test"],
     "data.options.split: set by the run; use data.options.val_fraction for a validation split (the run builds its "
     "train and test splits itself) instead"),
    (["config", CONFIG, "model.options.num_classes=5"], "model.options.num_classes: set by the run; use data.name (the data set fixes the number of classes)"),
    (["config", CONFIG, "optim.lr=.nan"], "optim.lr: expected a finite number, got nan"),
    (["config", CONFIG, "optim.lr=.inf"], "optim.lr: expected a finite number, got inf"),
    (["config", CONFIG, "optim.lr=-.inf"], "optim.lr: expected a finite number, got -inf"),
    (["config", str(ROOT / "configs/digits_s/hkd.yaml"), "terms.kd.weight=.nan"], "terms.kd.weight: expected a finite"),
    (["config", str(ROOT / "configs/digits_s/hkd.yaml"), "terms.kd.T=.inf"], "terms.kd.T: expected a finite"),
    (["config", str(ROOT / "configs/digits_s/hkd.yaml"), "terms.kd.self=1"], "terms.kd.self: unknown option. Valid options: T."),
    (["config", CONFIG, "amp=fp16"], "amp: fp16 has no fast kernels on the CPU"),
])
def test_config_errors(argv, message, capsys):
    assert main(argv) == 2
    out = capsys.readouterr()
    assert message in out.err and out.err.count("\n") == 1 and out.out == ""


def digits(tmp_path, name, **over):
    return load_config(CONFIG, [*RUN, "epochs=1", f"out={tmp_path / name}", *[f"{k}={v}" for k, v in over.items()]])


def refused(cfg, match, resume=False):
    with pytest.raises((ConfigError, RunDirError), match=match):
        Trainer(cfg, resume=resume)
    assert not Path(cfg.out).exists() or resume


def test_out_pointing_at_or_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "result.json"
    blocker.write_text("{}\n")
    for out, says in ((blocker, f"out: {blocker} is a file, not a folder"),
                      (blocker / "x", f"out: {blocker / 'x'} lies under {blocker}, which is a file")):
        assert main(["train", CONFIG, *RUN, f"out={out}"]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1
    assert blocker.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_resume_with_another_runs_or_another_architectures_checkpoint(reference, tmp_path, capsys):
    ref_dir, _ = reference
    for name, over in (("other-seed", {"seed": 4}), ("resnet", {"model.name": "resnet20", "model.options": "{}"})):
        cfg = digits(tmp_path, name, **over)
        Path(cfg.out).mkdir()
        (Path(cfg.out) / "config.yaml").write_text(dump_yaml(cfg))  # a run of its own, killed ...
        shutil.copy(ref_dir / "checkpoint.pt", Path(cfg.out) / "checkpoint.pt")  # ... holding another's checkpoint
        assert main(["train", "--resume", cfg.out]) == 2
        err = capsys.readouterr().err
        assert "checkpoint.pt belongs to another run: its config fingerprint" in err and err.count("\n") == 1
        assert sorted(p.name for p in Path(cfg.out).iterdir()) == ["checkpoint.pt", "config.yaml"]


def test_teacher_mismatches_name_the_teacher(tmp_path):
    five = build_model("mfd-cnn", 5, image_size=8)
    torch.save(five.state_dict(), tmp_path / "five.pt")
    cfg = digits(tmp_path, "a", method="hkd", **{"teacher.checkpoint": tmp_path / "five.pt", "teacher.model.name": "mfd-cnn",
                                                  "teacher.model.options.image_size": 8})
    refused(cfg, r"teacher\.checkpoint .*five\.pt: the teacher predicts 5 classes and digits-s has 10")
    big = build_model("mfd-cnn", 10, image_size=32)
    torch.save(big.state_dict(), tmp_path / "big.pt")
    cfg = digits(tmp_path, "b", method="hkd", **{"teacher.checkpoint": tmp_path / "big.pt", "teacher.model.name": "mfd-cnn",
                                                  "teacher.model.options.image_size": 32})
    refused(cfg, r"teacher\.model mfd-cnn \(image_size=32\) cannot run on digits-s's 8x8 images")
    cfg = digits(tmp_path, "c", **{"model.options.image_size": 16})
    refused(cfg, r"model mfd-cnn \(image_size=16\) cannot run on digits-s's 8x8 images .*set model\.options")


def test_empty_cells_under_the_balanced_sampler_and_mfd(tmp_path):
    cfg = digits(tmp_path, "ss", method="ss", **{"data.options.skew": 1.0})
    refused(cfg, r"data\.sampler=balanced: needs training items in every \(class, group\) cell, and digits-s has none in "
                 r"10: \(class '5', group 'gray'\), \(class '6', group 'gray'\)")
    cfg = digits(tmp_path, "mfd", method="mfd", **{"data.sampler": "uniform", "data.options.skew": 1.0,
                                                    "teacher.checkpoint": "unused.pt", "teacher.model.name": "mfd-cnn"})
    with pytest.raises(ConfigError, match=r"terms\.mfd: needs training items in every"):
        from fairdistill.engine.build import build_data, check_groups_and_cells
        from fairdistill.distributed import DistContext

        check_groups_and_cells(cfg, build_data(cfg, torch.device("cpu"), DistContext()))


def test_a_group_attribute_with_a_single_value(tmp_path):
    rows = [(f"img/{i}.png", "cat" if i % 2 else "dog", "x", "train" if i < 6 else "test") for i in range(8)]
    rng = np.random.default_rng(0)
    for path, *_ in rows:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / path)
    (tmp_path / "all.csv").write_text("path,label,site,split\n" + "".join(",".join(r) + "\n" for r in rows))
    cfg = load_config(CONFIG, [*RUN, "epochs=1", "data.name=imagecsv", f"data.root={tmp_path}",
                               "data.options={csv: all.csv, group: site, image_size: 8}", "data.batch_size=2",
                               f"out={tmp_path / 'run'}"])
    refused(cfg, r"data\.options\.group=site: the group attribute has a single value in the training set \(every item "
                 r"is in group 'x'\)")


def test_threads_beyond_the_cores_are_capped_with_a_warning(tmp_path, caplog):
    from fairdistill.engine.build import available_cores

    threads = torch.get_num_threads()
    try:
        Trainer(digits(tmp_path, "t", threads=1000))
        assert torch.get_num_threads() == available_cores()
    finally:
        torch.set_num_threads(threads)
    assert f"threads: 1000 is more than the {available_cores()} CPU core(s) available here" in caplog.text


def test_a_non_finite_loss_names_the_command_that_trains_again(tmp_path, capsys):
    from fairdistill.methods.base import TERMS, Term

    if "test-faults-nan" not in TERMS:
        @TERMS.register("test-faults-nan")
        class Nan(Term):
            needs_teacher = False
            needs_features = False

            def forward(self, inp):
                return inp.student.logits.sum() * float("nan")

    out = tmp_path / "nan"
    assert main(["train", CONFIG, *RUN, "epochs=1", f"out={out}", "terms.bad.type=test-faults-nan"]) == 2
    err = capsys.readouterr().err
    command = f"fairdistill train {out / 'config.yaml'} optim.lr=0.0001 out={tmp_path / 'nan-lr0.0001'}"
    assert "non-finite" in err and f"To train it again with a lower learning rate in a new folder: {command}" in err
    cfg = load_config(out / "config.yaml", command.split()[3:])  # the command is valid as printed
    assert cfg.optim.lr == 0.0001 and cfg.out == str(tmp_path / "nan-lr0.0001")
