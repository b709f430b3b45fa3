"""Command-line interface: ``fairdistill train | eval | demo``."""
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fairdistill", description="Knowledge distillation with accuracy and group fairness.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run from a config file")
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 seed=1 out=runs/x optim.lr=0.01")
    t.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    t.set_defaults(func=cmd_train)

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
