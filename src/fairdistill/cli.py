"""Command-line interface: ``fairdistill train | config | eval | demo | sweep | report | tsne | plot``."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import FairdistillError


def _pct(v) -> str:
    return "   n/a" if v is None or v != v else f"{100 * v:6.2f}"


def cmd_train(args) -> int:
    from .config import load_config
    from .engine import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    f = result["final"]
    print(f"finished {cfg.name}: accuracy {_pct(f['accuracy'])}  DEO_A {_pct(f['deo_a'])}  DEO_M {_pct(f['deo_m'])}  "
          f"({result['wall_time_s']:.1f} s)")
    return 0


def cmd_config(args) -> int:
    from .config import dump_yaml, load_config, needs_teacher

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_yaml(cfg))
    who = needs_teacher(cfg)
    if who and not (cfg.teacher.run or cfg.teacher.checkpoint):
        print(f"fairdistill: note: terms.{who[0]} needs a teacher: `train` will need teacher.run=RUN_DIR", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .engine import evaluate_run

    metrics = evaluate_run(args.run_dir, device=args.device)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.run_dir}: accuracy {_pct(metrics['accuracy'])}  DEO_A {_pct(metrics['deo_a'])}  "
              f"DEO_M {_pct(metrics['deo_m'])}  loss {metrics['loss']:.4f}")
        names = metrics["group_names"]
        print("per-(group, class) accuracy (x100):")
        print("  group      " + " ".join(f"{c[:6]:>6}" for c in metrics["class_names"]))
        for gname, row in zip(names, metrics["cell_accuracy"]):
            print(f"  {gname[:10]:<10} " + " ".join(_pct(v) for v in row))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, configs=args.configs, seeds=args.seeds, overrides=args.overrides)
    return 0


def cmd_sweep(args) -> int:
    from .sweeps import load_spec, run_sweep

    spec = load_spec(args.spec, args.overrides, out=args.out, jobs=args.jobs)
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
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run from a config file")
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 seed=1 out=runs/x optim.lr=0.01")
    t.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="print the resolved config (presets, bases, defaults) as YAML; exit 2 if invalid")
    c.add_argument("config", help="YAML config file (see configs/)")
    c.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    c.set_defaults(func=cmd_config)

    e = sub.add_parser("eval", help="re-evaluate a finished run's checkpoint on its test set")
    e.add_argument("run_dir")
    e.add_argument("--device", default=None, help="override the run's device (cpu, cuda)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="teacher and students on the embedded digits-s data set, as one table")
    d.add_argument("--out", default="runs/demo", help="folder of the demo's runs (default runs/demo)")
    d.add_argument("--configs", default="configs/digits_s", help="folder of the demo's configs")
    d.add_argument("--seeds", type=int, default=1, help="seeds per row (mean +- std when > 1)")
    d.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sweep", help="train a grid of configs x seeds from a spec file (specs/)")
    s.add_argument("spec", help="YAML spec: name, seeds, rows (name, config, overrides, teacher), layout")
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to every run of the sweep")
    s.add_argument("--jobs", type=int, default=None, help="runs at once (default: the spec's jobs)")
    s.add_argument("--out", default=None, help="sweep folder (default: the spec's out, else runs/sweeps/<name>)")
    s.add_argument("--dry-run", action="store_true", help="print what would run, resume, be skipped or left alone")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FairdistillError as e:
        print(f"fairdistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fairdistill: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
