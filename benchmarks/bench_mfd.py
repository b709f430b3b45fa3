"""MFD training step vs a plain student step (CPU; the CIFAR-10S setting: the MFD CNN as teacher
and student, 32x32 inputs, batch 128, 10 classes x 2 groups). Both use the trainer's own
``train_step``; the MFD step also runs the frozen teacher. Run: ``python benchmarks/bench_mfd.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kd import stepper  # noqa: E402
from common import interleaved  # noqa: E402

from fairdistill.config import RunConfig, from_dict  # noqa: E402
from fairdistill.models import build_model  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student = build_model("mfd-cnn", 10).train()
    teacher = build_model("mfd-cnn", 10).eval().requires_grad_(False)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.arange(args.batch) % 10
    g = (torch.arange(args.batch) // 10) % 2
    base = {"optim": {"name": "adam", "lr": 0.001}}
    plain = stepper(from_dict(RunConfig, base), student, teacher, x, y, g)

    mfd_cfg = from_dict(RunConfig, {**base, "terms": {"mfd": {"type": "mfd", "weight": 3.0}}})
    mfd = stepper(mfd_cfg, student, teacher, x, y, g, num_classes=10, num_groups=2)
    t = interleaved({"plain": plain, "mfd": mfd})
    print(f"threads {args.threads}, batch {args.batch}, MFD CNN -> MFD CNN, 32x32 (CPU)")
    print(f"plain student step: {1000 * t['plain']:.1f} ms")
    print(f"MFD step:           {1000 * t['mfd']:.1f} ms")
    print(f"ratio MFD / plain:  {t['mfd'] / t['plain']:.2f}x")


if __name__ == "__main__":
    main()
