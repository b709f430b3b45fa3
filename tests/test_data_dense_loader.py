"""The dense batch pipeline against per-image references: resampling (vs torch and Pillow), the
official RandomScaleCrop, blur, evaluation padding, detection resize/flip/hook, sharding, resume,
the balanced sampler on image-level labels, and the option errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from fairdistill.data.dense import VOID, DenseDataset
from fairdistill.data.dense_augment import DetectionAugment, SegmentationAugment, parse_augment
from fairdistill.data.dense_loader import DenseBatchLoader
from fairdistill.data.resample import apply_index, apply_weights, axis_index, axis_weights
from fairdistill.errors import ConfigError

GEN = torch.Generator


def seg_set(n=7, hw=(12, 17), num_classes=5, variable=False, **kw):
    g = GEN().manual_seed(0)
    sizes = [(hw[0] + 3 * (i % 3), hw[1] - 2 * (i % 2)) for i in range(n)] if variable else [hw] * n
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    masks = [torch.randint(0, num_classes, (h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    for m in masks:
        m[0, :3] = VOID
    if not variable:
        images, masks = torch.stack(images), torch.stack(masks)
    kw.setdefault("groups", torch.arange(n) % 2)
    return DenseDataset(images, kw.pop("groups"), num_classes, 2, task="segmentation", name="toy", masks=masks, **kw)


def official_size(h, w, short):
    """RandomScaleCrop's scaled size, as written in the official code."""
    if h > w:
        ow = short
        oh = int(1.0 * h * ow / w)
    else:
        oh = short
        ow = int(1.0 * w * oh / h)
    return oh, ow


def reference_train(image, mask, flip, short, offset, crop, mask_pad, sigma=None):
    """One image through flip -> scale -> pad -> crop (-> blur) with torch/scipy primitives."""
    x, m = image.double() / 255, mask.clone()
    if flip:
        x, m = x.flip(-1), m.flip(-1)
    oh, ow = official_size(*x.shape[1:], int(short))
    x = F.interpolate(x[None], (oh, ow), mode="bilinear", align_corners=False, antialias=True)[0]
    m = F.interpolate(m[None, None].double(), (oh, ow), mode="nearest-exact")[0, 0].to(torch.uint8)
    ph, pw = max(oh, crop), max(ow, crop)
    x = F.pad(x, (0, pw - ow, 0, ph - oh))
    m = torch.from_numpy(np.pad(m.numpy(), ((0, ph - oh), (0, pw - ow)), constant_values=mask_pad))
    top, left = int(float(offset[0]) * (ph - crop + 1)), int(float(offset[1]) * (pw - crop + 1))
    x, m = x[:, top:top + crop, left:left + crop], m[top:top + crop, left:left + crop]
    if sigma is not None:
        x = torch.from_numpy(gaussian_filter(x.numpy(), (0, float(sigma), float(sigma)), mode="nearest", truncate=3.0))
    return x.float(), m.long()


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("n_in,n_out", [(17, 9), (17, 40), (64, 32), (10, 10), (9, 4)])
def test_axis_weights_equal_torch_antialiased_bilinear(n_in, n_out):
    x = torch.rand(2, 3, 5, n_in, dtype=torch.float64, generator=GEN().manual_seed(3))
    for antialias in (True, False):
        want = F.interpolate(x, (5, n_out), mode="bilinear", align_corners=False, antialias=antialias)
        cols = axis_weights(n_in, torch.tensor([n_out] * 2), torch.zeros(2), n_out, antialias=antialias)
        rows = torch.eye(5).expand(2, -1, -1)
        assert torch.allclose(apply_weights(x.float(), rows, cols).double(), want, atol=1e-6)


