"""Channels-last against NCHW per model family: one plain training step of each zoo family.

The measurement behind ``channels_last: auto`` (``fairdistill.engine.defaults.LAYOUT_FAMILIES``):
per family a representative shape, one SGD step (forward, a loss on every output, backward,
update) in NCHW and in channels-last (model and input converted once, outside the step, as the
trainer does), and a second NCHW copy as the noise control. CPU time of this thread
(``time.thread_time``, far less sensitive than wall time to the other processes of a shared
machine), one thread, in interleaved rounds; per round the ratio to the NCHW step, printed as the
median and the range over rounds. The process runs under the CLI's allocator settings
(``--malloc system``: glibc's defaults). Run: ``python benchmarks/bench_layout.py [--family NAME ...]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--family", action="append", default=None, help="families to time (default: all)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="steps per variant and round")
    p.add_argument("--malloc", choices=("tuned", "system"), default="tuned")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


# family -> (zoo name, options, classes, image side, batch)
CASES = {
    "cifar_cnn": ("mfd-cnn", {"image_size": 32}, 10, 32, 128),
    "cifar_cnn@8": ("mfd-cnn", {"image_size": 8}, 10, 8, 128),
    "wrn": ("wrn-16-2", {}, 100, 32, 64),
    "resnet_cifar": ("resnet20", {}, 100, 32, 64),
    "pyramidnet": ("pyramidnet", {"depth": 20, "alpha": 48}, 100, 32, 64),
    "resnet_imagenet": ("resnet18", {}, 10, 112, 8),
    "mobilenetv2": ("mobilenetv2", {}, 10, 112, 8),
    "mobilenet": ("mobilenet_v1", {}, 10, 112, 8),
    "shufflenet": ("shufflenet_v2_x1_0", {}, 10, 112, 8),
    "deeplab": ("deeplabv3plus-tiny", {}, 11, 64, 8),
    "ssd": ("ssd-tiny", {}, 10, 64, 8),
}


def outputs(logits):
    """Every tensor of a model's output (a tensor, or the (loc, conf) pair of a detector)."""
    return [logits] if hasattr(logits, "shape") else [t for t in logits]


def make_step(case, channels_last: bool, device):
    import torch

    from fairdistill.models import build_model

    name, options, classes, side, batch = case
    torch.manual_seed(0)
    model = build_model(name, classes, **options).to(device).train()
    x = torch.randn(batch, 3, side, side, device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        loss = sum(t.float().square().mean() for t in outputs(model.forward_features(x).logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def rounds(fns: dict, n: int, repeats: int) -> dict[str, list[float]]:
    """Per interleaved round, each callable's mean thread CPU time over ``repeats`` calls."""
    for fn in fns.values():
        fn()
        fn()
    out = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(repeats):
                fn()
            out[k].append((time.thread_time() - t0) / repeats)
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main(argv=None) -> None:
    args = parse(argv)
    os.environ.setdefault("FAIRDISTILL_MALLOC", args.malloc)
    from fairdistill.allocator import configure

    malloc = configure()  # before torch allocates, as the CLI
    import torch

    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(f"one plain SGD step per family, 1 thread, {args.device}, malloc {malloc}; CPU time, {args.rounds} "
          f"interleaved rounds; ratio to NCHW: median [range]")
    print(f"{'family':<16} {'model':<20} {'shape':<16} {'NCHW ms':>9} {'channels-last / NCHW':>22} {'NCHW copy / NCHW':>20}")
    for family in args.family or CASES:
        case = CASES[family]
        fns = {"nchw": make_step(case, False, device), "cl": make_step(case, True, device),
               "nchw2": make_step(case, False, device)}
        t = rounds(fns, args.rounds, args.repeats)
        cl = [a / b for a, b in zip(t["cl"], t["nchw"])]
        noise = [a / b for a, b in zip(t["nchw2"], t["nchw"])]
        shape = f"{case[4]}x3x{case[3]}x{case[3]}"
        print(f"{family:<16} {case[0]:<20} {shape:<16} {1000 * statistics.median(t['nchw']):>9.1f} "
              f"{spread(cl):>22} {spread(noise):>20}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
