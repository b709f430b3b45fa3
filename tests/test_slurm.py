"""Sweeps as SLURM jobs through submitit: the launcher section, submission with dependencies and a
cap (against fake sbatch/sacct), the state of every run, submitit's local executor against the
local runner, requeue on preemption and resubmission after a kill, DDP tasks, and the missing extra."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from fairdistill.cli import main
from fairdistill.config import load_config
from fairdistill.engine import train
from fairdistill.errors import ConfigError
from fairdistill.report import write_report
from fairdistill.rundir import write_json, write_text
from fairdistill.sweeps import MARKER, load_spec, run_sweep
from fairdistill.sweeps.jobs import JOBS, process_alive, slurm_states
from fairdistill.sweeps.launcher import time_minutes

needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="submitit (the optional extra 'slurm') is not installed")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_s"
TINY = ["epochs=1", "progress=false", "data.batch_size=64", "data.eval_batch_size=1024"]


def write_spec(tmp_path, rows, name="tiny", out="sweep", **top) -> Path:
    spec = {"name": name, "layout": "mfd", "out": str(tmp_path / out), "seeds": [0, 1], "overrides": TINY,
            "rows": rows, **top}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def row(name, config, **kw):
    return {"name": name, "config": str(DIGITS / f"{config}.yaml"), **kw}


TEACHER_STUDENT = [row("Teacher", "teacher"), row("HKD", "hkd", teacher="Teacher")]


def marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


# ----------------------------------------------------------------------------- the launcher section


def test_slurm_times_in_minutes_by_hand():
    assert time_minutes("90") == 90
    assert time_minutes("90:30") == 91  # seconds round up
    assert time_minutes("24:00:00") == 1440
    assert time_minutes("1-12") == 36 * 60
    assert time_minutes("2-00:30") == 48 * 60 + 30
    assert time_minutes("0-00:00:01") == 1
    for bad in ("", "1h", "1:2:3:4", "0", "-5"):
        with pytest.raises(ConfigError, match="launcher.time"):
            time_minutes(bad)


@pytest.mark.parametrize("launcher, match", [
    ({"name": "slurmm"}, r"launcher\.name: 'slurmm' is not valid\. Did you mean 'slurm'"),
    ({"name": "slurm", "partion": "gpu"}, r"launcher\.partion: unknown key\. Did you mean 'partition'"),
    ({"name": "slurm", "gpus_per_run": -1}, r"launcher\.gpus_per_run: must be >= 0"),
    ({"name": "slurm", "max_parallel": 0}, r"launcher\.max_parallel: must be >= 1"),
    ({"name": "slurm", "time": 86400}, r"launcher\.time: expected str"),  # YAML's reading of 24:00:00
    ({"name": "slurm", "time": "a day"}, r"launcher\.time: 'a day' is not a SLURM time"),
    ({"name": "slurm", "mem": "lots"}, r"launcher\.mem: 'lots' is not a SLURM memory size"),
    ({"name": "slurm", "partition": "my gpus"}, r"launcher\.partition: 'my gpus' is not a SLURM partition"),
    ({"name": "slurm", "cluster": "pbs"}, r"launcher\.cluster: 'pbs' is not valid"),
])
def test_bad_launcher_keys_fail_naming_the_key(tmp_path, launcher, match):
    with pytest.raises(ConfigError, match=match):
        load_spec(write_spec(tmp_path, TEACHER_STUDENT, launcher=launcher), check_configs=False)


def test_launcher_from_the_spec_and_the_command_line(tmp_path):
    spec = load_spec(write_spec(tmp_path, TEACHER_STUDENT, launcher="slurm"), check_configs=False)
    assert spec.launcher.name == "slurm" and spec.launcher.partition is None and spec.launcher.tasks == 1
    path = write_spec(tmp_path, TEACHER_STUDENT, launcher={"name": "slurm", "partition": "gpu", "gpus_per_run": 4})
    spec = load_spec(path, check_configs=False, launcher={"partition": "long", "time": "2:00:00"})
    assert (spec.launcher.partition, spec.launcher.gpus_per_run, spec.launcher.tasks, spec.launcher.time) == \
        ("long", 4, 4, "2:00:00")
    assert load_spec(path, check_configs=False, launcher={"name": "local"}).launcher.name == "local"


def test_without_submitit_the_slurm_launcher_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    path = write_spec(tmp_path, TEACHER_STUDENT)
    assert main(["sweep", str(path), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "submitit, which is not installed: pip install 'fairdistill[slurm]'" in err and "Traceback" not in err
    assert not (tmp_path / "sweep").exists()


# ----------------------------------------------------------------------------- SLURM, faked


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch answering job ids 1000, 1001, ..., srun, and sacct reading STATES (``id|STATE``
    lines, as ``sacct -n -X -P -o JobID,State`` prints them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "sbatch": 'n=$(cat "$D/next" 2>/dev/null || echo 1000); echo $((n + 1)) > "$D/next"; '
                  'echo "$*" >> "$D/sbatch_args"; echo "Submitted batch job $n"',
        "srun": "exit 0",
        "sacct": 'cat "$D/states" 2>/dev/null',
    }
    for name, body in scripts.items():
        f = bin_dir / name
        f.write_text(f'#!/bin/bash\nD="{bin_dir}"\n{body}\n')
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def sbatch_lines(sweep: Path, job: int) -> list[str]:
    return (sweep / "slurm" / str(job) / f"{job}_submission.sh").read_text().splitlines()


@needs_submitit
def test_slurm_submission_dependencies_cap_state_and_resubmission(tmp_path, fake_slurm):
    path = write_spec(tmp_path, TEACHER_STUDENT, launcher={
        "name": "slurm", "partition": "gpu", "account": "proj", "gpus_per_run": 2, "cpus_per_run": 8, "mem": "32G",
        "time": "1-00:00:00", "max_parallel": 2})
    spec = load_spec(path)
    out = tmp_path / "sweep"
    log = io.StringIO()
    summary = run_sweep(spec, stream=log)
    text = log.getvalue()
    assert summary.ok and summary.counts == {"queued": 4}
    assert "4 runs: 4 not run" in text and "at most 2 at once" in text
    # teachers first; each student after its teacher's job; two singleton slots cap the runs at once
    jobs = json.loads((out / JOBS).read_text())
    assert {k: v["job"] for k, v in jobs.items()} == {"teacher/seed0": "1000", "teacher/seed1": "1001",
                                                       "hkd/seed0": "1002", "hkd/seed1": "1003"}
    expected = {1000: ("fd-tiny-0", "singleton"), 1001: ("fd-tiny-1", "singleton"),
                1002: ("fd-tiny-0", "afterok:1000,singleton"), 1003: ("fd-tiny-1", "afterok:1001,singleton")}
    src = str(ROOT / "src")
    for job, (name, dep) in expected.items():
        lines = sbatch_lines(out, job)
        for flag in (f"--job-name={name}", f"--dependency={dep}", "--kill-on-invalid-dep=yes", "--partition=gpu",
                     "--account=proj", "--gpus-per-node=2", "--ntasks-per-node=2", "--cpus-per-task=4", "--mem=32G",
                     "--time=1440", "--nodes=1", "--signal=USR2@90"):
            assert f"#SBATCH {flag}" in lines, (job, flag)
        assert f"export PYTHONPATH={src}${{PYTHONPATH:+:$PYTHONPATH}}" in lines
    assert "submitted HKD seed 1 as job 1003, after job 1001" in text
    assert all(marker(out / k)["status"] == "queued" for k in jobs)
    hkd = load_config(spec.row("HKD").config, [*TINY, "seed=1", f"out={out / 'hkd' / 'seed1'}"])
    assert hkd.threads == 1  # the digits configs set threads, so no threads= is added

    # again while they wait: the state of each run, nothing submitted twice
    (fake_slurm / "states").write_text("1000|RUNNING\n1001|PENDING\n1002|PENDING\n1003|PENDING\n")
    log = io.StringIO()
    summary = run_sweep(spec, stream=log)
    text = log.getvalue()
    assert "submitted" not in text and (fake_slurm / "next").read_text().strip() == "1004"
    assert "running  Teacher seed 0" in text and "queued  HKD seed 1" in text and "(job 1003, pending)" in text
    assert summary.ok and summary.counts == {"running": 1, "queued": 3}
    # the local runner leaves them to their jobs too
    log = io.StringIO()
    summary = run_sweep(load_spec(path, launcher={"name": "local"}), stream=log)
    assert summary.counts == {"busy": 4} and not summary.ok and "] start " not in log.getvalue()
    assert "queued  HKD seed 0" in log.getvalue()
    md, _ = write_report(out, plot=False)
    assert "**Partial:** 4 run(s) still queued or running" in md
    assert "- Teacher: seed 0 running (job 1000), seed 1 queued (job 1001, pending)" in md.splitlines()

    # the teacher of seed 0 failed (its job wrote why), so SLURM cancelled its student: both go again
    write_text(out / "teacher" / "seed0" / "train.log", "== job 1000\nfairdistill: error: data: out of luck\n")
    write_json(out / "teacher" / "seed0" / MARKER, {**marker(out / "teacher" / "seed0"), "status": "failed"})
    (fake_slurm / "states").write_text("1000|FAILED\n1001|RUNNING\n1002|CANCELLED by 0\n1003|PENDING\n")
    assert slurm_states(["1002", "1003", "999"]) == {"1002": "CANCELLED", "1003": "PENDING"}
    log = io.StringIO()
    run_sweep(spec, stream=log)
    text = log.getvalue()
    assert "failed  Teacher seed 0" in text and "| fairdistill: error: data: out of luck" in text
    assert "failed  HKD seed 0" in text and "job 1002 ended CANCELLED without a result" in text
    assert "submitted Teacher seed 0 as job 1004" in text and "submitted HKD seed 0 as job 1005, after job 1004" in text
    assert "#SBATCH --dependency=afterok:1004,singleton" in sbatch_lines(out, 1005)
    assert (fake_slurm / "next").read_text().strip() == "1006"  # running and queued runs left alone
    assert json.loads((out / JOBS).read_text())["hkd/seed1"]["job"] == "1003"


@needs_submitit
def test_no_slurm_here_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither sbatch nor srun
    path = write_spec(tmp_path, TEACHER_STUDENT)
    assert main(["sweep", str(path), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "sbatch and srun not found on PATH" in err and "--cluster local" in err


# ----------------------------------------------------------------------------- submitit's local executor


def spawn_sweep(spec_path: Path, log: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "fairdistill", "sweep", str(spec_path)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen)


def children_of(out: Path, keys) -> dict:
    """run -> the process id its sweep.json names while it runs (and that process is alive)."""
    found = {}
    for key in keys:
        pid = running_pid(out / key)
        if pid and process_alive(pid):
            found[key] = pid
    return found


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    """The same spec (a teacher and a student, 2 seeds, 1 epoch), 2 at once, by the local runner
    and through submitit's local executor (the slurm code path).

    The local runner's sweep is first started as a process and killed with SIGKILL while both
    teachers' processes run (they must die with it), then run again to the end."""
    tmp = tmp_path_factory.mktemp("two")
    local_path = write_spec(tmp, TEACHER_STUDENT, name="tiny", out="local", jobs=2)
    sub = load_spec(write_spec(tmp, TEACHER_STUDENT, name="tiny_sub", out="submitit", jobs=2,
                               launcher={"name": "slurm", "cluster": "local"}))
    teachers = ("teacher/seed0", "teacher/seed1")
    killed = spawn_sweep(local_path, tmp / "killed.log")
    try:
        children = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(children_of(tmp / "local", teachers)),
                            what="both teachers' processes")
    finally:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    deadline = time.monotonic() + 30
    while any(process_alive(pid) for pid in children.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in children.values() if process_alive(pid)]
    for pid in survivors:  # do not leave them behind when the assertion fails
        os.kill(pid, signal.SIGKILL)
    logs = {"survivors": survivors}
    for key, spec in (("local", load_spec(local_path)), ("submitit", sub)):
        if key == "submitit" and importlib.util.find_spec("submitit") is None:
            continue  # its tests are skipped
        logs[key] = io.StringIO()
        logs[key].summary = run_sweep(spec, stream=logs[key])
    return tmp, sub, logs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_sweep_killed_with_sigkill_takes_its_runs_along_and_its_rerun_finishes(two_sweeps):
    tmp, _, logs = two_sweeps
    assert logs["survivors"] == []  # each run's process died with its sweep
    text = logs["local"].getvalue()
    assert logs["local"].summary.counts == {"done": 4}, text
    assert "FAILED" not in text and "] skip " not in text, text
    for key in ("teacher/seed0", "teacher/seed1", "hkd/seed0", "hkd/seed1"):
        assert marker(tmp / "local" / key)["status"] == "done"