def test_weights_match_pillow_bilinear_within_one_level():
    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(30, 41, 13, 77), (40, 40, 20, 20), (25, 60, 51, 11)]:
        a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        pil = np.asarray(Image.fromarray(a).resize((ow, oh), Image.BILINEAR)).astype(float)
        rows = axis_weights(h, torch.tensor([oh]), torch.zeros(1), oh)
        cols = axis_weights(w, torch.tensor([ow]), torch.zeros(1), ow)
        ours = apply_weights(torch.from_numpy(a).float()[None, None], rows, cols)[0, 0].numpy()
        assert np.abs(ours - pil).max() <= 1.0 + 1e-4  # Pillow rounds in fixed point


def test_nearest_index_is_exact_and_pillow_differs_only_at_exact_ties():
    rng = np.random.default_rng(1)
    for _ in range(40):
        n_in, n_out = (int(v) for v in rng.integers(3, 200, 2))
        ours = axis_index(n_in, torch.tensor([n_out]), torch.zeros(1), n_out)[0].numpy()
        exact = [int(np.floor((i + 0.5) * n_in / n_out + 1e-9)) for i in range(n_out)]
        assert ours.tolist() == exact
        a = np.tile(np.arange(n_in, dtype=np.int32), (2, 1))
        pil = np.asarray(Image.fromarray(a, mode="I").resize((n_out, 2), Image.NEAREST))[0]
        differ = np.nonzero(pil != ours)[0]
        assert all(pil[i] == ours[i] - 1 and (2 * i + 1) * n_in % (2 * n_out) == 0 for i in differ)


def test_padding_and_flip_in_index_maps():
    m = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    rows = axis_index(3, torch.tensor([3]), torch.tensor([1]), 4)  # rows 1, 2, then two padded
    cols = axis_index(4, torch.tensor([4]), torch.tensor([0]), 4, flip=torch.tensor([True]))
    got = apply_index(m, rows, cols, 255)[0]
    assert got.tolist() == [[7, 6, 5, 4], [11, 10, 9, 8], [255] * 4, [255] * 4]


# ----------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("mask_pad,blur", [(VOID, False), (0, True)])
def test_training_batches_equal_the_per_image_reference(variable, mask_pad, blur):
    ds = seg_set(n=9, variable=variable)
    aug = SegmentationAugment(train=True, crop_size=14, base_size=13, mask_pad=mask_pad, blur=blur)
    loader = DenseBatchLoader(ds, 4, augment=aug, seed=5)
    order, p = loader.indices(2)
    xs, ys = zip(*[(x, y) for x, y, _ in loader.epoch(2)])
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (9, 3, 14, 14) and y.dtype == torch.int64
    assert int(p["short"].min()) >= int(13 * 0.5) and int(p["short"].max()) <= 26
    for r, i in enumerate(order.tolist()):
        sigma = p["sigma"][r] if blur and p["blur"][r] else None
        want_x, want_y = reference_train(ds.images[i], ds.masks[i], p["flip"][r], p["short"][r], p["offset"][r],
                                         14, mask_pad, sigma)
        assert torch.allclose(x[r], want_x, atol=1e-5), r
        assert torch.equal(y[r], want_y), r
    assert (y == mask_pad).any()  # some crops reach the padding


def test_training_defaults_on_same_size_images_crop_their_short_side():
    ds = seg_set(n=3, hw=(12, 17))
    loader = DenseBatchLoader(ds, 3, augment={"train": True})
    (x, y, g), = loader.epoch(0)
    assert x.shape == (3, 3, 12, 12) and y.shape == (3, 12, 12) and g.tolist() == ds.groups[loader.indices(0)[0]].tolist()


