"""OFD training step vs (a) a plain student step and (b) the floor: a teacher forward without
autograd plus a plain student step. WRN-28-4 -> WRN-16-2, batch 64, CPU by default.

All steps use the trainer's own ``train_step``; the teacher runs with BN in train mode (the
OFD recipe) in both the floor and the OFD step. ``--channels-last`` runs models and input in
NHWC layout (the trainer's ``channels_last`` option). Besides the ratio of the medians, the
median of the per-round ratios is printed: the three steps of a round run back to back, so
that ratio is steadier on a shared machine. Run: ``python benchmarks/bench_ofd.py``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kd import stepper  # noqa: E402
from common import interleaved_rounds  # noqa: E402

from fairdistill.config import RunConfig, from_dict  # noqa: E402
from fairdistill.engine.trainer import set_bn_mode  # noqa: E402
from fairdistill.models import build_model  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (more: steadier medians)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    student = build_model("wrn-16-2", 100).to(dev).train()
    teacher = build_model("wrn-28-4", 100).to(dev).requires_grad_(False)
    set_bn_mode(teacher, "train")
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    if args.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.batch,), device=dev)
    g = torch.zeros_like(y)
    base = {"optim": {"name": "sgd", "lr": 0.01, "nesterov": True, "weight_decay": 5e-4}}
    plain = stepper(from_dict(RunConfig, base), student, teacher, x, y, g)
    ofd_cfg = from_dict(RunConfig, {**base, "terms": {"ofd": {"type": "ofd", "weight": 1e-3}}})

    ofd = stepper(ofd_cfg, student, teacher, x, y, g)

    def floor():
        with torch.no_grad():
            teacher(x)
        plain()

    samples = interleaved_rounds({"plain": plain, "floor": floor, "ofd": ofd}, args.rounds)
    t = {k: statistics.median(v) for k, v in samples.items()}
    per_round = [o / f for o, f in zip(samples["ofd"], samples["floor"])]
    layout = "channels-last" if args.channels_last else "NCHW"
    print(f"threads {args.threads}, batch {args.batch}, WRN-28-4 -> WRN-16-2 ({args.device}, {layout})")
    for k in ("plain", "floor", "ofd"):
        print(f"{k:>6} step: {1000 * t[k]:8.1f} ms")
    print(f"ratio OFD / plain: {t['ofd'] / t['plain']:.3f}x")
    print(f"ratio OFD / floor: {t['ofd'] / t['floor']:.3f}x   (target <= 1.03x; official code ~1.08x)")
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    print(f"per-round OFD / floor: median {statistics.median(per_round):.3f}x (quartiles {q[0]:.3f}-{q[2]:.3f}, "
          f"{len(per_round)} rounds)")


if __name__ == "__main__":
    main()
