"""Crops on the batch pipeline (data/augment.py) against per-image references, and the stored
sizes of the face and ImageFolder builders that the crops need."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fairdistill.data.augment import (
    ATTEMPTS, CropSpec, apply_crop, boxes_from_uniforms, crop_gather, draw_boxes, fallback_box, fixed_box,
    resized_crop,
)
from fairdistill.data.celeba import celeba
from fairdistill.data.imagefolder import imagefolder
from fairdistill.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- references


def numpy_bilinear(img: np.ndarray, box, size: int, flip: bool) -> np.ndarray:
    """The documented semantics written out per output pixel: centre (i + 0.5) * side / size -
    0.5 clamped to the box, 2 x 2 taps, then the left-right mirror."""
    top, left, bh, bw = box
    crop = img[:, top:top + bh, left:left + bw].astype(np.float64)
    out = np.empty((img.shape[0], size, size))
    for i in range(size):
        sy = min(max((i + 0.5) * bh / size - 0.5, 0.0), bh - 1)
        y0 = int(math.floor(sy))
        y1, ly = min(y0 + 1, bh - 1), sy - y0
        for j in range(size):
            sx = min(max((j + 0.5) * bw / size - 0.5, 0.0), bw - 1)
            x0 = int(math.floor(sx))
            x1, lx = min(x0 + 1, bw - 1), sx - x0
            out[:, i, j] = ((1 - ly) * ((1 - lx) * crop[:, y0, x0] + lx * crop[:, y0, x1])
                            + ly * ((1 - lx) * crop[:, y1, x0] + lx * crop[:, y1, x1]))
    return out[:, :, ::-1] if flip else out


def interpolate_reference(x: torch.Tensor, boxes, size: int, flips) -> torch.Tensor:
    """Per image: F.interpolate of the box (bilinear, align_corners=False, no antialias)."""
    out = []
    for k in range(len(x)):
        t, l, h, w = (int(v) for v in boxes[k])
        o = F.interpolate(x[k:k + 1, :, t:t + h, l:l + w].float(), (size, size), mode="bilinear", align_corners=False)[0]
        out.append(o.flip(-1) if flips[k] else o)
    return torch.stack(out)


def python_rrc(us, ur, up, h, w, scale, ratio):
    """RandomResizedCrop.get_params as described (10 attempts, then the central fallback), on
    the given uniforms, in plain Python floats."""
    area = h * w
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for k in range(len(us)):
        target = area * (scale[0] + (scale[1] - scale[0]) * us[k])
        aspect = math.exp(lo + (hi - lo) * ur[k])
        bw, bh = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < bw <= w and 0 < bh <= h:
            return [int(up[0] * (h - bh + 1)), int(up[1] * (w - bw + 1)), bh, bw]
    if w / h < min(ratio):
        bw, bh = w, int(round(w / min(ratio)))
    elif w / h > max(ratio):
        bw, bh = int(round(h * max(ratio))), h
    else:
        bw, bh = w, h
    return [(h - bh) // 2, (w - bw) // 2, bh, bw]


def numpy_crop(img: np.ndarray, top: int, left: int, size: int, flip: bool, padding: int) -> np.ndarray:
    padded = np.pad(img, ((0, 0), (padding, padding), (padding, padding)), mode="reflect")
    crop = padded[:, top + padding:top + padding + size, left + padding:left + padding + size]
    return crop[:, :, ::-1] if flip else crop


# ----------------------------------------------------------------------------- resampling


def test_interpolate_reference_is_the_documented_formula():
    x = torch.rand(1, 2, 7, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for box, size, flip in (((1, 2, 5, 3), 4, False), ((0, 0, 7, 6), 9, True), ((3, 1, 2, 4), 5, True),
                            ((6, 5, 1, 1), 3, False), ((0, 1, 7, 2), 2, True)):
        want = numpy_bilinear(x[0].numpy(), box, size, flip)
        got = interpolate_reference(x.double(), [box], size, [flip])[0]
        assert np.allclose(got.numpy(), want, atol=1e-6), box


@pytest.mark.parametrize("h,w,size", [(9, 7, 5), (6, 6, 11), (12, 5, 4), (3, 8, 8)])
def test_resized_crop_equals_per_image_reference(h, w, size):
    g = torch.Generator().manual_seed(h * 100 + w)
    n = 40
    x = torch.rand(n, 3, h, w, generator=g)
    boxes, flips = draw_boxes(CropSpec("random_resized", size), n, h, w, 0, True, g)
    edge = torch.tensor([[0, 0, h, w], [h - 1, w - 1, 1, 1], [0, w - 1, h, 1], [h - 1, 0, 1, w]])
    boxes = torch.cat([boxes, edge])
    flips = torch.cat([flips, torch.tensor([True, False, True, False])])
    x = torch.cat([x, x[:4]])
    got = resized_crop(x, boxes, size, flips)
    assert got.shape == (n + 4, 3, size, size) and got.dtype == torch.float32
    assert torch.allclose(got, interpolate_reference(x, boxes, size, flips), atol=2e-6)
    for k in (0, 1, n, n + 1, n + 2):  # and the plain formula, for a few
        want = numpy_bilinear(x[k].double().numpy(), boxes[k].tolist(), size, bool(flips[k]))
        assert np.allclose(got[k].numpy(), want, atol=2e-6)


def test_resized_crop_of_full_size_images_within_float_tolerance():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (6, 3, 218, 178), generator=g, dtype=torch.uint8)
    boxes, flips = draw_boxes(CropSpec("random_resized", 176), 6, 218, 178, 0, True, g)
    got = apply_crop(x, CropSpec("random_resized", 176), boxes, flips)
    # grid_sample's normalised coordinates: about 1e-5 of the value range at this size
    assert (got - interpolate_reference(x, boxes, 176, flips)).abs().max() < 255 * 5e-5


def test_resize_kind_is_interpolate_of_the_whole_image():
    x = torch.rand(3, 2, 10, 7, generator=torch.Generator().manual_seed(4))
    spec = CropSpec("resize", 6)
    boxes, flips = draw_boxes(spec, 3, 10, 7, 0, False, torch.Generator().manual_seed(0))
    want = F.interpolate(x, (6, 6), mode="bilinear", align_corners=False)
    assert boxes.tolist() == [[0, 0, 10, 7]] * 3 and not flips.any()
    assert torch.allclose(apply_crop(x, spec, boxes, flips), want, atol=1e-6)


def test_empty_batches_keep_the_output_shape():
    x = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    none = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
    assert apply_crop(x, CropSpec("random_resized", 5), *none).shape == (0, 3, 5, 5)
    assert apply_crop(x, CropSpec("random", 6), *none).shape == (0, 3, 6, 6)


# ----------------------------------------------------------------------------- integer crops


@pytest.mark.parametrize("padding", [0, 2])
def test_random_crop_is_an_exact_copy_of_the_padded_image(padding):
    g = torch.Generator().manual_seed(padding)
    x = torch.randint(0, 256, (30, 3, 9, 7), generator=g, dtype=torch.uint8)
    spec = CropSpec("random", 6)
    boxes, flips = draw_boxes(spec, 30, 9, 7, padding, True, g)
    assert boxes[:, 0].min() >= -padding and boxes[:, 0].max() <= 9 + padding - 6
    assert boxes[:, 1].min() >= -padding and boxes[:, 1].max() <= 7 + padding - 6
    got = crop_gather(x, boxes, flips, (6, 6))
    for k in range(30):
        want = numpy_crop(x[k].numpy(), int(boxes[k, 0]), int(boxes[k, 1]), 6, bool(flips[k]), padding)
        assert np.array_equal(got[k].numpy(), want)


@pytest.mark.parametrize("crop", ["random:5", "center:4", "random_resized:6", "resize:3"])
def test_crops_read_from_the_store_by_index(crop):
    g = torch.Generator().manual_seed(6)
    store = torch.randint(0, 256, (20, 3, 8, 7), generator=g, dtype=torch.uint8)
    index = torch.tensor([3, 17, 3, 0, 11])
    spec = CropSpec.parse(crop)
    boxes, flips = draw_boxes(spec, 5, 8, 7, 1 if spec.kind == "random" else 0, True, g)
    got = apply_crop(store, spec, boxes, flips, index=index)
    assert torch.equal(got, apply_crop(store[index], spec, boxes, flips))
    strided = store.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    assert torch.equal(apply_crop(strided, spec, boxes, flips, index=index), got)


def test_random_crop_offsets_cover_every_position_uniformly():
    boxes, flips = draw_boxes(CropSpec("random", 176), 8000, 256, 200, 0, True, torch.Generator().manual_seed(0))
    tops, lefts = boxes[:, 0], boxes[:, 1]
    assert sorted(tops.unique().tolist()) == list(range(81)) and sorted(lefts.unique().tolist()) == list(range(25))
    assert abs(tops.double().mean() - 40) < 1.0 and abs(lefts.double().mean() - 12) < 0.4
    assert abs(flips.double().mean() - 0.5) < 0.03


def test_center_crop_offsets_are_torchvisions():
    # int(round((side - size) / 2)) with Python's round half to even: 3.5 -> 4, 2.5 -> 2
    assert fixed_box(CropSpec("center", 2), 9, 7) == (4, 2, 2, 2)
    assert fixed_box(CropSpec("center", 224), 256, 256) == (16, 16, 224, 224)
    assert fixed_box(CropSpec("center", 176), 218, 178) == (21, 1, 176, 176)
    x = torch.arange(2 * 9 * 7, dtype=torch.uint8).view(1, 2, 9, 7)
    boxes, flips = draw_boxes(CropSpec("center", 3), 1, 9, 7, 0, False, torch.Generator())
    assert torch.equal(apply_crop(x, CropSpec("center", 3), boxes, flips), x[:, :, 3:6, 2:5].float())


# ----------------------------------------------------------------------------- RandomResizedCrop boxes


@pytest.mark.parametrize("h,w,scale,ratio", [
    (256, 256, (0.08, 1.0), (3 / 4, 4 / 3)),
    (218, 178, (0.08, 1.0), (3 / 4, 4 / 3)),
    (30, 30, (0.9, 1.0), (2.0, 3.0)),  # most attempts fail: fallbacks and late attempts
    (6, 40, (0.5, 1.0), (0.2, 0.5)),
    (3, 3, (0.08, 1.0), (3 / 4, 4 / 3)),
])
def test_boxes_follow_the_algorithm_per_sample(h, w, scale, ratio):
    g = torch.Generator().manual_seed(h + w)
    n = 400
    us = torch.rand(n, ATTEMPTS, generator=g, dtype=torch.float64)
    ur = torch.rand(n, ATTEMPTS, generator=g, dtype=torch.float64)
    up = torch.rand(n, 2, generator=g, dtype=torch.float64)
    boxes = boxes_from_uniforms(us, ur, up, h, w, scale, ratio)
    want = [python_rrc(us[k].tolist(), ur[k].tolist(), up[k].tolist(), h, w, scale, ratio) for k in range(n)]
    assert boxes.tolist() == want
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    assert (bh >= 1).all() and (bw >= 1).all()


def test_fallback_is_the_central_box_clamped_to_the_ratio_range():
    assert fallback_box(100, 4, (3 / 4, 4 / 3)) == (47, 0, 5, 4)  # tall: width 4, height round(4 / 0.75) = 5
    assert fallback_box(4, 100, (3 / 4, 4 / 3)) == (0, 47, 4, 5)  # wide: height 4, width round(4 * 4 / 3) = 5
    assert fallback_box(30, 36, (3 / 4, 4 / 3)) == (0, 0, 30, 36)  # inside the range: the whole image
    # a 100 x 4 image never fits an attempt (width round(sqrt(400 s r)) >= 5 for s >= 0.08, r >= 3/4)
    boxes, _ = draw_boxes(CropSpec("random_resized", 8), 50, 100, 4, 0, False, torch.Generator().manual_seed(1))
    assert boxes.tolist() == [[47, 0, 5, 4]] * 50


def test_draw_boxes_order_and_consumption_are_fixed():
    n, h, w = 7, 40, 30
    g = torch.Generator().manual_seed(5)
    boxes, flips = draw_boxes(CropSpec("random_resized", 16, (0.2, 0.9), (0.5, 2.0)), n, h, w, 0, True, g)
    after = torch.rand(1, generator=g)
    m = torch.Generator().manual_seed(5)
    us, ur = (torch.rand(n, ATTEMPTS, generator=m, dtype=torch.float64) for _ in range(2))
    up = torch.rand(n, 2, generator=m, dtype=torch.float64)
    assert torch.equal(boxes, boxes_from_uniforms(us, ur, up, h, w, (0.2, 0.9), (0.5, 2.0)))
    assert torch.equal(flips, torch.rand(n, generator=m) < 0.5)
    assert torch.equal(after, torch.rand(1, generator=m))
    # flip=False draws the flips all the same (so the stream does not depend on it)
    g2 = torch.Generator().manual_seed(5)
    boxes2, flips2 = draw_boxes(CropSpec("random_resized", 16, (0.2, 0.9), (0.5, 2.0)), n, h, w, 0, False, g2)
    assert torch.equal(boxes2, boxes) and not flips2.any() and torch.equal(torch.rand(1, generator=g2), after)


def test_box_statistics_on_a_large_image():
    boxes, _ = draw_boxes(CropSpec("random_resized", 224), 20000, 1000, 1000, 0, False, torch.Generator().manual_seed(2))
    top, left, bh, bw = boxes.double().T
    area, log_aspect = bh * bw / 1e6, torch.log(bw / bh)
    assert area.min() > 0.079 and area.max() <= 1.0
    assert log_aspect.abs().max() <= math.log(4 / 3) + 0.01
    assert abs(log_aspect.mean()) < 0.005  # log-uniform ratio: symmetric around 0
    # an attempt fits when s <= min(r, 1 / r): E[s | fits] = 0.4778 (numerical integral over r)
    assert abs(area.mean() - 0.4778) < 0.006
    for start, side in ((top, bh), (left, bw)):  # offsets uniform over 0..1000 - side
        free = side < 1000
        assert abs((start[free] / (1000 - side[free])).mean() - 0.5) < 0.01


# ----------------------------------------------------------------------------- specs


def test_spec_forms():
    assert CropSpec.parse(None) == CropSpec() == CropSpec.parse("none")
    assert CropSpec.parse("random_resized:224") == CropSpec("random_resized", 224, (0.08, 1.0), (0.75, 4 / 3))
    assert CropSpec.parse({"kind": "random", "size": 176}) == CropSpec("random", 176)
    spec = CropSpec.parse({"kind": "random_resized", "size": 224, "scale": [0.08, 1.0], "ratio": [0.75, 1.3333]})
    assert spec.ratio == (0.75, 1.3333) and CropSpec.parse(spec.as_dict()) == spec
    assert CropSpec.parse(" center : 224 ") == CropSpec("center", 224)
    assert CropSpec.parse("center:224", deterministic=True).kind == "center"
    assert CropSpec("random_resized", 224).fixed(256, 256) == CropSpec("center", 224)
    assert CropSpec("random_resized", 300).fixed(256, 256) == CropSpec("resize", 300)
    assert CropSpec("random", 176).fixed(256, 256) == CropSpec("center", 176)
    assert CropSpec("resize", 9).fixed(4, 4) == CropSpec("resize", 9)
    assert CropSpec("random", 6).output_hw(9, 7) == (6, 6) and CropSpec().output_hw(9, 7) == (9, 7)


@pytest.mark.parametrize("value,match", [
    ("randm:224", "unknown crop kind 'randm'.*Did you mean 'random'"),
    ("center", "needs a size >= 1"),
    ("center:big", "must be an integer"),
    ("none:3", "takes no size"),
    ({"kind": "random_resized", "size": 224, "scale": [0.5, 0.2]}, "scale: need 0 < low <= high <= 1"),
    ({"kind": "random_resized", "size": 224, "ratio": [0, 1]}, "ratio: need 0 < low <= high"),
    ({"kind": "random_resized", "size": 224, "ratio": 1.5}, "ratio must be two numbers"),
    ({"kind": "center", "size": 224, "scale": [0.1, 1]}, "random_resized only"),
    ({"kind": "center", "sise": 224}, "unknown key 'sise'.*Did you mean 'size'"),
    ({"kind": "center", "size": 22.5}, "size must be an integer"),
    (224, "expected a crop"),
])
def test_spec_errors(value, match):
    with pytest.raises(ConfigError, match=match):
        CropSpec.parse(value, "data.crop")


def test_spec_checks_against_the_images():
    with pytest.raises(ConfigError, match="data.eval_crop: an evaluation crop must be deterministic"):
        CropSpec.parse("random_resized:224", "data.eval_crop", deterministic=True)
    with pytest.raises(ConfigError, match="size 300 is larger than the 256x256 images of toy"):
        CropSpec("center", 300).check(256, 256, 0, "toy")
    with pytest.raises(ConfigError, match="takes no padding"):
        CropSpec("random_resized", 224).check(256, 256, 4, "toy")
    CropSpec("random", 36).check(32, 32, 2, "toy")  # fits the padded image
    with pytest.raises(ConfigError, match="36x36 images of toy after padding"):
        CropSpec("random", 37).check(32, 32, 2, "toy")
    CropSpec("random_resized", 1000).check(32, 32, 0, "toy")  # enlarging is allowed


# ----------------------------------------------------------------------------- stored sizes


def jpeg(path, size, red):
    Image.new("RGB", size, (red, 100, 50)).save(path, quality=95)


def small_celeba(tmp_path, sizes=None):
    """4 train + 4 test images of 9 x 11 (width x height), all four (Attractive, Male) cells."""
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    header = ["Attractive", "Male"]
    cells = [(1, 1), (1, -1), (-1, 1), (-1, -1)] * 2
    names = [f"{i + 1:06d}.jpg" for i in range(8)]
    lines = ["8", " ".join(header)] + [f"{n} {a:2d} {m:2d}" for n, (a, m) in zip(names, cells)]
    (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {0 if i < 4 else 2}\n" for i, n in enumerate(names)))
    for i, n in enumerate(names):
        jpeg(base / "img_align_celeba" / n, (sizes or {}).get(i, (9, 11)), red=20 * i)


def test_celeba_training_images_at_their_original_size(tmp_path):
    small_celeba(tmp_path)
    train = celeba(root=tmp_path, split="train", image_size=8, train_size="original")
    test = celeba(root=tmp_path, split="test", image_size=8, train_size="original")
    assert train.images.shape == (4, 3, 11, 9) and test.images.shape == (4, 3, 8, 8)
    with Image.open(tmp_path / "celeba" / "img_align_celeba" / "000002.jpg") as im:
        assert np.array_equal(train.images[1].permute(1, 2, 0).numpy(), np.asarray(im.convert("RGB")))
    assert celeba(root=tmp_path, split="train", image_size=8, train_size=6).images.shape == (4, 3, 6, 6)
    assert celeba(root=tmp_path, split="train", image_size=8).images.shape == (4, 3, 8, 8)  # default: as before
    with pytest.raises(ConfigError, match="celeba.train_size"):
        celeba(root=tmp_path, split="train", train_size="full")


def test_original_size_needs_one_size(tmp_path):
    small_celeba(tmp_path, sizes={2: (10, 11)})
    with pytest.raises(DataError, match="not 9x11.*000003.jpg is 10x11.*train_size"):
        celeba(root=tmp_path, split="train", image_size=8, train_size="original")


def test_original_size_cache_roundtrip(tmp_path):
    small_celeba(tmp_path)
    kw = dict(root=tmp_path, split="train", image_size=8, train_size="original", cache=True)
    first = celeba(**kw)
    assert torch.equal(celeba(**kw).images, first.images)
    assert len(list((tmp_path / ".fairdistill_cache").glob("celeba-train-*.pt"))) == 1


def test_imagefolder_train_size(tmp_path):
    for split in ("train", "val"):
        d = tmp_path / split / "a"
        d.mkdir(parents=True)
        arr = np.zeros((8, 16, 3), dtype=np.uint8)
        arr[:, :, 0] = (10 * np.arange(16))[None, :]
        Image.fromarray(arr).save(d / "x.png")
    train = imagefolder(root=tmp_path, split="train", image_size=6, resize=8, train_size=4)
    assert train.images.shape == (1, 3, 4, 4)  # short side 4 (16x8 -> 8x4), centre 4 x 4
    assert imagefolder(root=tmp_path, split="train", image_size=6, resize=8).images.shape == (1, 3, 8, 8)
    assert imagefolder(root=tmp_path, split="test", image_size=6, resize=8, train_size=4).images.shape == (1, 3, 6, 6)
    with pytest.raises(ConfigError, match="imagefolder.train_size"):
        imagefolder(root=tmp_path, split="train", train_size=0)
