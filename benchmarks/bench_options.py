"""Steps per second of one HKD training step with each speed option on and off, as ratios.

Options: ``amp=bf16``, ``amp=fp16`` (with a GradScaler), ``channels_last`` and ``compile``
(torch.compile of the student's and teacher's forwards), each against the same step with the
option off (WRN-16-4 teacher -> WRN-16-2 student, batch 64, 32x32, the trainer's ``train_step``).
An option that cannot run on this device is reported as such, not timed. Multi-process data
parallelism is exercised by ``tests/test_distributed.py`` (2 CPU processes, gloo); its speed-up
needs several devices and is not measured here.
Run: ``python benchmarks/bench_options.py [--device cuda] [--threads N]``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kd import stepper  # noqa: E402
from common import interleaved  # noqa: E402

from fairdistill.config import RunConfig, from_dict  # noqa: E402
from fairdistill.engine import Precision  # noqa: E402
from fairdistill.models import build_model  # noqa: E402

OPTIONS = {
    "amp=bf16": {"amp": "bf16"},
    "amp=fp16": {"amp": "fp16"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
}


def make_step(device: torch.device, batch: int, amp: str = "off", channels_last: bool = False, compile: bool = False):
    torch.manual_seed(0)
    student = build_model("wrn-16-2", 100).to(device).train()
    teacher = build_model("wrn-16-4", 100).to(device).eval().requires_grad_(False)
    if channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    if compile:
        for m in (student, teacher):
            m.forward_features = torch.compile(m.forward_features)
            m.forward = torch.compile(m.forward)
    cfg = from_dict(RunConfig, {"optim": {"name": "sgd", "lr": 0.01}, "terms": {"kd": {"type": "kd", "weight": 1.0, "T": 4.0}}})
    precision = Precision(device.type, amp, channels_last)
    if amp == "fp16":
        precision.scaler = torch.amp.GradScaler(device.type)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    g = torch.zeros_like(y)
    return stepper(cfg, student, teacher, x, y, g, precision=precision)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"HKD step, WRN-16-4 -> WRN-16-2, batch {args.batch}, {args.device}, {args.threads} threads")
    print(f"{'option':<15} {'off (steps/s)':>14} {'on (steps/s)':>13} {'on / off':>9}")
    off = make_step(device, args.batch)
    off_first = timed(off)
    for name, opts in OPTIONS.items():
        try:
            on = make_step(device, args.batch, **opts)
            first = timed(on)  # compilation / warm-up, and the check that the option runs here
        except Exception as e:  # an option this device does not support
            print(f"{name:<15} {'':>14} {'n/a':>13} {'':>9}  not available on {args.device}: {type(e).__name__}: {str(e)[:80]}")
            continue
        if name != "compile" and first > 5 * off_first:
            # far slower (e.g. fp16 on a CPU without fast half kernels): one more timed call each
            t_on, t_off = timed(on), timed(off)
            print(f"{name:<15} {1 / t_off:>14.3f} {1 / t_on:>13.3f} {t_off / t_on:>8.2f}x  (single steps: no fast kernels here)")
            continue
        t = interleaved({"off": off, "on": on}, rounds=3, repeats=3, warmup=1)
        note = f"  (first call {first:.1f} s)" if name == "compile" else ""
        print(f"{name:<15} {1 / t['off']:>14.2f} {1 / t['on']:>13.2f} {t['off'] / t['on']:>8.2f}x{note}")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

if __name__ == "__main__":
    main()
