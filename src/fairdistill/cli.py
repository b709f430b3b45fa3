"""Command-line interface: ``fairdistill train | config | eval | demo | sweep | report | tsne | plot``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import ConfigError, FairdistillError

log = logging.getLogger("fairdistill")
_STARTED = time.perf_counter()  # the command's start: result.json's startup_s counts from here


def _pct(v) -> str:
    return "   n/a" if v is None or v != v else f"{100 * v:6.2f}"


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def train_config(config: str, overrides: list[str], resume: bool):
    """The config of ``fairdistill train``: from a YAML file and overrides, or, with ``--resume``
    and a run directory in place of the file, the run's saved config (only the keys that may
    change on resume may be overridden; see :meth:`fairdistill.rundir.RunDir.resume_config`)."""
    from .config import load_config
    from .rundir import RunDir

    path = Path(config)
    if path.is_dir():
        rd = RunDir(path)
        if not resume:
            if rd.finished:
                raise ConfigError(f"{path} is a finished run folder; evaluate it with `fairdistill eval {path}`")
            raise ConfigError(f"{path} is a run folder, not a config file; to continue it: fairdistill train --resume {path}")
        return rd.resume_config(overrides)
    return load_config(path, overrides)


def cmd_train(args) -> int:
    from .engine import train
    from .engine.build import default_out
    from .tasks import TASKS

    cfg = train_config(args.config, args.overrides, args.resume)
    try:
        result = train(cfg, resume=args.resume, started=_STARTED)
    except KeyboardInterrupt:
        print(f"fairdistill: interrupted; continue with: fairdistill train --resume {cfg.out or default_out(cfg)}",
              file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    print(f"finished {cfg.name}: {TASKS.get(result['task']).summary(result['final'])}  ({result['wall_time_s']:.1f} s)")
    return 0


def cmd_config(args) -> int:
    from .config import dump_yaml, load_config, needs_teacher

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_yaml(cfg))
    who = needs_teacher(cfg)
    if who and not (cfg.teacher.run or cfg.teacher.checkpoint):
        print(f"fairdistill: note: terms.{who[0]} needs a teacher: `train` will need teacher.run=RUN_DIR", file=sys.stderr)
    return 0


def warn_run_state(run_dir: str) -> None:
    """Warn (stderr) when the run is still being written, or unfinished and at which epoch."""
    from .engine.checkpoint import run_notes

    for note in run_notes(run_dir):
        log.warning(note)


CELL_TABLES = {"classification": ("cell_accuracy", "accuracy"), "segmentation": ("iou_by_group", "IoU"),
               "detection": ("ap_by_group", "AP")}
"""Per task, the result key of the per-(group, class) table ``eval`` prints and what it holds."""


def cmd_eval(args) -> int:
    from .engine import evaluate_run
    from .engine.checkpoint import checkpoint_progress
    from .rundir import RunDir

    warn_run_state(args.run_dir)
    metrics = evaluate_run(args.run_dir, device=args.device, predictions=args.predictions)
    rd = RunDir(args.run_dir)
    metrics["finished"], metrics["epochs_done"] = rd.finished, (checkpoint_progress(rd.checkpoint) or {}).get("epochs_done")
    if args.predictions:
        print(f"predictions written: {args.predictions}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        from .tasks import TASKS

        print(f"{args.run_dir}: {TASKS.get(metrics['task']).summary(metrics)}")
        key, what = CELL_TABLES[metrics["task"]]
        print(f"per-(group, class) {what} (x100):")
        print("  group      " + " ".join(f"{c[:6]:>6}" for c in metrics["class_names"]))
        for gname, row in zip(metrics["group_names"], metrics[key]):
            print(f"  {gname[:10]:<10} " + " ".join(_pct(v) for v in row))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, configs=args.configs, seeds=args.seeds, overrides=args.overrides, task=args.task)
    return 0


def cmd_sweep(args) -> int:
    from .sweeps import load_spec, run_sweep

    launcher = {key: getattr(args, key) for key in ("cluster", "partition", "account", "gpus_per_run", "cpus_per_run",
                                                     "mem", "time", "max_parallel") if getattr(args, key) is not None}
    launcher.update({"name": args.launcher} if args.launcher else {}, **({"wait": True} if args.wait else {}))
    spec = load_spec(args.spec, args.overrides, out=args.out, jobs=args.jobs, launcher=launcher)
    try:
        summary = run_sweep(spec, dry_run=args.dry_run)
    except KeyboardInterrupt:
        print("fairdistill: sweep interrupted; run the same command again to resume it", file=sys.stderr)
        return 130
    if not args.dry_run:
        print(f"table: fairdistill report {spec.out}")
    return 0 if summary.ok else 1


def cmd_report(args) -> int:
    from .report import write_report

    text, files = write_report(args.dir, plot=not args.no_plot)
    print(text)
    print("written: " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


def cmd_tsne(args) -> int:
    from .plots import tsne_run

    warn_run_state(args.run_dir)
    settings = {k: v for k, v in (("perplexity", args.perplexity), ("max_iter", args.max_iter),
                                  ("random_state", args.random_state)) if v is not None}
    out = tsne_run(args.run_dir, out=args.out, max_points=args.max_points, device=args.device, **settings)
    print(f"written: {out}")
    return 0


def cmd_plot(args) -> int:
    from pathlib import Path

    from .plots import training_curves

    out = args.out or (Path(args.run_dirs[0]) / "curves.png" if len(args.run_dirs) == 1 else Path("curves.png"))
    print(f"written: {training_curves(args.run_dirs, out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fairdistill", description="Knowledge distillation with accuracy and group fairness.")
    p.add_argument("--version", action="version", version=version_text())
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run from a config file")
    t.add_argument("config", help="YAML config file (see configs/); with --resume also a run directory")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 seed=1 out=runs/x optim.lr=0.01")
    t.add_argument("--resume", action="store_true",
                   help="continue a killed run from its last checkpoint: `train --resume RUN_DIR` (its saved config; "
                        "only device, threads, progress, compile may be overridden) or `train CONFIG ... --resume`")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="print the resolved config (presets, bases, defaults) as YAML; exit 2 if invalid")
    c.add_argument("config", help="YAML config file (see configs/)")
    c.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    c.set_defaults(func=cmd_config)

    e = sub.add_parser("eval", help="re-evaluate a finished run's checkpoint on its test set")
    e.add_argument("run_dir")
    e.add_argument("--device", default=None, help="override the run's device (cpu, cuda)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--predictions", default=None, metavar="FILE.csv",
                   help="also write one row per test item: index, label, group, prediction, class probabilities "
                        "(classification runs)")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="teacher and students on the embedded digits-s data sets, as one table")
    d.add_argument("--out", default="runs/demo", help="folder of the demo's runs (default runs/demo; "
                   "segmentation and detection runs under OUT/<task>/)")
    d.add_argument("--task", choices=("classification", "segmentation", "detection"), default=None,
                   help="which demo: classification on digits-s (default), segmentation on digits-s-seg, "
                        "detection on digits-s-det")
    d.add_argument("--configs", default=None, help="folder of the demo's configs (default: the task's, "
                   "configs/digits_s, configs/digits_s_seg or configs/digits_s_det)")
    d.add_argument("--seeds", type=_positive, default=1, help="seeds per row (mean +- std when > 1)")
    d.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sweep", help="train a grid of configs x seeds from a spec file (specs/)")
    s.add_argument("spec", help="YAML spec: name, seeds, rows (name, config, overrides, teacher), layout")
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to every run of the sweep")
    s.add_argument("--jobs", type=int, default=None, help="runs at once (default: the spec's jobs)")
    s.add_argument("--out", default=None, help="sweep folder (default: the spec's out, else runs/sweeps/<name>)")
    s.add_argument("--dry-run", action="store_true", help="print what would run, resume, be skipped or left alone")
    s.add_argument("--launcher", choices=("local", "slurm"), default=None,
                   help="local: processes on this machine (default); slurm: one SLURM job per run (submitit)")
    s.add_argument("--cluster", choices=("slurm", "local"), default=None,
                   help="with --launcher slurm: local runs the jobs on this machine (submitit's local executor)")
    s.add_argument("--partition", default=None, help="SLURM partition of the jobs")
    s.add_argument("--account", default=None, help="SLURM account of the jobs")
    s.add_argument("--gpus-per-run", type=int, default=None, help="GPUs per run; N > 1: N DDP tasks in one job")
    s.add_argument("--cpus-per-run", type=int, default=None, help="CPU cores per run (shared by its tasks)")
    s.add_argument("--mem", default=None, help="memory per run, as sbatch --mem (32G)")
    s.add_argument("--time", default=None, help="time limit per job, as sbatch --time (24:00:00); jobs requeue and resume")
    s.add_argument("--max-parallel", type=int, default=None, help="at most this many runs at once on the cluster")
    s.add_argument("--wait", action="store_true", help="with --launcher slurm: watch the jobs until all have ended")
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="aggregate a sweep folder into the paper's table (Markdown, CSV, plot)")
    r.add_argument("dir", help="the sweep folder (holds spec.yaml)")
    r.add_argument("--no-plot", action="store_true", help="do not draw accuracy_vs_deo.png")
    r.set_defaults(func=cmd_report)

    ts = sub.add_parser("tsne", help="t-SNE of a run's test-set embeddings as PNG (MFD supplement 1.4 settings)")
    ts.add_argument("run_dir")
    ts.add_argument("--out", default=None, help="PNG file (default RUN_DIR/tsne.png)")
    ts.add_argument("--max-points", type=int, default=None, help="a random subset of the test set of this size")
    ts.add_argument("--perplexity", type=float, default=None, help="default 200 (the supplement)")
    ts.add_argument("--max-iter", type=int, default=None, help="default 250 (the supplement)")
    ts.add_argument("--random-state", type=int, default=None, help="default 5 (the supplement)")
    ts.add_argument("--device", default=None, help="override the run's device (cpu, cuda)")
    ts.set_defaults(func=cmd_tsne)

    pl = sub.add_parser("plot", help="training curves (loss parts, accuracy, DEO_A, DEO_M per epoch) of runs as PNG")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (several overlay)")
    pl.add_argument("--out", default=None, help="PNG file (default RUN_DIR/curves.png for one run, else ./curves.png)")
    pl.set_defaults(func=cmd_plot)
    return p


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return f"fairdistill {__version__} (torch {torch}, Python {sys.version.split()[0]})"


class _StderrHandler(logging.StreamHandler):
    """``fairdistill: warning: ...`` on whatever ``sys.stderr`` is when a record is emitted."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def format(self, record: logging.LogRecord) -> str:
        return f"fairdistill: {record.levelname.lower()}: {record.getMessage()}"


def setup_logging() -> None:
    """Library warnings (``logging``) as ``fairdistill: warning: ...`` lines on stderr."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
        log.setLevel(logging.INFO)


def _quiet_stdout() -> None:
    """After a broken pipe (``fairdistill eval --json | head``): send what is left to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; every ordinary failure is one ``fairdistill: error:`` line and exit 2
    (130 when interrupted, 141 when stdout is a closed pipe), never a traceback. The process's
    malloc settings are applied first (:func:`fairdistill.allocator.configure`)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        from .allocator import configure

        configure()  # before torch allocates: glibc malloc settings (FAIRDISTILL_MALLOC; allocator.py)
        rc = args.func(args)
        sys.stdout.flush()
        return rc
    except FairdistillError as e:
        print(f"fairdistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fairdistill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except OSError as e:  # an ordinary system failure outside the checked writes: say what and where
        where = f": {e.filename}" if e.filename else ""
        print(f"fairdistill: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
