"""Every method's training step against the floor, in CPU time, interleaved rounds, one process.

The floor (issue 16) is a teacher forward without autograd plus a plain student step; a second
copy of the floor (``floor2``) runs in every round as a noise control: its ratio to the floor
shows how far two identical steps disagree on this machine. Each ratio is reported as the
median of the per-round ratios with its min-max, every step taken by the trainer's own
``train_step`` (``bench_kd.stepper``).

Shapes (issue 16): the MFD family (HKD, MFD, AT, FitNet, NST, AD and AD+HKD) on the MFD CNN,
teacher and student, 32x32 inputs (CIFAR-10S-like), batch 128, 10 classes x 2 groups, with the
options of ``configs/cifar10s/<method>.yaml``; the teacher in eval mode. AD needs no teacher:
its floor is the plain student step (``plain``), and AD+HKD's the floor. OFD (``--ofd``):
WRN-28-4 -> WRN-16-2, batch 64, 100 classes, the teacher's BN in train mode as the OFD recipe
(in its floor too), SGD with Nesterov momentum and weight decay.

Time is ``time.thread_time()`` of the calling thread with one PyTorch thread (``--threads``):
CPU time, so the load of other processes on a shared machine does not count (their cache and
memory-bandwidth contention still does; hence the control). The process runs with the command
line's allocator settings (``fairdistill.allocator``: no page faults from freed and re-mapped
activation buffers, which otherwise add a chaotic 50-170 ms of kernel time per step here).
``--ofd-layouts`` times the OFD pair in NCHW and/or channels-last (models and input).
Run: ``PYTHONPATH=src python benchmarks/bench_methods.py [--rounds 9] [--ofd] [--only mfd,hkd]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from fairdistill.allocator import configure  # the command line's malloc settings, before torch allocates

ALLOCATOR = configure()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kd import stepper  # noqa: E402

from fairdistill.config import RunConfig, from_dict  # noqa: E402
from fairdistill.config.presets import expand_method  # noqa: E402
from fairdistill.config.files import deep_merge  # noqa: E402
from fairdistill.engine.step import Precision  # noqa: E402
from fairdistill.engine.trainer import set_bn_mode  # noqa: E402
from fairdistill.models import build_model  # noqa: E402

MFD_FAMILY = {  # method -> (preset, term overrides of configs/cifar10s/<method>.yaml, uses a teacher)
    "hkd": ("hkd", {"kd": {"T": 1}}, True),
    "mfd": ("mfd", {"mfd": {"weight": 3.0}}, True),
    "at": ("at", {"at": {"positions": "last", "weight": 0.5}}, True),
    "fitnet": ("fitnet-simul", {"kd": {"T": 1}}, True),  # hints on the embedding + KD, one stage
    "fitnet-hint": ("fitnet", {}, True),  # the two-stage preset's hint stage (fitnet alone, no CE)
    "nst": ("nst", {"nst": {"feature": "embedding", "weight": 30.0}}, True),
    "ad": ("ad", {"adversary": {"grl_lambda": 0.001}}, False),
    "ad+hkd": ("ad+hkd", {"kd": {"T": 1}, "adversary": {"grl_lambda": 0.0001}}, True),
}
TARGETS = {"nst": 1.05, "ofd": 1.045}
"""Targets of issue 16 (the rest 1.03x)."""


def cpu_seconds(fn, repeats: int) -> float:
    """Median CPU time of the calling thread over ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def cpu_rounds(fns: dict, rounds: int, repeats: int = 3, warmup: int = 2) -> dict[str, list[float]]:
    """Per interleaved round, the median CPU time of ``repeats`` calls of each callable."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(cpu_seconds(fn, repeats))
    return samples


def ratio_line(name: str, samples: dict, base: str, target: float | None = None) -> str:
    """``name``'s per-round ratios to ``base``: median and min-max (and the target)."""
    r = [a / b for a, b in zip(samples[name], samples[base])]
    fastest = min(samples[name]) / min(samples[base])
    text = (f"{name:>12} / {base:<6} {statistics.median(r):6.3f}x  (min {min(r):.3f}, max {max(r):.3f}; "
            f"fastest/fastest {fastest:.3f}x; {1000 * statistics.median(samples[name]):6.1f} ms)")
    return text + (f"  target <= {target:.3f}x" if target else "")


