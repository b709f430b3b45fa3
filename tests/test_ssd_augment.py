"""SSD augmentation: each transform against hand-computed values and plain-Python references,
determinism for a fixed generator, boxes inside the image after every step."""
import colorsys

import pytest
import torch
import torch.nn.functional as F

from fairdistill.data import ssd_augment as sa
from fairdistill.errors import ConfigError
from fairdistill.data.ssd_augment import (
    Expansion, Photometric, SSDAugmentation, crop_accepts, crop_boxes, crop_for_mode, draw_crop, draw_expand,
    draw_photometric, expand_image, flip, hsv_to_rgb, photometric, render, resize, rgb_to_hsv, saturate,
    shift_boxes,
)


def pixels(h=6, w=7, seed=0):
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed)).float()


def colorsys_map(x, fn):
    """Apply ``fn(r, g, b) -> (r, g, b)`` (values in [0, 1]) to every pixel of (3, H, W) ``x`` in [0, 255]."""
    flat = (x / 255.0).reshape(3, -1).T.tolist()
    return torch.tensor([fn(*p) for p in flat], dtype=torch.float32).T.reshape(x.shape) * 255.0


# ------------------------------------------------------------------ colour
def test_hsv_matches_colorsys_and_inverts():
    x = torch.cat([pixels(8, 8), torch.tensor([[[255.0, 0, 0, 255, 7]], [[0, 255, 0, 255, 7]], [[0, 0, 255, 0, 7]]])
                   .expand(3, 8, 5)], 2)
    h, s, v = rgb_to_hsv(x)
    ref = torch.tensor([colorsys.rgb_to_hsv(*p) for p in (x / 255).reshape(3, -1).T.tolist()]).T.reshape(3, *x.shape[1:])
    assert torch.allclose(h / 360.0, ref[0], atol=1e-6)
    assert torch.allclose(s, ref[1], atol=1e-6)
    assert torch.allclose(v / 255.0, ref[2], atol=1e-6)
    # pure red, green, blue, yellow and gray: hue 0, 120, 240, 60 and (by convention) 0
    assert h[0, -5:].tolist() == pytest.approx([0.0, 120.0, 240.0, 60.0, 0.0])
    assert torch.allclose(hsv_to_rgb(h, s, v), x, atol=1e-3)


def test_saturate_equals_the_hsv_round_trip():
    x = pixels(9, 9, seed=1)
    h, s, v = rgb_to_hsv(x)
    for f in (0.5, 0.9, 1.3, 1.5):
        assert torch.allclose(saturate(x, f), hsv_to_rgb(h, (s * f).clamp(max=1.0), v), atol=1e-3)


# ------------------------------------------------------------------ photometric
def test_photometric_single_steps():
    x = pixels()
    assert torch.equal(photometric(x, Photometric(brightness=20.0)), (x + 20).clamp(0, 255))
    assert torch.equal(photometric(x, Photometric(contrast=1.4)), (x * 1.4).clamp(0, 255))
    assert torch.equal(photometric(x, Photometric(swap=(2, 0, 1))), torch.stack([x[2], x[0], x[1]]))
    ref = colorsys_map(x, lambda r, g, b: colorsys.hsv_to_rgb(*((lambda h, s, v: ((h + 10 / 360) % 1, s, v))(
        *colorsys.rgb_to_hsv(r, g, b)))))
    assert torch.allclose(photometric(x, Photometric(hue=10.0)), ref, atol=1e-3)
    ref = colorsys_map(x, lambda r, g, b: colorsys.hsv_to_rgb(*((lambda h, s, v: ((h - 15 / 360) % 1, min(s * 1.2, 1), v))(
        *colorsys.rgb_to_hsv(r, g, b)))))
    assert torch.allclose(photometric(x, Photometric(hue=-15.0, saturation=1.2)), ref, atol=1e-3)
    assert torch.equal(photometric(x, Photometric()), x)


def test_photometric_order_of_contrast():
    x = pixels(seed=2)
    sat = lambda t: saturate(t, 0.6)  # noqa: E731
    first = photometric(x, Photometric(brightness=-40.0, contrast=1.5, contrast_first=True, saturation=0.6))
    last = photometric(x, Photometric(brightness=-40.0, contrast=1.5, contrast_first=False, saturation=0.6))
    b = (x - 40).clamp(0, 255)
    assert torch.allclose(first, sat((b * 1.5).clamp(0, 255)), atol=1e-4)
    assert torch.allclose(last, (sat(b) * 1.5).clamp(0, 255), atol=1e-4)
    assert not torch.allclose(first, last)


