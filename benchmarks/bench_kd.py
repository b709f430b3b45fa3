"""HKD training step vs a plain student step (CPU; WRN-28-4 teacher, WRN-16-2 student, batch 64).

Both use the trainer's own ``train_step`` on the same batch; the ratio is the cost of
distillation over ordinary training. Run: ``python benchmarks/bench_kd.py [--threads N]``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved  # noqa: E402

from fairdistill.config import RunConfig, from_dict  # noqa: E402
from fairdistill.engine.stages import make_optimizer, resolve_stages  # noqa: E402
from fairdistill.engine.step import Precision, StageRun, StudentStep, train_step  # noqa: E402
from fairdistill.methods.base import SetupContext  # noqa: E402
from fairdistill.methods.objective import Objective  # noqa: E402
from fairdistill.models import build_model  # noqa: E402
from fairdistill.tasks import TASKS, Task  # noqa: E402


def stepper(cfg: RunConfig, student, teacher, x, y, g, num_classes: int = 100, num_groups: int = 1,
            precision: Precision | None = None, task: Task | None = None):
    """A zero-argument callable running one ``train_step`` of ``cfg``'s objective on (x, y, g);
    terms are set up from a dry forward of ``x``, as the trainer does. ``task``: the task whose
    loss and training counts the step uses (default classification; ``y`` is its target)."""
    task = task or TASKS.get("classification")()
    objective = Objective(cfg.terms, task)
    with torch.no_grad():
        ctx = SetupContext(teacher=teacher, student_features=student.forward_features(x),
                           teacher_features=teacher.forward_features(x), num_classes=num_classes,
                           num_groups=num_groups, device=x.device)
    for term in objective.terms.values():
        term.setup(ctx)
    objective.to(x.device)
    stage = resolve_stages(cfg, objective)[0]
    opt = make_optimizer(list(student.parameters()) + list(objective.parameters()), cfg.optim)
    run = StageRun(stage, StudentStep(student, objective), [opt], teacher, precision or Precision(x.device.type), task)
    run.weights = objective.current_weights(stage.active, 0, 1)
    return lambda: train_step(run, (x, y, g), 0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student = build_model("wrn-16-2", 100).train()
    teacher = build_model("wrn-28-4", 100).eval().requires_grad_(False)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 100, (args.batch,))
    g = torch.zeros_like(y)
    base = {"optim": {"name": "sgd", "lr": 0.01, "nesterov": True}}
    plain = from_dict(RunConfig, base)
    hkd = from_dict(RunConfig, {**base, "terms": {"kd": {"type": "kd", "weight": 1.0, "T": 4.0}}})
    t = interleaved({"plain": stepper(plain, student, teacher, x, y, g), "hkd": stepper(hkd, student, teacher, x, y, g)})
    print(f"threads {args.threads}, batch {args.batch}, WRN-28-4 -> WRN-16-2 (CPU)")
    print(f"plain student step: {1000 * t['plain']:.1f} ms")
    print(f"HKD step:           {1000 * t['hkd']:.1f} ms")
    print(f"ratio HKD / plain:  {t['hkd'] / t['plain']:.2f}x")


if __name__ == "__main__":
    main()