def table_lines(md: str) -> list[str]:
    return [ln for ln in md.splitlines() if ln.startswith("|")]


@needs_submitit
def test_local_executor_gives_the_local_runners_table(two_sweeps):
    tmp, _, logs = two_sweeps
    assert logs["local"].summary.ok and logs["submitit"].summary.ok, logs["submitit"].getvalue()
    assert logs["submitit"].summary.counts == {"done": 4}
    md_local, _ = write_report(tmp / "local", plot=False)
    md_sub, _ = write_report(tmp / "submitit", plot=False)
    assert len(table_lines(md_sub)) == 4 and table_lines(md_sub) == table_lines(md_local)
    assert (tmp / "submitit" / "report.csv").read_text() == (tmp / "local" / "report.csv").read_text()
    for key in ("teacher/seed0", "teacher/seed1", "hkd/seed0", "hkd/seed1"):
        a = json.loads((tmp / "local" / key / "result.json").read_text())
        b = json.loads((tmp / "submitit" / key / "result.json").read_text())
        assert a["final"] == b["final"] and a["cell_accuracy"] == b["cell_accuracy"]
        assert marker(tmp / "submitit" / key)["status"] == "done"
        assert "finished" in (tmp / "submitit" / key / "train.log").read_text()
    text = logs["submitit"].getvalue()
    # at most 2 at once, and a student's job only after its teacher's run finished
    assert text.index("done Teacher seed 0") < text.index("submitted HKD seed 0")
    assert text.index("done Teacher seed 1") < text.index("submitted HKD seed 1")


