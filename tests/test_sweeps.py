"""Sweeps and reports: spec validation, run ownership, skip/resume, aggregation and layouts."""
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fairdistill.cli import main
from fairdistill.config import dump_yaml, load_config
from fairdistill.engine import train
from fairdistill.errors import ConfigError, RunDirError
from fairdistill.report import mean_std, summarize_mfd, summarize_ofd, write_report
from fairdistill.sweeps import (
    LOCK, MARKER, SPEC_COPY, FolderLock, claim_action, load_spec, owner_of, plan_sweep, run_overrides, run_sweep,
)
from fairdistill.rundir import write_json, write_text
from fairdistill.sweeps.jobs import process_alive

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_s"
TINY = ["epochs=1", "progress=false", "data.batch_size=64", "data.eval_batch_size=1024"]


def write_spec(tmp_path, rows, name="tiny", **top) -> Path:
    spec = {"name": name, "layout": "mfd", "out": str(tmp_path / "sweep"), "seeds": [0], "overrides": TINY, "rows": rows, **top}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def row(name, config, **kw):
    return {"name": name, "config": str(DIGITS / f"{config}.yaml"), **kw}


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("rows, top, match", [
    ([row("Teacher", "nope")], {}, r"row 'Teacher' .*nope\.yaml does not exist"),
    ([row("Teacher", "teacher", overrides=["optim.lrr=0.1"])], {}, r"row 'Teacher' .*optim\.lrr: unknown key\. Did you mean 'lr'"),
    ([row("Teacher", "teacher", overrides=["method=hkdd"])], {}, r"row 'Teacher' .*unknown method 'hkdd'"),
    ([row("Teacher", "teacher", overrides=["model.options.widht=2"])], {}, r"row 'Teacher' .*model\.options\.widht"),
    ([row("Teacher", "teacher", overrides=["terms.kd.T=2", "terms.kd.Tee=3"])], {}, r"row 'Teacher' .*terms\.kd\.Tee"),
    ([row("Teacher", "teacher", overrides=["seed=3"])], {}, r"the sweep sets seed of every run"),
    ([row("Teacher", "teacher")], {"seedz": [0]}, r"seedz: unknown key\. Did you mean 'seeds'"),
    ([row("Teacher", "teacher"), row("HKD", "hkd", teacher="Teachr")], {}, r"no other row is named 'Teachr'\. Did you mean 'Teacher'"),
    ([row("Teacher", "teacher", seeds=[0]), row("HKD", "hkd", teacher="Teacher")], {"seeds": [0, 1]},
     r"seed 1 needs the teacher run of seed 1"),
    ([row("HKD", "hkd")], {}, r"row 'HKD' .*needs a teacher: name the row"),
    ([row("A", "teacher"), row("A", "scratch")], {}, r"'A' is also the name of rows\[0\]"),
    ([row("SS+HKD", "teacher"), row("ss hkd", "scratch")], {}, r"gives folder 'ss_hkd'"),
    ([row("Teacher", "teacher", paper={"acc": [1, 2]})], {}, r"paper\.acc: not a column of the mfd layout"),
    ([row("Teacher", "teacher", paper={"accuracy": [1, 2, 3]})], {}, r"expected a number or \[mean, std\]"),
    ([row("Teacher", "teacher")], {"layout": "table"}, r"layout: 'table' is not valid"),
    ([row("Teacher", "teacher")], {"seeds": [0, 0]}, r"a seed is listed twice"),
    ([row("Teacher", "teacher", column="(a)")], {}, r"only the ofd layout"),
    ([row("A", "teacher", teacher="B"), row("B", "teacher", teacher="A")], {}, r"cycle"),
])
def test_bad_spec_fails_before_anything_runs(tmp_path, rows, top, match):
    path = write_spec(tmp_path, rows, **top)
    with pytest.raises(ConfigError, match=match):
        load_spec(path)
    assert not (tmp_path / "sweep").exists()


