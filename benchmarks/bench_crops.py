"""Crops on the batch pipeline: the batched path against today's path and a per-image loop,
and how far its resampling is from Pillow's (the official pipelines').

Speed, per batch, each case from the same uint8 store on ``--device``, interleaved rounds:

- ``current``: what the paper configs ran before crops: gather + scale + flip at the stored size
  (ImageNet: uncropped 256 x 256; UTKFace and CelebA: images stored at 176).
- ``batched``: the crop of ``data/augment.py`` (gather + one grid_sample or one integer gather).
- ``loop``: the same crops one image at a time (``F.interpolate`` of each box; slicing for
  integer crops), the obvious alternative.

Fidelity: for boxes drawn as in training, the mean and 99th-percentile absolute difference (in
uint8 levels) between the batched resampling and Pillow's ``crop`` + ``resize(BILINEAR)`` (what
torchvision's RandomResizedCrop does on PIL images), on a 1/f-noise image (natural-image
spectrum), split into boxes only enlarged and boxes shrunk along an axis (where Pillow
antialiases), with the fraction of shrunk boxes.

Run: ``python benchmarks/bench_crops.py [--device cuda] [--batch 64] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_rounds  # noqa: E402

from fairdistill.data.augment import CropSpec, apply_crop, crop_flip, draw_boxes, draw_params  # noqa: E402

CASES = {  # name: (stored h, w, crop, size today's configs store and feed)
    "imagenet rrc 224 of 256": (256, 256, CropSpec("random_resized", 224), (256, 256)),
    "celeba rrc 176 of 218x178": (218, 178, CropSpec("random_resized", 176), (176, 176)),
    "utkface random 176 of 256": (256, 256, CropSpec("random", 176), (176, 176)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed(args, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    n = max(4 * args.batch, 256)
    print(f"speed: batch {args.batch}, device {device}, threads {torch.get_num_threads()}; ms per batch "
          f"(median of {args.rounds} interleaved rounds)")
    print(f"{'case':28s} {'current':>9s} {'batched':>9s} {'loop':>9s} {'batched/current':>16s} {'loop/batched':>13s}")
    for name, (h, w, spec, today) in CASES.items():
        store = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8).to(device)
        store_today = torch.randint(0, 256, (n, 3, *today), generator=g, dtype=torch.uint8).to(device)
        idx = torch.randperm(n, generator=g)[:args.batch].to(device)
        boxes, flips = draw_boxes(spec, args.batch, h, w, 0, True, g)
        offsets, flips_today = draw_params(args.batch, 0, True, g)
        box_list, flip_list, idx_list = boxes.tolist(), flips.tolist(), idx.tolist()

        def current():
            out = crop_flip(store_today[idx].float().div_(255.0), offsets, flips_today, 0)
            sync(device)
            return out

        def batched():
            out = apply_crop(store, spec, boxes, flips, index=idx).div_(255.0)
            sync(device)
            return out

        def loop():
            out = torch.empty(args.batch, 3, spec.size, spec.size, device=device)
            for k, (t, l, bh, bw) in enumerate(box_list):
                crop = store[idx_list[k], :, t:t + bh, l:l + bw]
                if spec.kind == "random_resized":
                    crop = F.interpolate(crop[None].float(), (spec.size, spec.size), mode="bilinear",
                                         align_corners=False)[0]
                out[k] = (crop.flip(-1) if flip_list[k] else crop).float().div_(255.0)
            sync(device)
            return out

        ref, got = loop(), batched()
        assert (ref - got).abs().max() < 1e-4, name
        t = {k: statistics.median(v) * 1e3 for k, v in interleaved_rounds(
            {"current": current, "batched": batched, "loop": loop}, rounds=args.rounds, repeats=3).items()}
        print(f"{name:28s} {t['current']:9.2f} {t['batched']:9.2f} {t['loop']:9.2f} "
              f"{t['batched'] / t['current']:16.2f} {t['loop'] / t['batched']:13.2f}")


def pink_noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image with a 1/f amplitude spectrum (the spectrum of natural images)."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))
    out = np.empty((h, w, 3))
    for c in range(3):
        phase = np.exp(2j * np.pi * rng.random((h, w)))
        img = np.real(np.fft.ifft2(amp * phase))
        out[..., c] = (img - img.mean()) / img.std()
    return np.clip(128 + 40 * out, 0, 255).astype(np.uint8)


def fidelity(args) -> None:
    print("\nfidelity against Pillow crop + resize(BILINEAR) (uint8 levels; 1/f-noise image)")
    print(f"{'case':28s} {'shrunk boxes':>13s} {'mean enlarged':>14s} {'p99 enlarged':>13s} "
          f"{'mean shrunk':>12s} {'p99 shrunk':>11s}")
    for name, (h, w, spec, _) in CASES.items():
        if spec.kind != "random_resized":
            continue
        arr = pink_noise(h, w)
        pil = Image.fromarray(arr)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].expand(args.boxes, -1, -1, -1)
        boxes, flips = draw_boxes(spec, args.boxes, h, w, 0, False, torch.Generator().manual_seed(1))
        ours = apply_crop(x, spec, boxes, flips).numpy()
        diffs = {True: [], False: []}
        for k, (t, l, bh, bw) in enumerate(boxes.tolist()):
            official = np.asarray(pil.crop((l, t, l + bw, t + bh)).resize((spec.size, spec.size), Image.BILINEAR))
            diffs[max(bh, bw) > spec.size].append(np.abs(ours[k].transpose(1, 2, 0) - official).ravel())
        row = [f"{len(diffs[True]) / args.boxes:13.1%}"]
        for shrunk in (False, True):
            d = np.concatenate(diffs[shrunk]) if diffs[shrunk] else np.zeros(1)
            row += [f"{d.mean():14.3f}" if not shrunk else f"{d.mean():12.3f}",
                    f"{np.percentile(d, 99):13.3f}" if not shrunk else f"{np.percentile(d, 99):11.3f}"]
        print(f"{name:28s} " + " ".join(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--boxes", type=int, default=400, help="boxes per case for the fidelity figures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    speed(args, torch.device(args.device))
    fidelity(args)


if __name__ == "__main__":
    main()