@needs_submitit
def test_rerun_submits_nothing_when_all_runs_are_done(two_sweeps):
    tmp, spec, _ = two_sweeps
    jobs = (tmp / "submitit" / JOBS).read_text()
    log = io.StringIO()
    summary = run_sweep(spec, stream=log)
    assert summary.ok and summary.counts == {"done": 4}
    assert "4 runs: 4 done" in log.getvalue() and "submitted" not in log.getvalue()
    assert (tmp / "submitit" / JOBS).read_text() == jobs
    # and the local runner, too, sees them done
    local = load_spec(tmp / "tiny_sub.yaml", launcher={"name": "local"})
    assert run_sweep(local, stream=io.StringIO()).counts == {"done": 4}


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running_pid(run: Path, other_than: int | None = None) -> int | None:
    try:
        m = marker(run)
    except (OSError, ValueError):
        return None
    pid = m.get("pid")
    return pid if m.get("status") == "running" and pid and pid != other_than else None


def epochs_written(run: Path) -> int:
    f = run / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


@needs_submitit
def test_preempted_job_requeues_and_a_killed_one_is_resubmitted_to_the_same_metrics(tmp_path):
    """A job gets SIGUSR2 (SLURM's signal before preemption or the time limit) after its first
    epoch: submitit's checkpoint hook requeues it and it resumes; then it is killed (SIGKILL)
    after its second: the sweep reports it failed, and the sweep run again resubmits it, and it
    resumes. Its metrics equal those of an uninterrupted run."""
    spec = load_spec(write_spec(tmp_path, [row("Teacher", "teacher")], overrides=[*TINY, "epochs=4"], seeds=[0],
                                launcher={"name": "slurm", "cluster": "local"}))
    run = tmp_path / "sweep" / "teacher" / "seed0"
    log = io.StringIO()
    sweep = threading.Thread(target=lambda: setattr(log, "summary", run_sweep(spec, stream=log)))
    sweep.start()
    try:
        first = wait_for(lambda: running_pid(run) if epochs_written(run) >= 1 else None, what="epoch 1")
        os.kill(first, signal.SIGUSR2)
        second = wait_for(lambda: running_pid(run, other_than=first), what="the requeued job")
        wait_for(lambda: epochs_written(run) >= 2 and running_pid(run) == second, what="epoch 2 after the requeue")
        os.kill(second, signal.SIGKILL)
    finally:
        sweep.join(120)
    text = log.getvalue()
    assert not log.summary.ok and "FAILED Teacher seed 0: job" in text, text
    train_log = (run / "train.log").read_text()
    assert "preempted or at its time limit: requeued" in train_log and "resuming" in train_log
    assert marker(run)["status"] == "failed"

    again = io.StringIO()
    summary = run_sweep(spec, stream=again)
    assert summary.ok and summary.counts == {"done": 1}, again.getvalue()
    assert "failed  Teacher seed 0" in again.getvalue() and "(resumes)" in again.getvalue()
    assert (run / "train.log").read_text().count("resuming") == 2

    reference = load_config(spec.row("Teacher").config, [*TINY, "epochs=4", "seed=0", f"out={tmp_path / 'ref'}"])
    expected = train(reference, log=lambda *a: None)
    got = json.loads((run / "result.json").read_text())
    assert got["final"] == expected["final"] and got["cell_accuracy"] == expected["cell_accuracy"]
    ref_epochs = [json.loads(ln) for ln in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    run_epochs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["test"] for e in run_epochs if "test" in e] == [e["test"] for e in ref_epochs if "test" in e]
    assert [e["train"] for e in run_epochs] == [e["train"] for e in ref_epochs]


