"""Time ``mmd_loss`` (forward + backward) against a per-cell Python loop on CPU.

Batch 128, 10 classes x 2 groups, 256-d features (the CIFAR-10S setting of MFD). Prints the
median time of each (repetitions interleaved), their ratio and the relative difference of the loss values.
Run: ``PYTHONPATH=src python benchmarks/bench_mmd.py``.
"""
from __future__ import annotations

import statistics
import time

import torch

from fairdistill.methods.mfd import mmd_loss

BATCH, CLASSES, GROUPS, DIM = 128, 10, 2, 256
WARMUP, REPEATS = 5, 50


def cell_loop_mmd(s, t, y, g, num_classes, num_groups, sigma=1.0):
    """The per-(class, group) loop of the official code (reference mfd.md §1.2-1.3): the three
    kernel blocks K(T_c, T_c), K(S_cg, S_cg), K(T_c, S_cg) computed for every present cell."""

    def kernel(a, b, bandwidth):
        d = (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.t()).clamp_min(1e-12)
        return torch.exp(-d / bandwidth)

    with torch.no_grad():
        d_ts = (t.pow(2).sum(1)[:, None] + s.pow(2).sum(1)[None, :] - 2 * t @ s.t()).clamp_min(1e-12)
        bandwidth = 2 * sigma * d_ts.mean()
    total = s.new_zeros(())
    for c in range(num_classes):
        tc = t[y == c]
        if len(tc) == 0:
            continue
        for k in range(num_groups):
            sc = s[(y == c) & (g == k)]
            if len(sc) == 0:
                continue
            total = total + (
                kernel(tc, tc, bandwidth).mean() + kernel(sc, sc, bandwidth).mean()
                - 2 * kernel(tc, sc, bandwidth).mean()
            )
    return total


def median_seconds(*fns) -> list[float]:
    """Median wall time of each function; repetitions alternate between them so that load
    from other processes affects all alike."""
    for _ in range(WARMUP):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(REPEATS):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(BATCH, DIM, generator=gen).requires_grad_()
    teacher = torch.randn(BATCH, DIM, generator=gen)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    groups = torch.randint(0, GROUPS, (BATCH,), generator=gen)

    def batched():
        student.grad = None
        mmd_loss(student, teacher, labels, groups, num_classes=CLASSES, num_groups=GROUPS).backward()

    def looped():
        student.grad = None
        cell_loop_mmd(student, teacher, labels, groups, CLASSES, GROUPS).backward()

    t_batched, t_loop = median_seconds(batched, looped)
    with torch.no_grad():
        a = mmd_loss(student.double(), teacher.double(), labels, groups, num_classes=CLASSES, num_groups=GROUPS)
        b = cell_loop_mmd(student.double(), teacher.double(), labels, groups, CLASSES, GROUPS)
        a32 = mmd_loss(student, teacher, labels, groups, num_classes=CLASSES, num_groups=GROUPS)
        b32 = cell_loop_mmd(student, teacher, labels, groups, CLASSES, GROUPS)
    print(f"batch {BATCH}, {CLASSES} classes x {GROUPS} groups, {DIM}-d features, CPU, 1 thread, forward+backward")
    print(f"mmd_loss (batched):  median {t_batched * 1e3:8.3f} ms over {REPEATS} runs")
    print(f"per-cell Python loop: median {t_loop * 1e3:8.3f} ms over {REPEATS} runs")
    print(f"speed ratio loop / batched: {t_loop / t_batched:.1f}x")
    print(f"relative difference of values: float64 {abs(a - b).item() / abs(b).item():.2e}, "
          f"float32 {abs(a32 - b32).item() / abs(b32).item():.2e}")


if __name__ == "__main__":
    main()