def test_eval_resizes_short_side_and_pads_to_the_largest():
    ds = seg_set(n=3, variable=True)  # sizes (12,17), (15,15), (18,17)
    x, y, _ = next(DenseBatchLoader(ds, 3, sampler="sequential").epoch(0))
    assert x.shape == (3, 3, 18, 17)
    assert torch.equal(x[0, :, :12, :17], ds.images[0].float() / 255) and (x[0, :, 12:] == 0).all()
    assert torch.equal(y[0, :12, :17], ds.masks[0].long()) and (y[0, 12:] == VOID).all() and (y[1, :, 15:] == VOID).all()
    x, y, _ = next(DenseBatchLoader(ds, 3, sampler="sequential", augment={"eval_size": 10}).epoch(0))
    for r in range(3):
        oh, ow = official_size(*ds.images[r].shape[1:], 10)
        want = F.interpolate(ds.images[r][None].double() / 255, (oh, ow), mode="bilinear", align_corners=False, antialias=True)
        assert torch.allclose(x[r, :, :oh, :ow].double(), want[0], atol=1e-5)
        wm = F.interpolate(ds.masks[r][None, None].double(), (oh, ow), mode="nearest-exact")[0, 0].long()
        assert torch.equal(y[r, :oh, :ow], wm) and (y[r, oh:] == VOID).all() and (y[r, :, ow:] == VOID).all()