def method_config(preset: str, overrides: dict, optim: dict, stage: int = 0) -> RunConfig:
    """The run config of ``preset`` with the term ``overrides``; a multi-stage preset keeps
    only stage ``stage`` (what ``stepper`` times)."""
    data = expand_method(preset)
    data = deep_merge(data, {"terms": overrides})
    data.pop("data", None)
    data.pop("teacher", None)
    stages = data.pop("stages", None)
    if stages:
        data["stages"] = [stages[stage]]
        data["stages"][0].pop("optimizer", None)
        data["stages"][0].pop("epochs_scale", None)
    return from_dict(RunConfig, {**data, "optim": optim})


def floors(teacher, x, plain) -> dict:
    """The floor (teacher forward without grad + ``plain`` student step) under two names: timed
    twice per round, ``floor2`` / ``floor`` is the noise control."""
    def floor():
        with torch.no_grad():
            teacher(x)
        plain()

    return {"floor": floor, "floor2": floor}


def mfd_family(args) -> dict:
    torch.manual_seed(0)
    student = build_model("mfd-cnn", 10).train()
    teacher = build_model("mfd-cnn", 10).eval().requires_grad_(False)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.arange(args.batch) % 10
    g = (torch.arange(args.batch) // 10) % 2
    optim = {"name": "adam", "lr": 0.001}
    plain = stepper(from_dict(RunConfig, {"optim": optim}), student, teacher, x, y, g, num_classes=10, num_groups=2)
    fns = {"plain": plain, **floors(teacher, x, plain)}
    for name, (preset, overrides, _) in MFD_FAMILY.items():
        if args.only and name not in args.only:
            continue
        cfg = method_config(preset, overrides, optim)
        fns[name] = stepper(cfg, student, teacher, x, y, g, num_classes=10, num_groups=2)
    return fns


def ofd_pair(args, channels_last: bool = False) -> dict:
    torch.manual_seed(0)
    student = build_model("wrn-16-2", 100).train()
    teacher = build_model("wrn-28-4", 100).requires_grad_(False)
    set_bn_mode(teacher, "train")
    x = torch.randn(args.ofd_batch, 3, 32, 32)
    if channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.ofd_batch,))
    g = torch.zeros_like(y)
    optim = {"name": "sgd", "lr": 0.01, "nesterov": True, "weight_decay": 5e-4}
    precision = Precision("cpu", channels_last=channels_last)
    plain = stepper(from_dict(RunConfig, {"optim": optim}), student, teacher, x, y, g, precision=precision)
    ofd = stepper(method_config("ofd", {}, optim), student, teacher, x, y, g, precision=precision)
    return {**floors(teacher, x, plain), "ofd": ofd}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ofd-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--repeats", type=int, default=3, help="calls per step and round (their median)")
    p.add_argument("--ofd", action="store_true", help="also the OFD pair (WRN-28-4 -> WRN-16-2)")
    p.add_argument("--no-mfd", action="store_true", help="skip the MFD family")
    p.add_argument("--only", default="", help="comma-separated MFD-family methods (default: all)")
    p.add_argument("--ofd-layouts", default="nchw", help="nchw, cl or nchw,cl (the OFD pair's memory layouts)")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    torch.set_num_threads(args.threads)
    print(f"CPU time per step, {args.threads} thread(s), {args.rounds} interleaved rounds x {args.repeats} calls, "
          f"allocator: {ALLOCATOR}; per-round ratios: median (min, max)")
    if not args.no_mfd:
        samples = cpu_rounds(mfd_family(args), args.rounds, args.repeats)
        print(f"MFD CNN -> MFD CNN, 32x32, batch {args.batch}, teacher in eval mode")
        print(ratio_line("floor", samples, "plain"))
        print(ratio_line("floor2", samples, "floor"))
        for name in samples:
            if name in MFD_FAMILY:
                base = "floor" if MFD_FAMILY[name][2] else "plain"
                print(ratio_line(name, samples, base, TARGETS.get(name, 1.03)))
    for layout in args.ofd_layouts.split(",") if args.ofd else []:
        samples = cpu_rounds(ofd_pair(args, layout == "cl"), args.rounds, args.repeats)
        print(f"WRN-28-4 -> WRN-16-2, 32x32, batch {args.ofd_batch}, teacher BN in train mode, "
              f"{'channels-last' if layout == 'cl' else 'NCHW'}")
        print(ratio_line("floor2", samples, "floor"))
        print(ratio_line("ofd", samples, "floor", TARGETS["ofd"]))


if __name__ == "__main__":
    main()
