"""An MFD training epoch with the teacher cache against one without (CPU time, interleaved).

CIFAR-10S-like: MFD CNN teacher and student, 32x32 images (random bytes, normalised with
CIFAR's statistics), 10 classes x 2 groups, batch 128, horizontal flips, the MFD term as
``configs/cifar10s/mfd.yaml`` (lambda 3) and Adam; ``--items`` training items (a multiple of
the batch). An epoch is the trainer's loop: the loader's batches and ``train_step`` for each,
the teacher's embedding either computed or served (``engine/teacher_cache.py``, both views in
memory). Before timing, one epoch of each from the same initial student must give the same
losses bit for bit. Rounds alternate the two; each round's ratio is cached / uncached CPU time
(``time.thread_time``), reported as the median with its min-max, beside the one-off build time
(two teacher passes over the items). Run: ``PYTHONPATH=src python benchmarks/bench_cache.py``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

from fairdistill.allocator import configure  # the command line's malloc settings, before torch allocates

ALLOCATOR = configure()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import method_config  # noqa: E402

from fairdistill.data import BatchLoader  # noqa: E402
from fairdistill.data.base import ImageDataset  # noqa: E402
from fairdistill.engine.stages import make_optimizer, resolve_stages  # noqa: E402
from fairdistill.engine.step import Precision, StageRun, StudentStep, train_step  # noqa: E402
from fairdistill.engine.teacher_cache import batch_items, build_teacher_cache  # noqa: E402
from fairdistill.methods.base import SetupContext  # noqa: E402
from fairdistill.methods.objective import Objective  # noqa: E402
from fairdistill.models import build_model  # noqa: E402
from fairdistill.tasks import TASKS  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def make_run(student, teacher, loader, cfg, cache=None):
    """A StageRun of ``cfg``'s one stage, its terms set up from a dry forward as the trainer does."""
    task = TASKS.get("classification")()
    objective = Objective(cfg.terms, task)
    x = next(iter(loader.epoch(0)))[0]
    with torch.no_grad():
        ctx = SetupContext(teacher=teacher, student_features=student.forward_features(x),
                           teacher_features=teacher.forward_features(x), num_classes=10, num_groups=2, device=x.device)
    for term in objective.terms.values():
        term.setup(ctx)
    stage = resolve_stages(cfg, objective)[0]
    opt = make_optimizer(list(student.parameters()) + list(objective.parameters()), cfg.optim)
    run = StageRun(stage, StudentStep(student, objective), [opt], teacher, Precision("cpu"), task, teacher_cache=cache)
    run.weights = objective.current_weights(stage.active, 0, 1)
    return run


def epoch(run, loader, e: int) -> list[float]:
    """One epoch of ``run`` (served from its cache when it has one), its randomness (the
    student's dropout) seeded by ``e`` as the trainer seeds each epoch; the step losses."""
    torch.manual_seed(1000 + e)
    items = batch_items(loader, e) if run.teacher_cache is not None else None
    losses = []
    for batch in loader.epoch(e):
        parts, _ = train_step(run, batch, e, None if items is None else next(items))
        losses.append(parts["loss"].item())
    return losses


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=2560)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.items
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels, groups = torch.arange(n) % 10, (torch.arange(n) // 10) % 2
    data = ImageDataset(images, labels, groups, 10, 2, name="cifar10s-like", mean=CIFAR_MEAN, std=CIFAR_STD)
    loader = BatchLoader(data, args.batch, flip=True, drop_last=True, seed=0)
    teacher = build_model("mfd-cnn", 10).eval().requires_grad_(False)
    student0 = build_model("mfd-cnn", 10).train()
    cfg = method_config("mfd", {"mfd": {"weight": 3.0}}, {"name": "adam", "lr": 0.001})
    start = time.thread_time()
    cache = build_teacher_cache(teacher, loader, ["embedding"], Precision("cpu"))
    build_s = time.thread_time() - start

    a, b = make_run(copy.deepcopy(student0), teacher, loader, cfg), make_run(copy.deepcopy(student0), teacher, loader, cfg)
    assert epoch(a, loader, 1) == epoch(b, loader, 1), "the two students diverged before any cache"
    plain = make_run(copy.deepcopy(student0), teacher, loader, cfg)
    cached = make_run(copy.deepcopy(student0), teacher, loader, cfg, cache)
    same = epoch(plain, loader, 2) == epoch(cached, loader, 2)
    times = {"uncached": [], "cached": []}
    for r in range(args.rounds):
        for name, run in (("uncached", plain), ("cached", cached)):
            t0 = time.thread_time()
            epoch(run, loader, 3 + r)
            times[name].append(time.thread_time() - t0)
    ratios = [c / u for c, u in zip(times["cached"], times["uncached"])]
    print(f"MFD epoch, MFD CNN -> MFD CNN, {n} items of 32x32, batch {args.batch}, flips, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds (CPU time), allocator: {ALLOCATOR}")
    print(f"same losses with and without the cache: {same}")
    print(f"uncached epoch {statistics.median(times['uncached']):6.2f} s, cached {statistics.median(times['cached']):6.2f} s;"
          f" cache built once in {build_s:.2f} s ({cache.nbytes / 2**20:.1f} MiB, 2 views)")
    print(f"cached / uncached: median {statistics.median(ratios):.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"{1 - statistics.median(ratios):.1%} faster (target >= 20%)")


if __name__ == "__main__":
    main()
