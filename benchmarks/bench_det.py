"""SSD OFD training step vs its floor: a teacher forward without autograd plus a plain student step.

Pairs: ``tiny`` (default): ssd-tiny width 16 -> width 8 at 64x64 (the digits-s-det recipe's
pair, configs/digits_s_det/, 5 positions, dividers [4, 2, 1, 1, 1]); ``ssd300``: SSD300
ResNet-50 -> ResNet-18 at 300x300 (configs/voc_det/, 7 positions, dividers
[8, 4, 2, 1, 1, 1, 1]) at a small batch. Every step is the trainer's own ``train_step`` with the
detection task's MultiBox loss on random boxes (1-3 per image); the teacher's BN runs in train
mode (the OFD recipe) in the floor and the OFD step alike. Timings are interleaved rounds in one
process (``common.interleaved_rounds``); the per-round ratio OFD / floor, whose three steps run
back to back, is printed with its quartiles. Run:
``python benchmarks/bench_det.py [--pair tiny|ssd300] [--batch N] [--threads N]``.
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
from fairdistill.tasks import TASKS  # noqa: E402

PAIRS = {
    "tiny": dict(size=64, classes=10, batch=32, dividers=[4, 2, 1, 1, 1], alpha=1e-4,
                 teacher=("ssd-tiny", {"width": 16}), student=("ssd-tiny", {"width": 8})),
    "ssd300": dict(size=300, classes=20, batch=4, dividers=[8, 4, 2, 1, 1, 1, 1], alpha=1e-4,
                   teacher=("ssd300", {"backbone": "resnet50"}), student=("ssd300", {"backbone": "resnet18"})),
}


def random_targets(n: int, size: int, classes: int, generator: torch.Generator) -> list[dict]:
    """``n`` images' targets: 1-3 boxes each (sides 10-60% of the image), labels 1..classes,
    in pixels, as the detection loaders give them."""
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=generator))
        wh = (0.1 + 0.5 * torch.rand(k, 2, generator=generator)) * size
        xy = torch.rand(k, 2, generator=generator) * (size - wh)
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, classes + 1, (k,), generator=generator),
                    "difficult": torch.zeros(k, dtype=torch.bool)})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pair", choices=sorted(PAIRS), default="tiny")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 32 tiny, 4 ssd300)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (more: steadier medians)")
    p.add_argument("--repeats", type=int, default=4, help="timed calls per step kind and round")
    args = p.parse_args(argv)
    pair = PAIRS[args.pair]
    batch = args.batch or pair["batch"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    teacher = build_model(pair["teacher"][0], pair["classes"], **pair["teacher"][1]).to(dev).requires_grad_(False)
    student = build_model(pair["student"][0], pair["classes"], **pair["student"][1]).to(dev).train()
    set_bn_mode(teacher, "train")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, pair["size"], pair["size"], generator=gen).to(dev)
    y = [{k: v.to(dev) for k, v in t.items()} for t in random_targets(batch, pair["size"], pair["classes"], gen)]
    g = torch.zeros(batch, dtype=torch.long, device=dev)
    task = TASKS.get("detection")()
    base = {"optim": {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}}
    ofd_cfg = {**base, "terms": {"ofd": {"type": "ofd", "weight": pair["alpha"], "dividers": pair["dividers"]}}}
    common = dict(num_classes=pair["classes"], num_groups=2, task=task)
    plain = stepper(from_dict(RunConfig, base), student, teacher, x, y, g, **common)
    ofd = stepper(from_dict(RunConfig, ofd_cfg), student, teacher, x, y, g, **common)

    def floor():
        with torch.no_grad():
            teacher(x)
        plain()

    samples = interleaved_rounds({"plain": plain, "floor": floor, "ofd": ofd}, args.rounds, args.repeats)
    t = {k: statistics.median(v) for k, v in samples.items()}
    per_round = [o / f for o, f in zip(samples["ofd"], samples["floor"])]
    t_name, s_name = (f"{n} {' '.join(f'{k}={v}' for k, v in o.items())}" for n, o in (pair["teacher"], pair["student"]))
    print(f"threads {args.threads}, batch {batch}, {pair['size']}x{pair['size']}, {t_name} -> {s_name} ({args.device})")
    for k in ("plain", "floor", "ofd"):
        print(f"{k:>6} step: {1000 * t[k]:9.1f} ms")
    print(f"ratio OFD / plain: {t['ofd'] / t['plain']:.3f}x")
    print(f"ratio OFD / floor: {t['ofd'] / t['floor']:.3f}x")
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    print(f"per-round OFD / floor: median {statistics.median(per_round):.3f}x (quartiles {q[0]:.3f}-{q[2]:.3f}, "
          f"{len(per_round)} rounds)")


if __name__ == "__main__":
    main()