def test_normalisation_after_transforms():
    ds = seg_set(n=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    x, _, _ = next(DenseBatchLoader(ds, 4, sampler="sequential").epoch(0))
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    assert torch.allclose(x * std + mean, ds.images.float() / 255, atol=1e-6)


@pytest.mark.parametrize("variable", [False, True])
def test_two_processes_see_the_rows_of_one(variable):
    ds = seg_set(n=10, variable=variable)
    aug = SegmentationAugment(train=True, crop_size=11, blur=True)
    one = list(DenseBatchLoader(ds, 4, augment=aug, seed=1).epoch(3))
    two = [list(DenseBatchLoader(ds, 2, augment=aug, seed=1, rank=r, world_size=2).epoch(3)) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 3
    for b, (x, y, g) in enumerate(one):
        for r in range(2):
            xr, yr, gr = two[r][b]
            assert torch.allclose(xr, x[r::2], atol=1e-6) and torch.equal(yr, y[r::2]) and torch.equal(gr, g[r::2])


def test_epochs_replay_exactly_and_differ_between_epochs():
    ds = seg_set(n=6)
    loader = DenseBatchLoader(ds, 3, augment={"train": True, "crop_size": 10}, seed=2)
    a, b, c = (torch.cat([x for x, _, _ in loader.epoch(e)]) for e in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_balanced_sampler_uses_image_level_labels():
    labels = torch.tensor([0] * 12 + [1] * 4)
    groups = torch.tensor([0] * 10 + [1] * 2 + [0] * 3 + [1])
    ds = seg_set(n=16, groups=groups, labels=labels)
    loader = DenseBatchLoader(ds, 8, sampler="balanced", drop_last=True)
    order, _ = loader.indices(0)
    assert loader.epoch_size == 10 // 2 * 2 * 4 and order.numel() == 40  # quota 8 // (2 groups * 2 labels)
    cells = ds.groups[order] * 2 + ds.labels[order]
    for start in range(0, 40, 8):
        assert torch.bincount(cells[start:start + 8], minlength=4).tolist() == [2, 2, 2, 2]
    with pytest.raises(ConfigError, match="quota 4 = batch 16 // 4 cells"):
        DenseBatchLoader(seg_set(n=8, groups=torch.arange(8) % 2, labels=torch.arange(8) // 4), 16, sampler="balanced")


def test_resampled_data_set_gives_fresh_images_each_epoch():
    base = seg_set(n=4)

    def fresh(epoch):
        return DenseDataset((base.images.int() + epoch).clamp(max=255).to(torch.uint8), base.groups, 5, 2,
                            task="segmentation", name="toy", masks=base.masks)

    ds = DenseDataset(base.images, base.groups, 5, 2, task="segmentation", name="toy", masks=base.masks, resample=fresh)
    loader = DenseBatchLoader(ds, 4, sampler="sequential")
    for epoch in (0, 3, 3, 1):
        x, _, _ = next(loader.epoch(epoch))
        assert torch.equal(x, fresh(epoch).images.float() / 255)


# ----------------------------------------------------------------------------- detection


def det_set(sizes=((10, 20), (8, 8)), same=False):
    g = GEN().manual_seed(4)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    if same:
        images = torch.stack(images)
    boxes = [torch.tensor([[2.0, 1.0, 6.0, 5.0]]) for _ in sizes]
    labels = [torch.tensor([2]) for _ in sizes]
    difficult = [torch.tensor([True]) for _ in sizes]
    return DenseDataset(images, [0, 1][: len(sizes)] if len(sizes) <= 2 else [0] * len(sizes), 3, 2, task="detection",
                        name="toy-det", boxes=boxes, box_labels=labels, difficult=difficult)


def test_detection_resize_and_flip_move_boxes():
    ds = det_set()
    flipped = set()
    for seed in range(4):
        loader = DenseBatchLoader(ds, 2, sampler="sequential", augment={"train": True, "size": 40}, seed=seed)
        _, p = loader.indices(0)
        x, targets, g = next(loader.epoch(0))
        assert x.shape == (2, 3, 40, 40) and g.tolist() == [0, 1]
        for r in range(2):
            h, w = ds.images[r].shape[1:]
            want = F.interpolate(ds.images[r][None].double() / 255, (40, 40), mode="bilinear", align_corners=False,
                                 antialias=True)[0]
            box = [2.0 * 40 / w, 1.0 * 40 / h, 6.0 * 40 / w, 5.0 * 40 / h]
            if p["flip"][r]:
                want, box = want.flip(-1), [40 - box[2], box[1], 40 - box[0], box[3]]
            flipped.add(bool(p["flip"][r]))
            assert torch.allclose(x[r].double(), want, atol=1e-5)
            assert torch.allclose(targets[r]["boxes"], torch.tensor([box]), atol=1e-5)
            assert targets[r]["labels"].tolist() == [2] and targets[r]["difficult"].tolist() == [True]
    assert flipped == {True, False}


def test_detection_flip_by_hand_and_eval_padding():
    ds = det_set()
    flips = None
    for seed in range(20):  # find a seed that flips row 0 of sequential order
        loader = DenseBatchLoader(ds, 2, sampler="sequential", augment={"train": True}, seed=seed)
        flips = loader.indices(0)[1]["flip"]
        if flips[0]:
            break
    x, targets, _ = next(loader.epoch(0))
    assert x.shape == (2, 3, 10, 20)  # padded to the largest
    assert torch.equal(x[0], ds.images[0].float().flip(-1) / 255)
    assert targets[0]["boxes"].tolist() == [[14.0, 1.0, 18.0, 5.0]]  # width 20: x -> 20 - x
    assert (x[1, :, 8:, :] == 0).all() and (x[1, :, :, 8:] == 0).all()
    x, targets, _ = next(DenseBatchLoader(ds, 2, sampler="sequential").epoch(0))
    assert torch.equal(x[0], ds.images[0].float() / 255) and targets[0]["boxes"].tolist() == [[2.0, 1.0, 6.0, 5.0]]


def test_same_size_detection_batches_without_hook_equal_per_image_path():
    sizes = ((12, 12),) * 5
    batched = DenseBatchLoader(det_set(sizes, same=True), 5, augment={"train": True, "size": 9}, seed=3)
    listed = DenseBatchLoader(det_set(sizes, same=False), 5, augment={"train": True, "size": 9}, seed=3)
    (xa, ta, _), = batched.epoch(1)
    (xb, tb, _), = listed.epoch(1)
    assert torch.allclose(xa, xb, atol=1e-6)
    assert all(torch.allclose(a["boxes"], b["boxes"]) for a, b in zip(ta, tb))


def test_detection_hook_gets_a_per_row_generator_independent_of_processes():
    seen = {}

    def crop_left_half(image, boxes, labels, difficult, generator):
        seen.setdefault(float(image.sum()), []).append(torch.rand(1, generator=generator).item())
        keep = boxes[:, 2] <= image.shape[-1] // 2
        return image[:, :, : image.shape[-1] // 2], boxes[keep], labels[keep], difficult[keep]

    ds = det_set(((10, 20), (8, 8), (6, 14), (9, 12)))
    aug = DetectionAugment(train=True, flip=False, transform=crop_left_half)
    (x, targets, _), = DenseBatchLoader(ds, 4, augment=aug, seed=7).epoch(0)
    assert x.shape == (4, 3, 10, 10)  # widths halved, then padded to the largest
    assert [t["boxes"].shape[0] for t in targets] == [1 if ds.images[i].shape[-1] // 2 >= 6 else 0
                                                        for i in DenseBatchLoader(ds, 4, seed=7).indices(0)[0].tolist()]
    single = {k: list(v) for k, v in seen.items()}
    seen.clear()
    for r in range(2):
        list(DenseBatchLoader(ds, 2, augment=aug, seed=7, rank=r, world_size=2).epoch(0))
    assert seen == single
    eval_loader = DenseBatchLoader(ds, 4, augment=DetectionAugment(transform=crop_left_half))
    seen.clear()
    list(eval_loader.epoch(0))
    assert not seen  # the hook is a training transform


def test_empty_last_batch_of_a_process():
    ds = seg_set(n=5, variable=True)
    batches = list(DenseBatchLoader(ds, 1, sampler="sequential", rank=1, world_size=4).epoch(0))
    assert len(batches) == 2 and batches[1][0].shape[0] == 0 and batches[1][1].shape[0] == 0


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("options,match", [
    ({"crop_size": 0}, "augment.crop_size must be an integer >= 1"),
    ({"scale_range": [2.0, 1.0]}, "augment.scale_range"),
    ({"mask_pad": 7}, "augment.mask_pad must be 255"),
    ({"flip": "yes"}, "augment.flip must be true or false"),
    ({"crop": 5}, "augment.crop: unknown option. Did you mean 'crop_size'"),
    ({"eval_size": 2.5}, "augment.eval_size"),
])
def test_bad_segmentation_options(options, match):
    with pytest.raises(ConfigError, match=match):
        DenseBatchLoader(seg_set(), 2, augment=options)


def test_other_option_errors():
    with pytest.raises(ConfigError, match="data.augment.size"):
        parse_augment({"size": -1}, "detection", key="data.augment")
    with pytest.raises(ConfigError, match="crop_size must be set for toy"):
        DenseBatchLoader(seg_set(variable=True), 2, augment={"train": True})
    with pytest.raises(ConfigError, match="mapping of SegmentationAugment"):
        DenseBatchLoader(seg_set(), 2, augment=DetectionAugment())
    with pytest.raises(ConfigError, match="transform must be a callable"):
        DetectionAugment(transform=3)
    with pytest.raises(ConfigError, match="needs a DenseDataset"):
        DenseBatchLoader([1, 2], 2)
    with pytest.raises(ConfigError, match="sampler"):
        DenseBatchLoader(seg_set(), 2, sampler="random")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variable", [False, True])
def test_cuda_batches_equal_cpu_batches(variable):
    ds = seg_set(n=6, variable=variable)
    aug = SegmentationAugment(train=True, crop_size=11, blur=True)
    for (xc, yc, gc), (xg, yg, gg) in zip(DenseBatchLoader(ds, 3, augment=aug, seed=4).epoch(1),
                                          DenseBatchLoader(ds, 3, augment=aug, seed=4, device="cuda").epoch(1)):
        assert xg.is_cuda and torch.allclose(xg.cpu(), xc, atol=1e-5)
        assert torch.equal(yg.cpu(), yc) and torch.equal(gg.cpu(), gc)
    det = det_set(((10, 20), (8, 8)), same=False)
    for (xc, tc, _), (xg, tg, _) in zip(DenseBatchLoader(det, 2, augment={"train": True, "size": 16}).epoch(0),
                                        DenseBatchLoader(det, 2, augment={"train": True, "size": 16}, device="cuda").epoch(0)):
        assert torch.allclose(xg.cpu(), xc, atol=1e-5)
        assert all(g["boxes"].is_cuda and torch.allclose(g["boxes"].cpu(), c["boxes"]) for g, c in zip(tg, tc))
