"""Time ``nst_loss`` (forward + backward) against the former kernel-matrix form on CPU.

The shapes are the NST features of the MFD configs at batch 128 (configs/<data>/base.yaml,
nst.yaml: ``feature: embedding``, the MFD code's position): CIFAR-10S, the MFD CNN's 256-d
embedding (L = 1); UTKFace, ResNet-18's layer4 map 512x6x6 at 176 px; CelebA, ShuffleNetV2's
conv5 map 1024x6x6 at 176 px (no celeba/nst.yaml exists; the shape is that of the MFD code's
position). The shapes are read off a 2-image forward of each model.

Per shape, rounds alternate between the two forms so that load from other processes hits both;
a round's ratio is old time (one call) / new time (median of ``--repeats`` calls). Prints the
median ratio with the min-max over rounds, the memory each form keeps for backward (distinct
storages saved by autograd) and the float64 agreement of values and gradients. Last, the
gradient NST sends into the MFD CNN through its flat embedding, from each form, beside the
cross-entropy's (see the ``methods.nst`` docstring).
Run: ``PYTHONPATH=src python benchmarks/bench_nst.py [--rounds 5] [--repeats 5] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fairdistill.methods.nst import nst_form, nst_loss
from fairdistill.models import MODELS

BATCH = 128
SETTINGS = [  # (data set, model, model options, image size): configs/<data>/base.yaml
    ("CIFAR-10S", "mfd-cnn", {}, 32),
    ("UTKFace", "resnet18", {"embedding": "map"}, 176),
    ("CelebA", "shufflenet_v2_x1_0", {}, 176),
]


def kernel_form_nst(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The former implementation: three (B, C, C) kernel matrices of (a^T b)^2, by autograd."""
    s = F.normalize(s.flatten(2) if s.dim() > 2 else s[..., None], dim=2)
    t = F.normalize(t.flatten(2) if t.dim() > 2 else t[..., None], dim=2)
    k = lambda a, b: torch.bmm(a, b.transpose(1, 2)).pow(2).mean((1, 2))  # noqa: E731
    return (k(s, s) + k(t, t) - 2 * k(s, t)).mean()


def embedding_shape(model_name: str, options: dict, size: int) -> tuple[int, ...]:
    """(C, ...) of the model's embedding for one ``size`` x ``size`` image."""
    model = MODELS.get(model_name)(num_classes=2, **options).eval()
    with torch.no_grad():
        return tuple(model.forward_features(torch.rand(2, 3, size, size)).embedding.shape[1:])


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps between ``fn``'s forward and backward."""
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(storages.values())


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def differences(shape: tuple[int, ...]) -> str:
    """Float64 agreement of the two forms: relative value difference, max |gradient| of each
    and max |gradient difference|."""
    gen = torch.Generator().manual_seed(1)
    s = torch.randn((BATCH, *shape), generator=gen, dtype=torch.float64).relu().requires_grad_()
    t = torch.randn((BATCH, *shape), generator=gen, dtype=torch.float64).relu()
    old, new = kernel_form_nst(s, t), nst_loss(s, t)
    (g_old,), (g_new,) = torch.autograd.grad(old, s), torch.autograd.grad(new, s)
    return (f"value rel. diff {abs(new.item() - old.item()) / abs(old.item()):.1e}; max |grad| old "
            f"{g_old.abs().max().item():.1e}, new {g_new.abs().max().item():.1e}, max |diff| "
            f"{(g_new - g_old).abs().max().item():.1e}")


def flat_embedding_gradients(dtype: torch.dtype, seed: int, weight: float = 30.0) -> str:
    """NST on the MFD CNN's 256-d embedding (configs/cifar10s/nst.yaml, weight 30): gradient
    norms on the student's parameters from each form, against cross-entropy's, with random
    weights and uniform images (the loss is piecewise constant there: its exact gradient is 0)."""
    torch.manual_seed(seed)
    student, teacher = MODELS.get("mfd-cnn")(num_classes=10).to(dtype), MODELS.get("mfd-cnn")(num_classes=10).to(dtype)
    teacher.eval()
    x, y = torch.rand(BATCH, 3, 32, 32, dtype=dtype), torch.randint(0, 10, (BATCH,))
    feats = student.forward_features(x)
    with torch.no_grad():
        target = teacher.forward_features(x).embedding
    params = list(student.parameters())

    def norms(loss):
        grads = torch.autograd.grad(loss, [feats.embedding, *params], retain_graph=True, allow_unused=True)
        flat = torch.sqrt(sum((g.double() ** 2).sum() for g in grads[1:] if g is not None)).item()
        return flat, grads[0].abs().max().item()

    (old, old_emb), (new, new_emb) = (norms(weight * fn(feats.embedding, target)) for fn in (kernel_form_nst, nst_loss))
    ce = norms(F.cross_entropy(feats.logits, y))[0]
    return (f"{str(dtype)[6:]}: old {old:.1e}, new {new:.1e}, cross-entropy {ce:.1e}; "
            f"max |dL/d embedding| / {weight:g}: old {old_emb / weight:.1e}, new {new_emb / weight:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="calls of the new form per round (median); "
                        "the old form, 20-300x slower, is called once a round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"nst_loss forward + backward, batch {BATCH}, float32, CPU, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds")
    for data, model_name, options, size in SETTINGS:
        shape = embedding_shape(model_name, options, size)
        gen = torch.Generator().manual_seed(0)
        student = torch.randn((BATCH, *shape), generator=gen).relu().requires_grad_()
        teacher = torch.randn((BATCH, *shape), generator=gen).relu()

        def step(loss_fn):
            student.grad = None
            loss_fn(student, teacher).backward()

        def old():
            step(kernel_form_nst)

        def new():
            step(nst_loss)

        old(), new()  # warm-up
        ratios, t_old, t_new = [], [], []
        for _ in range(args.rounds):
            t_old.append(seconds(old, 1))
            t_new.append(seconds(new, args.repeats))
            ratios.append(t_old[-1] / t_new[-1])
        mem_old = saved_bytes(lambda: kernel_form_nst(student, teacher))
        mem_new = saved_bytes(lambda: nst_loss(student, teacher))
        length = 1 if len(shape) == 1 else shape[1] * shape[2]
        print(f"{data:9s} {model_name} embedding {'x'.join(map(str, shape))} (C = {shape[0]}, L = {length}, "
              f"form {nst_form(shape[0], shape[0], length)})")
        print(f"  time   old {statistics.median(t_old) * 1e3:9.2f} ms  new {statistics.median(t_new) * 1e3:8.2f} ms  "
              f"ratio median {statistics.median(ratios):7.1f}x  (min {min(ratios):.1f}x, max {max(ratios):.1f}x)")
        print(f"  saved for backward  old {mem_old / 2**20:8.2f} MiB  new {mem_new / 2**20:6.2f} MiB  "
              f"ratio {mem_old / mem_new:.1f}x")
        print(f"  float64: {differences(shape)}")
    print("gradient norm on the MFD CNN's parameters, NST x 30 on its flat embedding (exactly 0 in exact arithmetic)")
    for dtype in (torch.float32, torch.float64):
        for seed in range(3):
            print(f"  seed {seed}, {flat_embedding_gradients(dtype, seed)}")


if __name__ == "__main__":
    main()
