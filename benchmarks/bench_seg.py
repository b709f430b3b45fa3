"""Dense OFD training step vs the floor (a teacher forward without autograd + a plain student
step) on the tiny DeepLabV3+ pair of ``configs/digits_s_seg`` (teacher width 16, student width
8, 11 classes), 64x64 inputs, batch 16, CPU by default.

Every step is the trainer's own ``train_step`` with the segmentation task (per-pixel CE, 255
ignored). The teacher runs with BN in train mode and its dropouts active, the OFD recipe
(``teacher.bn_mode: train``, ``teacher.dropout: true``), in the floor and the OFD step alike; the
OFD term reads the six positions (four backbone stage ends, the ASPP projection, the decoder's
last conv) with the dividers of ``configs/digits_s_seg/ofd.yaml``. The three steps of a round run
back to back, so the per-round ratios are steadier than the ratio of the medians on a shared
machine; both are printed, the per-round ones with their quartiles.
Run: ``python benchmarks/bench_seg.py [--threads N] [--rounds R]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kd import stepper  # noqa: E402
from common import interleaved_rounds  # noqa: E402

from fairdistill.config import RunConfig, from_dict  # noqa: E402
from fairdistill.engine.trainer import set_bn_mode  # noqa: E402
from fairdistill.models import build_model  # noqa: E402
from fairdistill.tasks import TASKS  # noqa: E402

DIVIDERS = [2, 1, 2, 2, 2, 8]
"""Per-position dividers: the teacher's elements per image over the smallest position's, as configs/digits_s_seg/ofd.yaml."""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (more: steadier medians)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    student = build_model("deeplabv3plus-tiny", 11, width=8, aspp_dropout_on_features=False).to(dev).train()
    teacher = build_model("deeplabv3plus-tiny", 11, width=16, aspp_dropout_on_features=False).to(dev)
    teacher.requires_grad_(False)
    set_bn_mode(teacher, "train")
    for m in teacher.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 11, (args.batch, args.size, args.size), device=dev)
    y[:, :2] = 255  # void rows, ignored by the loss
    g = torch.arange(args.batch, device=dev) % 2
    task = TASKS.get("segmentation")()
    base = {"optim": {"name": "sgd", "lr": 0.01, "nesterov": True, "weight_decay": 5e-4}}
    plain = stepper(from_dict(RunConfig, base), student, teacher, x, y, g, 11, 2, task=task)
    ofd_cfg = from_dict(RunConfig, {**base, "terms": {"ofd": {"type": "ofd", "weight": 1e-4, "dividers": DIVIDERS}}})
    ofd = stepper(ofd_cfg, student, teacher, x, y, g, 11, 2, task=task)

    def floor():
        with torch.no_grad():
            teacher(x)
        plain()

    samples = interleaved_rounds({"plain": plain, "floor": floor, "ofd": ofd}, args.rounds)
    t = {k: statistics.median(v) for k, v in samples.items()}
    print(f"threads {args.threads}, batch {args.batch}, {args.size}x{args.size}, deeplabv3plus-tiny w16 -> w8 "
          f"({args.device})")
    for k in ("plain", "floor", "ofd"):
        print(f"{k:>6} step: {1000 * t[k]:8.1f} ms")
    print(f"ratio OFD / plain: {t['ofd'] / t['plain']:.3f}x")
    print(f"ratio OFD / floor: {t['ofd'] / t['floor']:.3f}x")
    for name, other in (("floor", "floor"), ("plain", "plain")):
        per_round = [o / f for o, f in zip(samples["ofd"], samples[other])]
        q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
        print(f"per-round OFD / {name}: median {statistics.median(per_round):.3f}x (quartiles {q[0]:.3f}-{q[2]:.3f}, "
              f"{len(per_round)} rounds)")


if __name__ == "__main__":
    main()