def test_draw_photometric_ranges_and_coins():
    g = torch.Generator().manual_seed(0)
    draws = [draw_photometric(g) for _ in range(400)]
    for field, lo, hi in (("brightness", -32, 32), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5), ("hue", -18, 18)):
        values = [getattr(d, field) for d in draws if getattr(d, field) is not None]
        assert 150 < len(values) < 250, field  # each step with p 0.5
        assert lo <= min(values) and max(values) <= hi
    assert {d.swap for d in draws if d.swap is not None} == set(sa.PERMUTATIONS)
    assert 150 < sum(d.contrast_first for d in draws) < 250
    # one 11-number draw per image, from the generator only
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    draw_photometric(g1)
    torch.rand(11, generator=g2, dtype=torch.float64)
    assert draw_photometric(g1) == draw_photometric(g2)


# ------------------------------------------------------------------ expand
def test_expand_hand_case():
    image = pixels(4, 5)
    e = Expansion(top=2, left=3, height=8, width=10)
    canvas = expand_image(image, e, (1.0, 2.0, 3.0))
    assert canvas.shape == (3, 8, 10)
    assert torch.equal(canvas[:, 2:6, 3:8], image)
    outside = torch.ones(8, 10, dtype=torch.bool)
    outside[2:6, 3:8] = False
    assert torch.equal(canvas[:, outside], torch.tensor([1.0, 2.0, 3.0])[:, None].expand(3, int(outside.sum())))
    assert shift_boxes(torch.tensor([[1.0, 1.0, 3.0, 2.0]]), e.left, e.top).tolist() == [[4.0, 3.0, 6.0, 4.0]]


def test_draw_expand_from_the_generator():
    for seed in range(20):
        g, ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        e = draw_expand(30, 40, g)
        coin, t, tl, tt = torch.rand(4, generator=ref, dtype=torch.float64).tolist()
        if coin >= 0.5:
            assert e == Expansion(0, 0, 30, 40)
        else:
            r = 1 + 3 * t
            assert e == Expansion(int(tt * (r * 30 - 30)), int(tl * (r * 40 - 40)), int(r * 30), int(r * 40))
            assert e.top + 30 <= e.height and e.left + 40 <= e.width


# ------------------------------------------------------------------ crop
def test_crop_keeps_boxes_by_centre_and_clips():
    boxes = torch.tensor([
        [12.0, 12.0, 20.0, 20.0],   # inside
        [0.0, 15.0, 30.0, 25.0],    # centre (15, 20) inside, clipped on the left
        [40.0, 30.0, 70.0, 60.0],   # centre (55, 45) outside
        [0.0, 0.0, 20.0, 20.0],     # centre (10, 10) on the corner: not strictly inside
        [45.0, 35.0, 60.0, 41.0],   # centre (52.5, 38) outside although it overlaps
        [30.0, 20.0, 60.0, 50.0],   # centre (45, 35) inside, clipped right and bottom
    ])
    kept, keep = crop_boxes(boxes, (10, 10, 50, 40))
    assert keep.tolist() == [0, 1, 5]
    assert kept.tolist() == [[2.0, 2.0, 10.0, 10.0], [0.0, 5.0, 20.0, 15.0], [20.0, 10.0, 40.0, 30.0]]