def test_cli_reports_a_bad_spec_as_an_error(tmp_path, capsys):
    path = write_spec(tmp_path, [row("Teacher", "nope")])
    assert main(["sweep", str(path)]) == 2
    assert "row 'Teacher'" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    path = write_spec(tmp_path, [row("Teacher", "teacher"), row("HKD", "hkd", teacher="Teacher")], seeds=[0, 1])
    assert main(["sweep", str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "4 runs: 4 run" in err
    assert f"teacher: {tmp_path / 'sweep' / 'teacher' / 'seed1'}" in err
    assert not (tmp_path / "sweep").exists()


def test_every_committed_spec_is_valid():
    specs = sorted((ROOT / "specs").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"digits_s_mfd", "digits_s_ofd", "digits_s_seg", "mfd_cifar10s", "mfd_utkface",
                                       "mfd_celeba", "ofd_cifar100", "ofd_table1", "ofd_table2"}
    import os
    cwd = os.getcwd()
    os.chdir(ROOT)  # spec paths are relative to the repository root
    try:
        loaded = {p.stem: load_spec(p) for p in specs}
    finally:
        os.chdir(cwd)
    # spot checks against the papers' tables
    cifar = loaded["mfd_cifar10s"]
    assert [r.name for r in cifar.rows] == ["Teacher", "HKD", "FitNet", "AT", "NST", "SS", "AD", "SS+HKD", "SS+FitNet",
                                            "AD+HKD", "AD+FitNet", "MFD"]
    assert cifar.row("MFD").paper == {"accuracy": [82.77, 0.14], "deo_a": [2.73, 0.41], "deo_m": [6.08, 0.91]}
    assert "NST" not in [r.name for r in loaded["mfd_celeba"].rows]
    assert loaded["ofd_cifar100"].row("(c) OFD").paper == {"error": 24.08}
    assert loaded["ofd_table2"].row("(d) Single-layer").paper == {"error": 24.78}
    assert loaded["digits_s_mfd"].seeds == [0, 1, 2]


# ----------------------------------------------------------------------------- ownership


def resolved(spec, name, seed=0):
    r = spec.row(name)
    return load_config(r.config, run_overrides(spec, r, seed))


def test_claim_actions_from_run_directory_states(tmp_path):
    spec = load_spec(write_spec(tmp_path, [row("Teacher", "teacher")]))
    r = spec.row("Teacher")
    cfg = resolved(spec, "Teacher")
    owner = owner_of(spec, r, 0)
    path = tmp_path / "sweep" / "teacher" / "seed0"
    assert claim_action(path, owner, cfg) == ("run", "")
    # a run no sweep made (config.yaml, no marker)
    write_text(path / "config.yaml", dump_yaml(cfg))
    action, reason = claim_action(path, owner, cfg)
    assert action == "conflict" and "no sweep.json" in reason
    # another sweep's run
    write_json(path / MARKER, {**owner, "sweep": "other"})
    action, reason = claim_action(path, owner, cfg)
    assert action == "conflict" and "sweep 'other'" in reason
    # ours, killed after it wrote its config: resume
    write_json(path / MARKER, owner)
    assert claim_action(path, owner, cfg)[0] == "resume"
    # ours and finished: skip
    write_json(path / "result.json", {"final": {}})
    assert claim_action(path, owner, cfg)[0] == "skip"
    # ours but made with another config: left alone
    changed = load_config(r.config, [*run_overrides(spec, r, 0), "epochs=2"])
    action, reason = claim_action(path, owner, changed)
    assert action == "conflict" and "changed: epochs" in reason
    # a threads or progress change is no conflict
    assert claim_action(path, owner, load_config(r.config, [*run_overrides(spec, r, 0), "threads=2"]))[0] == "skip"


def test_sweep_folder_of_another_sweep_is_refused(tmp_path):
    spec = load_spec(write_spec(tmp_path, [row("Teacher", "teacher")]))
    write_text(tmp_path / "sweep" / SPEC_COPY, "name: other\n")
    with pytest.raises(RunDirError, match="holds sweep 'other'"):
        run_sweep(spec, stream=io.StringIO())
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [SPEC_COPY]


def test_a_sweep_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import os
    import subprocess

    spec = load_spec(write_spec(tmp_path, [row("Teacher", "teacher")]))
    lock = tmp_path / "sweep" / LOCK
    write_text(lock, str(os.getpid()))  # a live process holds it
    with pytest.raises(RunDirError, match=f"another sweep \\(process {os.getpid()}\\) is running"):
        run_sweep(spec, stream=io.StringIO())
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_text(lock, str(gone.pid))
    with FolderLock(tmp_path / "sweep"):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


def test_stop_ends_a_running_process():
    import subprocess
    import sys
    import time

    from fairdistill.sweeps import stop

    # the child takes SIGINT as Python's default even when the tests run with it ignored (a
    # background job of a non-interactive shell inherits SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                              "signal.signal(signal.SIGINT, signal.default_int_handler); time.sleep(60)"])
    t0 = time.perf_counter()
    stop(child)  # 2 s of grace, then SIGINT: KeyboardInterrupt ends it
    assert child.returncode not in (None, 0) and time.perf_counter() - t0 < 10


class Kill(Exception):
    pass


def test_sweep_end_to_end(tmp_path):
    """A finished teacher (skipped), its student killed earlier (resumed), a failing row and its
    skipped student, a foreign run directory; then the report, and a second plan."""
    rows = [
        row("Teacher", "teacher"),
        row("HKD", "hkd", teacher="Teacher", overrides=["epochs=2"], paper={"accuracy": [80.34, 0.35]}),
        row("Broken", "scratch", overrides=["data.batch_size=100000"]),  # fails when the run builds its data
        row("After broken", "hkd", teacher="Broken"),
        row("Foreign", "scratch"),
    ]
    spec = load_spec(write_spec(tmp_path, rows, jobs=2))
    out = tmp_path / "sweep"
    teacher_dir, hkd_dir = out / "teacher" / "seed0", out / "hkd" / "seed0"
    # this sweep trained the teacher, then the student was killed after its first epoch
    write_json(teacher_dir / MARKER, owner_of(spec, spec.row("Teacher"), 0))
    train(resolved(spec, "Teacher"))
    write_json(hkd_dir / MARKER, owner_of(spec, spec.row("HKD"), 0))

    def kill(trainer, record):
        raise Kill

    with pytest.raises(Kill):
        train(resolved(spec, "HKD"), callbacks=[kill])
    # a run that no sweep made sits where the Foreign row would go
    foreign = out / "foreign" / "seed0"
    write_json(foreign / "result.json", {"mine": True})
    before = (foreign / "result.json").read_bytes()
    teacher_before = (teacher_dir / "result.json").read_bytes()

    log = io.StringIO()
    summary = run_sweep(spec, stream=log)
    text = log.getvalue()
    assert summary.counts == {"done": 2, "failed": 1, "skipped": 1, "conflict": 1}
    assert not summary.ok
    assert "(1 already finished)" in text and "resume HKD seed 0" in text and "FAILED Broken seed 0" in text
    assert "larger than the training set" in text  # the failing run's error line, from its log
    assert "skip After broken seed 0: its teacher Broken seed 0 failed" in text
    assert "sweep tiny: 2/5 done" in text
    assert (foreign / "result.json").read_bytes() == before and sorted(p.name for p in foreign.iterdir()) == ["result.json"]
    assert (teacher_dir / "result.json").read_bytes() == teacher_before
    assert "resuming" in (hkd_dir / "train.log").read_text()
    hkd = json.loads((hkd_dir / "result.json").read_text())
    assert hkd["teacher"] == str(teacher_dir) and hkd["epochs"] == 2
    assert json.loads((hkd_dir / MARKER).read_text())["status"] == "done"
    assert json.loads((out / "broken" / "seed0" / MARKER).read_text())["status"] == "failed"
    assert not (out / "after_broken").exists()
    assert yaml.safe_load((out / SPEC_COPY).read_text())["name"] == "tiny"
    status = json.loads((out / "sweep_status.json").read_text())
    assert status["counts"] == summary.counts and status["jobs"] == 2

    md, files = write_report(out)
    assert [f.name for f in files] == ["report.md", "report.csv", "accuracy_vs_deo.png"]
    assert (out / "accuracy_vs_deo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = md.splitlines()
    assert "| Method | Accuracy | (paper) | DEO_A | (paper) | DEO_M | (paper) | Runs |" in lines
    acc = 100 * hkd["final"]["accuracy"]
    assert any(ln.startswith(f"| HKD | {acc:.2f} | 80.34 ± 0.35 |") and ln.endswith("| 1/1 |") for ln in lines)
    assert "| Broken | n/a |  | n/a |  | n/a |  | 0/1 |" in lines
    assert "- Broken: seed 0 failed" in lines and "- Foreign: seed 0 not this sweep's run" in lines

    # planned again: the finished runs are skipped, the failed one is tried again, the foreign one left alone
    again = {p.label: p.action for p in plan_sweep(spec)}
    assert again == {"Teacher seed 0": "skip", "HKD seed 0": "skip", "Broken seed 0": "run",
                     "After broken seed 0": "run", "Foreign seed 0": "conflict"}


# ----------------------------------------------------------------------------- aggregation


def fake_result(acc, deo_a, deo_m, groups=("gray", "color")):
    return {"final": {"accuracy": acc, "deo_a": deo_a, "deo_m": deo_m, "loss": 0.0}, "wall_time_s": 10.0,
            "group_names": list(groups)}


def fake_sweep(tmp_path, layout, rows, results: dict) -> Path:
    """A sweep folder written by hand: spec copy, markers and result.json files."""
    folder = tmp_path / "fake"
    spec = {"name": "fake", "layout": layout, "seeds": [0, 1, 2], "rows": rows}
    write_text(folder / SPEC_COPY, yaml.safe_dump(spec, sort_keys=False))
    spec_obj = load_spec(folder / SPEC_COPY, check_configs=False)
    for (name, seed), result in results.items():
        r = spec_obj.row(name)
        run = folder / r.dir / f"seed{seed}"
        write_json(run / MARKER, {**owner_of(spec_obj, r, seed), "status": "done" if result else "failed"})
        if result:
            write_json(run / "result.json", result)
    return folder


def test_mean_and_sample_std_by_hand():
    mean, std = mean_std([80.0, 82.0, 84.0])
    assert mean == 82.0 and std == 2.0  # sqrt((4 + 0 + 4) / (3 - 1))
    assert mean_std([5.0]) == (5.0, None)
    s = summarize_mfd([fake_result(0.80, 0.10, 0.20), fake_result(0.82, 0.12, 0.30), fake_result(0.84, 0.17, 0.40)])
    assert s["accuracy"][0] == pytest.approx(82.0) and s["accuracy"][1] == pytest.approx(2.0)
    assert s["deo_a"][0] == pytest.approx(13.0) and s["deo_a"][1] == pytest.approx(math.sqrt(13.0))  # (9 + 1 + 16) / 2
    assert s["deo_m"][1] == pytest.approx(10.0)


def test_median_error_rate_by_hand():
    results = [fake_result(a, 0, 0) for a in (0.77, 0.78, 0.75, 0.79, 0.70)]
    s = summarize_ofd(results)  # errors 23, 22, 25, 21, 30 -> sorted 21 22 23 25 30
    assert s["median"] == pytest.approx(23.0) and s["min"] == pytest.approx(21.0) and s["max"] == pytest.approx(30.0)
    assert summarize_ofd(results[:4])["median"] == pytest.approx(22.5)  # even count: mean of the middle two


def test_mfd_report_layout_and_csv(tmp_path):
    rows = [{"name": "Teacher", "config": "unused.yaml", "paper": {"accuracy": [79.62, 0.14], "deo_a": [15.63, 0.44],
                                                                    "deo_m": [31.32, 1.47]}},
            {"name": "SS+HKD", "config": "unused.yaml", "teacher": "Teacher"}]
    results = {("Teacher", 0): fake_result(0.80, 0.10, 0.20), ("Teacher", 1): fake_result(0.82, 0.12, 0.30),
               ("Teacher", 2): fake_result(0.84, 0.17, 0.40), ("SS+HKD", 0): fake_result(0.9, 0.05, 0.10),
               ("SS+HKD", 1): None}
    folder = fake_sweep(tmp_path, "mfd", rows, results)
    md, files = write_report(folder, plot=False)
    lines = md.splitlines()
    assert lines[0] == "# fake"
    assert "sample standard deviation (ddof = 1)" in md
    assert "| Teacher | 82.00 ± 2.00 | 79.62 ± 0.14 | 13.00 ± 3.61 | 15.63 ± 0.44 | 30.00 ± 10.00 | 31.32 ± 1.47 | 3/3 |" in lines
    assert "| SS+HKD | 90.00 |  | 5.00 |  | 10.00 |  | 1/3 |" in lines
    assert "- SS+HKD: seed 1 failed, seed 2 not run" in lines
    assert (folder / "report.md").read_text() == md
    records = list(csv.DictReader((folder / "report.csv").open()))
    assert records[0]["method"] == "Teacher" and float(records[0]["accuracy_mean"]) == pytest.approx(82.0)
    assert float(records[0]["deo_a_std"]) == pytest.approx(math.sqrt(13.0), abs=1e-4)
    assert records[0]["paper_deo_m_mean"] == "31.32" and records[1]["accuracy_std"] == ""
    assert [f.name for f in files] == ["report.md", "report.csv"]


def test_ofd_report_median_and_pivot(tmp_path):
    rows = [{"name": f"({s}) {m}", "label": m, "column": f"({s})", "config": "unused.yaml",
             **({"paper": {"error": p}} if p else {})}
            for s, m, p in (("a", "Original", 22.72), ("a", "OFD", 20.89), ("b", "Original", 24.88), ("b", "OFD", None))]
    accs = {"(a) Original": (0.77, 0.78, 0.75), "(a) OFD": (0.80, 0.79, 0.81), "(b) Original": (0.70, 0.72, 0.74)}
    results = {(n, s): fake_result(a[s], 0, 0, groups=["all"]) for n, a in accs.items() for s in range(3)}
    folder = fake_sweep(tmp_path, "ofd", rows, results)
    md, _ = write_report(folder)
    lines = md.splitlines()
    assert "| Method | (a) | (b) |" in lines
    assert "| Original | 23.00 / 22.72 | 28.00 / 24.88 |" in lines
    assert "| OFD | 20.00 / 20.89 | n/a (0/3) / - |" in lines
    assert "median over the runs" in md
    assert not (folder / "accuracy_vs_deo.png").exists()  # one group (CIFAR-100): DEO is meaningless
    records = list(csv.DictReader((folder / "report.csv").open()))
    assert records[0]["column"] == "(a)" and float(records[0]["error_median"]) == pytest.approx(23.0)


def test_report_of_a_folder_that_is_no_sweep(tmp_path):
    with pytest.raises(RunDirError, match="not a sweep folder"):
        write_report(tmp_path)


def test_committed_reduced_report_has_the_layout_of_a_rerun():
    """docs/digits_s_mfd.md and .csv were made by `fairdistill report`; a re-run gives the same
    table header, the same rows in the same order and the same CSV columns."""
    from fairdistill.report import TableRow, mfd_table

    spec = load_spec(ROOT / "specs" / "digits_s_mfd.yaml", check_configs=False)
    md, records = mfd_table([TableRow(r.label, [], len(r.seeds), r.paper) for r in spec.rows], with_paper=True)
    doc = (ROOT / "docs" / "digits_s_mfd.md").read_text().splitlines()
    header, sep = md.splitlines()[:2]
    start = doc.index(header)
    assert doc[start + 1] == sep
    assert [ln.split(" | ")[0] for ln in doc[start + 2:start + 2 + len(spec.rows)]] == [f"| {r.name}" for r in spec.rows]
    with (ROOT / "docs" / "digits_s_mfd.csv").open() as f:
        assert next(csv.reader(f)) == list(records[0])


# ----------------------------------------------------------------------------- signals and the runs' processes


CHILD = ROOT / "src" / "fairdistill" / "sweeps" / "child.py"


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_a_runs_process_dies_with_its_sweep(tmp_path, platform):
    """die_with_parent: by PR_SET_PDEATHSIG on Linux, by a thread watching the parent elsewhere
    (forced here by naming another platform). The "sweep" forks the "run", waits until it is
    set up, and ends; the run gets SIGTERM (KeyboardInterrupt) and says how it noticed."""
    if platform == "linux" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    script = f"""
import importlib.util, os, signal, sys, time
spec = importlib.util.spec_from_file_location("child", {str(CHILD)!r})
child = importlib.util.module_from_spec(spec)
spec.loader.exec_module(child)
if os.fork():  # the sweep
    while not os.path.exists({str(ready)!r}):
        time.sleep(0.01)
    os._exit(0)
signal.signal(signal.SIGTERM, child._interrupt)
sys.platform = {platform!r}
how = child.die_with_parent(os.getppid(), every=0.05)
open({str(ready)!r}, "w").close()
try:
    time.sleep(30)
except KeyboardInterrupt:
    open({str(stopped)!r}, "w").write(how)
"""
    subprocess.run([sys.executable, "-c", script], timeout=30, check=True)
    deadline = time.monotonic() + 20
    while not stopped.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stopped.read_text() == ("prctl" if platform == "linux" else "watcher")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_sweep_started_with_sigint_ignored_stops_on_sigint_and_sigterm(tmp_path, sig):
    """A script's background job inherits SIGINT ignored (so do its children): the sweep and its
    run's process still stop on SIGINT and on SIGTERM; the run is marked interrupted."""

    path = write_spec(tmp_path, [row("Teacher", "teacher", overrides=["epochs=50"])])
    run = tmp_path / "sweep" / "teacher" / "seed0"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = tmp_path / "sweep.log"
    sweep = subprocess.Popen([sys.executable, "-m", "fairdistill", "sweep", str(path)], env=env, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        child = None
        deadline = time.monotonic() + 120
        while child is None and time.monotonic() < deadline and sweep.poll() is None:
            try:
                child = json.loads((run / MARKER).read_text()).get("pid")
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        assert child, log.read_text()
        sweep.send_signal(getattr(signal, sig))
        assert sweep.wait(timeout=60) == 130, log.read_text()
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert not process_alive(child)
    assert json.loads((run / MARKER).read_text())["status"] == "interrupted"
    assert "sweep interrupted; run the same command again to resume it" in log.read_text()