def job_environment(monkeypatch, rank: int, tasks: int, job: str = "4242") -> None:
    """The variables submitit's local executor gives task ``rank`` of a job of ``tasks`` tasks."""
    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": job, "SUBMITIT_LOCAL_NTASKS": str(tasks),
                 "SUBMITIT_LOCAL_GLOBALID": str(rank), "SUBMITIT_LOCAL_LOCALID": str(rank),
                 "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "unset")  # restored after the test
        monkeypatch.delenv(k)


@needs_submitit
def test_job_tasks_join_ddp_as_torchrun_would_and_rank_0_writes(tmp_path, monkeypatch):
    """gpus_per_run: 2 is one job of two tasks: each gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    and MASTER_PORT (the variables torchrun sets, read by ``distributed.setup``), all GPUs stay
    visible to each (the trainer picks cuda:LOCAL_RANK), and only rank 0 writes the run's files."""
    import socket

    import fairdistill.engine
    from fairdistill.sweeps.slurm import TrainJob

    seen = []

    def fake_train(cfg, resume=False, **kw):
        seen.append({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                    "CUDA_VISIBLE_DEVICES")} | {"resume": resume, "out": cfg.out})
        print("training")
        return {"final": {"accuracy": 0.5, "deo_a": 0.25, "deo_m": 0.5, "loss": 1.0}}

    monkeypatch.setattr(fairdistill.engine, "train", fake_train)
    run = tmp_path / "sweep" / "teacher" / "seed0"
    owner = {"sweep": "tiny", "row": "Teacher", "seed": 0}
    job = TrainJob(str(DIGITS / "teacher.yaml"), [*TINY, "seed=0", f"out={run}"], str(run), owner, os.getcwd())
    run.mkdir(parents=True)
    job_environment(monkeypatch, rank=1, tasks=2)
    job()
    assert not (run / MARKER).exists() and not (run / "train.log").exists()  # rank 1 writes nothing
    job_environment(monkeypatch, rank=0, tasks=2)
    assert job() == {"accuracy": 0.5, "deo_a": 0.25, "deo_m": 0.5, "loss": 1.0}
    assert [e["RANK"] for e in seen] == ["1", "0"] and {e["WORLD_SIZE"] for e in seen} == {"2"}
    assert [e["LOCAL_RANK"] for e in seen] == ["1", "0"] and {e["CUDA_VISIBLE_DEVICES"] for e in seen} == {"0,1"}
    assert {e["MASTER_ADDR"] for e in seen} == {socket.gethostname()} and len({e["MASTER_PORT"] for e in seen}) == 1
    assert 20000 <= int(seen[0]["MASTER_PORT"]) <= 60000 and {e["out"] for e in seen} == {str(run)}
    assert marker(run) == {**owner, "status": "done", "log": "train.log", "job": "4242"}
    log = (run / "train.log").read_text()
    assert "job 4242 on" in log and "(2 task(s))" in log and "training" in log and "finished" in log

    # a started folder resumes; submitit's checkpoint hook requeues with resume
    write_text(run / "config.yaml", "{}\n")
    job()
    assert seen[-1]["resume"] is True and seen[0]["resume"] is False
    again = job.checkpoint()
    assert isinstance(again.function, TrainJob) and again.function.resume and again.function.path == str(run)
    assert marker(run)["status"] == "requeued" and "requeued; it resumes" in (run / "train.log").read_text()

    # an error: the job fails with the error line in the log and the marker says failed
    def broken(cfg, resume=False, **kw):
        raise ConfigError("data.batch_size: too large")

    monkeypatch.setattr(fairdistill.engine, "train", broken)
    with pytest.raises(ConfigError):
        job()
    assert marker(run)["status"] == "failed"
    assert (run / "train.log").read_text().splitlines()[-1] == "fairdistill: error: data.batch_size: too large"