def test_crop_accepts_by_min_iou_and_centre():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    rects = torch.tensor([[0, 0, 10, 10], [0, 0, 20, 10], [0, 0, 20, 20], [5, 5, 15, 15]], dtype=torch.float64)
    # IoU 1, 1/2, 1/4, 25/175; the centre (5, 5) is strictly inside the first three only
    assert crop_accepts(box, rects, None).tolist() == [True, True, True, False]
    assert crop_accepts(box, rects, 0.5).tolist() == [True, True, False, False]
    assert crop_accepts(box, rects, 0.9).tolist() == [True, False, False, False]
    # some box with its centre inside must meet the minimum: [0, 0, 20, 20] holds both boxes'
    # centres, with IoU 1/4 and 1/16; [0, 0, 10, 10] meets 0.9 through the first box only
    two = torch.cat([box, torch.tensor([[10.0, 10.0, 15.0, 15.0]], dtype=torch.float64)])
    assert crop_accepts(two, rects[:3], 0.2).tolist() == [True, True, True]
    assert crop_accepts(two, rects[:3], 0.3).tolist() == [True, True, False]
    # a box overlapping well but with its centre outside does not count
    off = torch.tensor([[2.0, 0.0, 22.0, 10.0]], dtype=torch.float64)  # centre (12, 5); IoU 180/220 with rect 1
    assert crop_accepts(off, rects[1:2], 0.5).tolist() == [True]
    assert crop_accepts(off, torch.tensor([[0, 0, 12, 10]], dtype=torch.float64), 0.1).tolist() == [False]
    assert crop_accepts(torch.zeros(0, 4, dtype=torch.float64), rects, 0.9).all()


