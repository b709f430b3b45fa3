"""Batch augmentation against a per-image numpy version, and the BatchLoader's contract."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fairdistill.data import BatchLoader, ImageDataset
from fairdistill.data.augment import CropSpec, crop_flip, draw_params
from fairdistill.errors import ConfigError


def naive_crop_flip(x: np.ndarray, offsets: np.ndarray, flips: np.ndarray, padding: int) -> np.ndarray:
    out = np.empty_like(x)
    h, w = x.shape[2:]
    for i in range(len(x)):
        padded = np.pad(x[i], ((0, 0), (padding, padding), (padding, padding)), mode="reflect")
        top, left = offsets[i]
        crop = padded[:, top : top + h, left : left + w]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


def make_dataset(n=30, num_classes=3, num_groups=2, hw=(6, 5), mean=None, std=None, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, *hw), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    groups = (torch.arange(n) // num_classes) % num_groups
    return ImageDataset(images, labels, groups, num_classes, num_groups, name="toy", mean=mean, std=std)


@pytest.mark.parametrize("padding,flip", [(0, True), (2, False), (3, True)])
def test_crop_flip_matches_per_image_numpy(padding, flip):
    x = torch.rand(9, 2, 7, 6, generator=torch.Generator().manual_seed(1))
    offsets, flips = draw_params(9, padding, flip, torch.Generator().manual_seed(2))
    assert offsets.min() >= 0 and offsets.max() <= 2 * padding
    if not flip:
        assert not flips.any()
    got = crop_flip(x, offsets, flips, padding)
    want = naive_crop_flip(x.numpy(), offsets.numpy(), flips.numpy(), padding)
    assert torch.equal(got, torch.from_numpy(want))


def test_crop_params_cover_range_and_flip_half():
    offsets, flips = draw_params(4000, 2, True, torch.Generator().manual_seed(0))
    assert sorted(offsets.unique().tolist()) == [0, 1, 2, 3, 4]
    assert abs(flips.float().mean().item() - 0.5) < 0.05


def test_sequential_batches_are_scaled_images():
    ds = make_dataset(n=10)
    loader = BatchLoader(ds, 4, sampler="sequential")
    batches = list(loader.epoch(0))
    assert len(loader) == 3 and [len(b[0]) for b in batches] == [4, 4, 2] and loader.num_samples == 10
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and torch.equal(x, ds.images.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.labels)
    assert torch.equal(torch.cat([b[2] for b in batches]), ds.groups)
    assert batches[0][1].dtype == torch.int64
    dropped = BatchLoader(ds, 4, sampler="sequential", drop_last=True)
    assert len(dropped) == 2 and dropped.num_samples == 8


def test_normalisation_uses_dataset_mean_std():
    ds = make_dataset(n=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    (x, _, _), = BatchLoader(ds, 8, sampler="sequential").epoch(0)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    assert torch.allclose(x * std + mean, ds.images.float() / 255, atol=1e-6)


def test_uniform_epoch_is_a_permutation_with_augmentation():
    ds = make_dataset(n=20)
    loader = BatchLoader(ds, 6, padding=2, flip=True, seed=3)
    order, offsets, flips = loader.indices(4)
    assert sorted(order.tolist()) == list(range(20))
    x = torch.cat([b[0] for b in loader.epoch(4)])
    want = naive_crop_flip(ds.images[order].float().numpy() / 255, offsets.numpy(), flips.numpy(), 2)
    assert torch.allclose(x, torch.from_numpy(want))


def test_epochs_are_reproducible_on_their_own():
    ds = make_dataset(n=25)

    def run(loader, e):
        return [tuple(t.clone() for t in b) for b in loader.epoch(e)]

    a = BatchLoader(ds, 8, padding=1, flip=True, seed=7)
    history = [run(a, e) for e in range(3)]
    fresh = BatchLoader(ds, 8, padding=1, flip=True, seed=7)
    replay = run(fresh, 2)  # epoch 2 without epochs 0 and 1 first: exact resume
    assert all(torch.equal(p, q) for bp, bq in zip(history[2], replay) for p, q in zip(bp, bq))
    assert not torch.equal(a.indices(0)[0], a.indices(1)[0])  # epochs differ from each other
    other = run(BatchLoader(ds, 8, padding=1, flip=True, seed=8), 2)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(replay, other))


@pytest.mark.parametrize("sampler,drop_last", [("uniform", False), ("uniform", True), ("balanced", False), ("sequential", False)])
def test_two_ranks_see_the_single_process_rows(sampler, drop_last):
    ds = make_dataset(n=29)
    kw = dict(sampler=sampler, drop_last=drop_last, padding=2, flip=True, seed=11)
    single = BatchLoader(ds, 8, **kw)
    ranks = [BatchLoader(ds, 4, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    assert ranks[0].num_samples + ranks[1].num_samples == single.num_samples
    for whole, part0, part1 in zip(single.epoch(5), ranks[0].epoch(5), ranks[1].epoch(5)):
        for t_whole, t0, t1 in zip(whole, part0, part1):
            assert torch.equal(t_whole[0::2], t0) and torch.equal(t_whole[1::2], t1)


def test_every_row_is_delivered_even_when_fewer_than_processes():
    ds = make_dataset(n=13)  # 13 = 3 * 4 + 1: one row left for 4 processes
    ranks = [BatchLoader(ds, 1, sampler="sequential", rank=r, world_size=4) for r in range(4)]
    assert all(len(r) == 4 for r in ranks) and [r.num_samples for r in ranks] == [4, 3, 3, 3]
    last = [list(r.epoch(0))[-1] for r in ranks]
    assert [len(b[0]) for b in last] == [1, 0, 0, 0] and last[1][0].shape == (0, 3, 6, 5)
    assert int(last[0][1]) == int(ds.labels[12])
    dropped = [BatchLoader(ds, 1, sampler="sequential", drop_last=True, rank=r, world_size=4) for r in range(4)]
    assert all(len(r) == 3 and r.num_samples == 3 for r in dropped)


def test_balanced_loader_epoch_is_balanced():
    ds = make_dataset(n=31, num_classes=3, num_groups=2)
    loader = BatchLoader(ds, 12, sampler="balanced", seed=1)  # quota 12 // 6 = 2
    cells = ds.cell_counts().flatten()
    assert loader.num_samples == int(cells.max()) // 2 * 2 * 6
    g_y = torch.cat([g * 3 + y for _, y, g in loader.epoch(0)])
    assert torch.bincount(g_y, minlength=6).tolist() == [loader.num_samples // 6] * 6


def test_images_live_on_the_device_once():
    ds = make_dataset(n=5)
    loader = BatchLoader(ds, 2, device="cpu")
    assert loader.images.dtype == torch.uint8 and loader.images.device.type == "cpu"
    x, y, g = next(iter(loader.epoch(0)))
    assert x.device == loader.images.device == y.device == g.device


def test_bad_arguments_are_config_errors():
    ds = make_dataset(n=12, hw=(4, 4))
    with pytest.raises(ConfigError, match="Did you mean 'uniform'"):
        BatchLoader(ds, 4, sampler="unifrom")
    with pytest.raises(ConfigError, match="padding must be in 0..3"):
        BatchLoader(ds, 4, padding=4)
    with pytest.raises(ConfigError, match="rank"):
        BatchLoader(ds, 4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        BatchLoader(ds, 0)
    with pytest.raises(ConfigError, match="smaller batch_size"):
        BatchLoader(ds, 60, sampler="balanced")  # quota 10 > largest cell (2)


# ----------------------------------------------------------------------------- crops (data/augment.py)


def reference_batch(images: torch.Tensor, boxes, flips, size: int) -> torch.Tensor:
    """Per image: F.interpolate of the box (bilinear, align_corners=False), mirrored where flipped."""
    import torch.nn.functional as F

    out = []
    for k in range(len(images)):
        t, l, h, w = (int(v) for v in boxes[k])
        o = F.interpolate(images[k:k + 1, :, t:t + h, l:l + w].float(), (size, size), mode="bilinear", align_corners=False)[0]
        out.append(o.flip(-1) if flips[k] else o)
    return torch.stack(out)


@pytest.mark.parametrize("sampler", ["uniform", "balanced"])
def test_loader_without_crop_keeps_the_old_stream(sampler):
    from fairdistill.data.loader import epoch_generator
    from fairdistill.data.samplers import balanced_indices, uniform_indices

    ds = make_dataset(n=23, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    kw = dict(sampler=sampler, padding=2, flip=True, seed=9)
    default, none = BatchLoader(ds, 6, **kw), BatchLoader(ds, 6, crop="none", **kw)
    gen = epoch_generator(9, 3)  # the stream before crops existed, written out
    if sampler == "uniform":
        order = uniform_indices(23, gen)
    else:
        order = balanced_indices(ds.labels, ds.groups, 3, 2, 6, gen)
    offsets, flips = draw_params(order.numel(), 2, True, gen)
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    for start, (a, b) in zip(range(0, order.numel(), 6), zip(default.epoch(3), none.epoch(3))):
        rows = slice(start, start + 6)
        x = crop_flip(ds.images[order[rows]].float().div_(255.0), offsets[rows], flips[rows], 2)
        assert torch.equal(a[0], (x - mean) / std) and torch.equal(b[0], a[0])
        assert torch.equal(a[1], ds.labels[order[rows]]) and torch.equal(b[2], a[2])


def test_random_resized_loader_equals_per_image_reference():
    ds = make_dataset(n=17, hw=(9, 7), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    loader = BatchLoader(ds, 5, crop={"kind": "random_resized", "size": 6}, flip=True, seed=2)
    assert loader.image_shape == (3, 6, 6)
    order, boxes, flips = loader.indices(1)
    assert boxes.shape == (17, 4) and flips.any() and not flips.all()
    x = torch.cat([b[0] for b in loader.epoch(1)])
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    want = (reference_batch(ds.images[order].float() / 255, boxes, flips, 6) - mean) / std
    assert x.shape == (17, 3, 6, 6) and torch.allclose(x, want, atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in loader.epoch(1)]), ds.labels[order])


def test_random_crop_loader_is_exact():
    ds = make_dataset(n=12, hw=(8, 8))
    loader = BatchLoader(ds, 4, crop="random:5", padding=1, flip=True, seed=4)
    order, boxes, flips = loader.indices(0)
    x = torch.cat([b[0] for b in loader.epoch(0)])
    padded = np.pad(ds.images[order].numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    for k in range(12):
        t, l = int(boxes[k, 0]) + 1, int(boxes[k, 1]) + 1
        crop = padded[k, :, t:t + 5, l:l + 5]
        want = (crop[:, :, ::-1] if flips[k] else crop).astype(np.float32) / 255
        assert np.array_equal(x[k].numpy(), want)


def test_eval_center_crop_is_deterministic():
    ds = make_dataset(n=10, hw=(9, 8))
    loader = BatchLoader(ds, 4, sampler="sequential", crop=CropSpec.parse("center:6", deterministic=True))
    first = torch.cat([b[0] for b in loader.epoch(0)])
    assert torch.equal(first, ds.images[:, :, 2:8, 1:7].float() / 255)  # round(1.5) = 2, round(1.0) = 1
    assert torch.equal(torch.cat([b[0] for b in loader.epoch(5)]), first)


@pytest.mark.parametrize("crop", ["random_resized:4", "random:3"])
def test_crops_split_over_ranks_and_replay(crop):
    ds = make_dataset(n=29)
    kw = dict(crop=crop, flip=True, seed=11)
    single = BatchLoader(ds, 8, **kw)
    ranks = [BatchLoader(ds, 4, rank=r, world_size=2, **kw) for r in range(2)]
    for whole, part0, part1 in zip(single.epoch(5), ranks[0].epoch(5), ranks[1].epoch(5)):
        for t_whole, t0, t1 in zip(whole, part0, part1):
            assert torch.equal(t_whole[0::2], t0) and torch.equal(t_whole[1::2], t1)
    replay = [b[0] for b in BatchLoader(ds, 8, **kw).epoch(5)]
    assert all(torch.equal(a[0], b) for a, b in zip(single.epoch(5), replay))
    assert not torch.equal(single.indices(5)[1], single.indices(6)[1])


def test_crop_rows_fewer_than_processes_keep_the_shape():
    ds = make_dataset(n=13, hw=(8, 8))
    last = [list(BatchLoader(ds, 1, sampler="sequential", crop="center:5", rank=r, world_size=4).epoch(0))[-1]
            for r in range(4)]
    assert [b[0].shape for b in last] == [(1, 3, 5, 5)] + [(0, 3, 5, 5)] * 3


def test_crop_errors_name_the_key():
    ds = make_dataset(n=12, hw=(6, 6))
    with pytest.raises(ConfigError, match="data.crop: size 7 is larger than the 6x6 images of toy"):
        BatchLoader(ds, 4, crop="center:7", crop_key="data.crop")
    with pytest.raises(ConfigError, match="crop: kind 'random_resized' takes no padding"):
        BatchLoader(ds, 4, crop="random_resized:6", padding=2)
    with pytest.raises(ConfigError, match="unknown crop kind"):
        BatchLoader(ds, 4, crop="centre:4")
