"""COCO-style mAP (IoU 0.50:0.95, 101-point) of a detector through ``faster-coco-eval`` (optional extra).

Takes the per-image lists of ``fairdistill.metrics.detection`` (boxes xyxy continuous pixels,
labels 1..C) and builds COCO records in memory: one image per list entry (id = its index), boxes
as [x, y, w, h], area = w * h (COCO's small/medium/large ranges use it; COCO's own files hold
the mask area), category ids = the labels. A difficult ground truth becomes
``iscrowd = 1``, COCO's own "ignore" region: detections matched to it count neither way, as in
VOC, but COCO lets several detections match one crowd box and measures that overlap as
intersection / detection area (COCO's rule, not VOC's).
"""
from __future__ import annotations

from .common import NAN
from .detection import parse_inputs

__all__ = ["coco_map"]

# Indices into COCOeval.stats (the standard 12-number summary with maxDets 1, 10, 100).
_STATS = {"map": 0, "map_50": 1, "map_75": 2, "map_small": 3, "map_medium": 4, "map_large": 5,
          "mar_1": 6, "mar_10": 7, "mar_100": 8, "mar_small": 9, "mar_medium": 10, "mar_large": 11}


def _xywh(b) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in b)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_map(detections, ground_truths, num_classes: int | None = None) -> dict:
    """COCO summary of ``detections`` against ``ground_truths`` (as for ``voc_ap``).

    Returns ``map`` (AP@[.5:.95]), ``map_50``, ``map_75``, ``map_small``/``medium``/``large``,
    ``mar_1``, ``mar_10``, ``mar_100`` and ``mar_small``/``medium``/``large``; NaN where COCO
    reports -1 (nothing to evaluate). Needs the ``coco`` extra: ``pip install faster-coco-eval``.
    """
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as e:
        raise ImportError("coco_map needs faster-coco-eval, the optional 'coco' extra: "
                          "pip install 'fairdistill[coco]' (or pip install faster-coco-eval)") from e
    dets, gts, num_classes = parse_inputs(detections, ground_truths, num_classes)
    images, annotations, results = [], [], []
    for i, ((db, ds, dl), (gb, gl, gd)) in enumerate(zip(dets, gts)):
        images.append({"id": i, "width": 1, "height": 1})
        for b, c, d in zip(gb.tolist(), gl.tolist(), gd.tolist()):
            box = _xywh(b)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c), "bbox": box,
                                "area": box[2] * box[3], "iscrowd": int(d)})
        for b, s, c in zip(db.tolist(), ds.tolist(), dl.tolist()):
            results.append({"image_id": i, "category_id": int(c), "bbox": _xywh(b), "score": float(s)})
    gt = COCO({"images": images, "annotations": annotations,
               "categories": [{"id": c, "name": str(c)} for c in range(1, num_classes + 1)]})
    evaluator = COCOeval_faster(gt, gt.loadRes(results), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    return {k: (stats[j] if stats[j] >= 0 else NAN) for k, j in _STATS.items()}