def reference_crop(boxes, h, w, min_iou, u):
    """Plain-Python trial loop: the first valid candidate in which a box with its centre inside
    meets the mode's minimum IoU."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    for tw, th, tl, tt in u.tolist():
        cw, ch = w * (0.3 + 0.7 * tw), h * (0.3 + 0.7 * th)
        if not 0.5 <= ch / cw <= 2.0:
            continue
        left, top = tl * (w - cw), tt * (h - ch)
        rect = (int(left), int(top), int(left + cw), int(top + ch))
        if rect[2] <= rect[0] or rect[3] <= rect[1]:
            continue
        inside = [b for b in boxes if rect[0] < (b[0] + b[2]) / 2 < rect[2] and rect[1] < (b[1] + b[3]) / 2 < rect[3]]
        if any(min_iou is None or iou(b, rect) >= min_iou for b in inside):
            return rect
    return None


@pytest.mark.parametrize("min_iou", [None, 0.1, 0.3, 0.5, 0.7])
def test_crop_for_mode_matches_a_plain_loop(min_iou):
    g = torch.Generator().manual_seed(3)
    found = 0
    for _ in range(30):
        xy = torch.rand(3, 2, generator=g, dtype=torch.float64) * torch.tensor([60.0, 40.0])
        boxes = torch.cat([xy, xy + 5 + torch.rand(3, 2, generator=g, dtype=torch.float64) * 30], 1)
        boxes = torch.minimum(boxes, torch.tensor([100.0, 80.0, 100.0, 80.0], dtype=torch.float64))
        u = torch.rand(50, 4, generator=g, dtype=torch.float64)
        got = crop_for_mode(boxes, 80, 100, min_iou, u)
        assert got == reference_crop(boxes.tolist(), 80, 100, min_iou, u)
        found += got is not None
    assert found > 0


def test_draw_crop_shape_bounds():
    boxes = torch.tensor([[20.0, 10.0, 60.0, 50.0], [5.0, 40.0, 30.0, 78.0]])
    crops = [draw_crop(boxes, 80, 100, torch.Generator().manual_seed(s)) for s in range(200)]
    assert 10 < sum(c is None for c in crops) < 60  # "keep" is one mode of seven
    for c in (c for c in crops if c is not None):
        w, h = c[2] - c[0], c[3] - c[1]
        assert 0 <= c[0] and 0 <= c[1] and c[2] <= 100 and c[3] <= 80
        assert w >= int(0.3 * 100) - 1 and h >= int(0.3 * 80) - 1
        assert 0.45 <= h / w <= 2.1  # aspect in [0.5, 2] before rounding to whole pixels
        assert crop_accepts(boxes.double(), torch.tensor([c], dtype=torch.float64), None).item()


# ------------------------------------------------------------------ flip, resize, render
def test_flip_hand_case():
    image = pixels(2, 4)
    out, boxes = flip(image, torch.tensor([[0.0, 0.0, 1.0, 2.0], [1.5, 0.5, 4.0, 1.0]]))
    assert torch.equal(out[:, :, 0], image[:, :, 3]) and torch.equal(out[:, :, 3], image[:, :, 0])
    assert boxes.tolist() == [[3.0, 0.0, 4.0, 2.0], [0.0, 0.5, 2.5, 1.0]]
    again, back = flip(out, boxes)
    assert torch.equal(again, image) and back.tolist() == [[0.0, 0.0, 1.0, 2.0], [1.5, 0.5, 4.0, 1.0]]


def test_resize_boxes_and_pixels():
    image = pixels(50, 100)
    out, boxes = resize(image, torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 100.0, 50.0]]), 25)
    assert out.shape == (3, 25, 25)
    assert boxes.tolist() == [[2.5, 10.0, 7.5, 20.0], [0.0, 0.0, 25.0, 25.0]]
    assert torch.allclose(out, F.interpolate(image[None], size=(25, 25), mode="bilinear", align_corners=False)[0])
    flat, _ = resize(torch.full((3, 7, 13), 42.0), torch.zeros(0, 4), 5)
    assert torch.allclose(flat, torch.full((3, 5, 5), 42.0))


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("case", [
    (Expansion(0, 0, 12, 16), None, 16),            # plain resize, identity size
    (Expansion(0, 0, 12, 16), None, 9),             # downscale
    (Expansion(0, 0, 12, 16), (3, 2, 11, 9), 20),   # crop, upscale
    (Expansion(5, 7, 30, 40), None, 24),            # zoom-out
    (Expansion(5, 7, 30, 40), (4, 2, 26, 21), 13),  # zoom-out, crop across the image edge
    (Expansion(5, 7, 30, 40), (25, 20, 38, 29), 8),  # crop of the fill only
])
def test_render_equals_expand_crop_flip_resize(case, mirror):
    expansion, rect, size = case
    image = pixels(12, 16, seed=4)
    fill = (10.0, 200.0, 90.0)
    canvas = expand_image(image, expansion, fill)
    if rect is not None:
        canvas = canvas[:, rect[1]:rect[3], rect[0]:rect[2]]
    if mirror:
        canvas = canvas.flip(-1)
    ref = F.interpolate(canvas[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(render(image, expansion, rect, fill, size, mirror), ref, atol=2e-3)


# ------------------------------------------------------------------ the pipeline
def test_all_steps_off_is_the_resize():
    image = pixels(30, 40).to(torch.uint8)
    boxes = torch.tensor([[4.0, 3.0, 20.0, 25.0]])
    aug = SSDAugmentation(16, photometric=False, expand=False, crop=False, flip=False)
    x, b, keep = aug(image, boxes, torch.Generator().manual_seed(0))
    ref, rb = resize(image.float(), boxes, 16)
    assert torch.allclose(x, ref / 255.0, atol=1e-5) and torch.equal(b, rb) and keep.tolist() == [0]


def test_flip_only_pipeline_against_the_hand_formula():
    image = pixels(20, 40).to(torch.uint8)
    boxes = torch.tensor([[4.0, 2.0, 10.0, 12.0]])
    aug = SSDAugmentation(20, photometric=False, expand=False, crop=False)
    seen = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        mirrored = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item() < 0.5
        _, b, _ = aug(image, boxes, g)
        want = [[(40 - 10) / 2, 2.0, (40 - 4) / 2, 12.0]] if mirrored else [[2.0, 2.0, 5.0, 12.0]]
        assert b.tolist() == want
        seen.add(mirrored)
    assert seen == {True, False}


def test_deterministic_for_a_fixed_generator():
    image = pixels(48, 64, seed=7).to(torch.uint8)
    boxes = torch.tensor([[5.0, 5.0, 30.0, 40.0], [30.0, 10.0, 60.0, 30.0], [40.0, 30.0, 50.0, 47.0]])
    aug = SSDAugmentation(32)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(11)
        runs.append([aug(image, boxes, g) for _ in range(10)])
    for (x1, b1, k1), (x2, b2, k2) in zip(*runs):
        assert torch.equal(x1, x2) and torch.equal(b1, b2) and torch.equal(k1, k2)
    other = [aug(image, boxes, torch.Generator().manual_seed(12)) for _ in range(10)]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(runs[0], other))


def test_boxes_stay_inside_after_every_step():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        h, w = int(torch.randint(20, 60, (1,), generator=g)), int(torch.randint(20, 60, (1,), generator=g))
        xy = torch.rand(4, 2, generator=g) * torch.tensor([w - 4.0, h - 4.0])
        wh = 1 + torch.rand(4, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(w), float(h)]))], 1)
        e = draw_expand(h, w, g)
        shifted = shift_boxes(boxes, e.left, e.top)
        assert (shifted[:, :2] >= 0).all() and (shifted[:, 2] <= e.width).all() and (shifted[:, 3] <= e.height).all()
        rect = draw_crop(shifted, e.height, e.width, g)
        if rect is not None:
            cropped, keep = crop_boxes(shifted, rect)
            assert keep.numel() >= 1
            assert (cropped[:, :2] >= 0).all() and (cropped[:, 2] <= rect[2] - rect[0]).all()
            assert (cropped[:, 3] <= rect[3] - rect[1]).all()
            assert (cropped[:, 2] > cropped[:, 0]).all() and (cropped[:, 3] > cropped[:, 1]).all()
        x, out, keep = SSDAugmentation(24)(pixels(h, w, seed=trial).to(torch.uint8), boxes, g)
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert out.shape == (keep.numel(), 4) and keep.numel() >= 1
        assert (out >= 0).all() and (out <= 24).all()
        assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()


def test_image_without_boxes_and_input_untouched():
    image = pixels(20, 30).to(torch.uint8)
    before = image.clone()
    x, b, keep = SSDAugmentation(10)(image, torch.zeros(0, 4), torch.Generator().manual_seed(1))
    assert x.shape == (3, 10, 10) and b.shape == (0, 4) and keep.numel() == 0
    assert torch.equal(image, before)
    with pytest.raises(ConfigError, match="size"):
        SSDAugmentation(0)
    with pytest.raises(ConfigError, match="fill"):
        SSDAugmentation(8, fill=(1.0, 2.0))(image, torch.zeros(0, 4), torch.Generator())


# ------------------------------------------------------------------ the batch-pipeline hook
def test_hook_is_the_recipe_without_its_flip():
    image = pixels(30, 40, seed=9).to(torch.uint8)
    boxes = torch.tensor([[4.0, 3.0, 20.0, 25.0], [22.0, 5.0, 39.0, 28.0]])
    labels, difficult = torch.tensor([3, 7]), torch.tensor([False, True])
    aug = SSDAugmentation(24, flip=False)
    for seed in range(8):
        x, b, keep = aug(image, boxes, torch.Generator().manual_seed(seed))
        hx, hb, hl, hd = aug.hook(image.float() / 255.0, boxes, labels, difficult, torch.Generator().manual_seed(seed))
        assert torch.allclose(hx, x, atol=1e-5) and torch.equal(hb, b)
        assert torch.equal(hl, labels[keep]) and torch.equal(hd, difficult[keep])


def test_dense_batch_loader_with_the_hook():
    from fairdistill.data.dense import DenseDataset
    from fairdistill.data.dense_augment import DetectionAugment
    from fairdistill.data.dense_loader import DenseBatchLoader

    images = [pixels(30, 40, seed=1).to(torch.uint8), pixels(24, 20, seed=2).to(torch.uint8),
              pixels(36, 36, seed=3).to(torch.uint8)]
    boxes = [torch.tensor([[4.0, 3.0, 20.0, 25.0]]), torch.tensor([[1.0, 1.0, 19.0, 12.0], [5.0, 10.0, 9.0, 22.0]]),
             torch.tensor([[10.0, 10.0, 30.0, 30.0]])]
    labels = [torch.tensor([1]), torch.tensor([2, 1]), torch.tensor([2])]
    ds = DenseDataset(images, torch.zeros(3), 2, 1, task="detection", name="tiny", boxes=boxes, box_labels=labels)
    aug = SSDAugmentation(16)
    settings = DetectionAugment(train=True, size=16, flip=True, antialias=False, transform=aug.hook)
    loader = DenseBatchLoader(ds, 2, augment=settings, seed=4)
    order, params = loader.indices(0)
    got = [t for _, targets, _ in loader.epoch(0) for t in targets]
    xs = torch.cat([x for x, _, _ in loader.epoch(0)])
    for row, i in enumerate(order.tolist()):
        gen = torch.Generator().manual_seed(int(params["seed"][row]))
        x, b, lab, _ = aug.hook(images[i].float() / 255.0, boxes[i], labels[i], ds.difficult[i], gen)
        if params["flip"][row]:
            x, b = flip(x, b)
        assert torch.allclose(xs[row], x, atol=1e-5)
        assert torch.allclose(got[row]["boxes"], b) and torch.equal(got[row]["labels"], lab)
        assert ((b >= 0) & (b <= 16)).all()
