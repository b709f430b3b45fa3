"""The floor under fairdistill's defaults against plain PyTorch defaults, same model and batch.

The floor is what every distillation step costs at least: the teacher's forward without grad and
a plain student step (cross-entropy, SGD). Two settings, each in its own process because malloc
settings hold per process (``fairdistill.allocator``):

- ``defaults``: what ``fairdistill train`` does on the CPU: the tuned allocator and
  ``channels_last: auto`` (``fairdistill.engine.defaults``) for models and input;
- ``plain``: glibc's malloc defaults (``FAIRDISTILL_MALLOC=system``) and NCHW.

Cases: the MFD CNN at 32x32, batch 128 (CIFAR-10S; teacher and student the same CNN, the teacher
in eval mode), and WRN-28-4 -> WRN-16-2 at 32x32, batch 64 (CIFAR-100). Also the evaluation time
per item at batch 256 and 512 (MFD CNN, the default ``data.eval_batch_size`` is 512). Time is CPU
time of the calling thread (``time.thread_time``), one PyTorch thread; the two settings alternate
in rounds (a fresh child process per round and setting), and the printed ratio is the median of the
per-round ratios with its range. Run: ``.venv/bin/python benchmarks/bench_floor.py [--rounds 5]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "mfd-cnn": ("mfd-cnn", "mfd-cnn", {"image_size": 32}, 10, 128),
    "wrn": ("wrn-28-4", "wrn-16-2", {}, 100, 64),
}


def child(case: str, setting: str, repeats: int) -> dict:
    """One process's measurement: the floor's CPU time per step (median of ``repeats``) and, for
    the MFD CNN, the evaluation CPU time per item at batch 256 and 512."""
    from fairdistill.allocator import configure

    configure()  # FAIRDISTILL_MALLOC is set by the parent
    import torch
    import torch.nn.functional as F

    from fairdistill.engine.defaults import resolve_channels_last
    from fairdistill.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    t_name, s_name, options, classes, batch = CASES[case]
    teacher = build_model(t_name, classes, **options).eval().requires_grad_(False)
    student = build_model(s_name, classes, **options).train()
    layout = resolve_channels_last("auto" if setting == "defaults" else False, "cpu", [student, teacher])
    fmt = torch.channels_last if layout else torch.contiguous_format
    teacher.to(memory_format=fmt)
    student.to(memory_format=fmt)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,))
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def floor():
        with torch.no_grad():
            teacher(x)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(student.forward_features(x).logits, y).backward()
        opt.step()

    def cpu_median(fn, n):
        fn()  # warm-up
        times = []
        for _ in range(n):
            t0 = time.thread_time()
            fn()
            times.append(time.thread_time() - t0)
        return statistics.median(times)

    out = {"floor": cpu_median(floor, repeats), "channels_last": layout}
    if case == "mfd-cnn":
        items = torch.randn(1024, 3, 32, 32).contiguous(memory_format=fmt)
        for eval_batch in (256, 512):
            def evaluate(b=eval_batch):
                with torch.no_grad():
                    for chunk in items.split(b):
                        student.eval()(chunk)
            out[f"eval{eval_batch}"] = cpu_median(evaluate, max(repeats // 2, 1)) / len(items)
        student.train()
    return out


def run_child(case: str, setting: str, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["FAIRDISTILL_MALLOC"] = "tuned" if setting == "defaults" else "system"
    cmd = [sys.executable, __file__, "--child", case, setting, "--repeats", str(repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="floor steps per process (their median)")
    p.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.repeats)))
        return
    print(f"floor (teacher forward without grad + plain student step), CPU time, 1 thread, {args.rounds} rounds; "
          "fairdistill's defaults / plain PyTorch defaults: median (range) of per-round ratios")
    for case in args.case or list(CASES):
        rows = {"defaults": [], "plain": []}
        for _ in range(args.rounds):
            for setting in rows:
                rows[setting].append(run_child(case, setting, args.repeats))
        ratios = [d["floor"] / p_["floor"] for d, p_ in zip(rows["defaults"], rows["plain"])]
        d_ms = statistics.median(r["floor"] for r in rows["defaults"]) * 1e3
        p_ms = statistics.median(r["floor"] for r in rows["plain"]) * 1e3
        _, _, _, _, batch = CASES[case]
        print(f"{case:8s} batch {batch:3d}: defaults {d_ms:7.1f} ms (channels-last {rows['defaults'][0]['channels_last']}),"
              f" plain {p_ms:7.1f} ms, ratio {spread(ratios)} -> {100 * (1 - statistics.median(ratios)):.0f}% faster")
        if case == "mfd-cnn":
            for setting, results in rows.items():
                per = [r["eval512"] / r["eval256"] for r in results]
                print(f"  eval, {setting}: {statistics.median(r['eval256'] for r in results) * 1e6:.0f} us/item at 256, "
                      f"{statistics.median(r['eval512'] for r in results) * 1e6:.0f} at 512; 512 / 256 {spread(per)}")


if __name__ == "__main__":
    main()
