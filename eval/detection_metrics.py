"""COCO-style average precision of box detections, written here (no pycocotools offline).

Per class and IoU threshold: every detection of the class, over all images, is taken in order of
decreasing score (ties: the order given); each is matched greedily to the not-yet-matched ground
truth box of its image with the highest IoU, if that IoU is at least the threshold (a true
positive), else it is a false positive. Precision is made monotone (each precision is replaced by
the best precision at any higher recall) and read at the 101 recall points 0, 0.01, ..., 1 (the
precision at the first rank whose recall reaches the point; 0 past the last recall reached); AP
is their mean. mAP is the mean over the classes that have ground truth (a class without ground
truth is left out, as COCO does); a class with ground truth and no detection scores 0.

``mAP@0.5`` uses IoU 0.5; ``mAP@[.5:.95]`` averages the thresholds 0.50, 0.55, ..., 0.95.

Size ranges (``area_range``, COCO's small/medium/large): ground truth outside the range is
*ignored*: a detection matched to it counts neither way, and matching prefers boxes in range; a
detection that matches nothing and whose own box lies outside the range is ignored too.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of (x0, y0, x1, y1) boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def interpolated_ap(tp: np.ndarray, ignored: np.ndarray, num_gt: int) -> float:
    """AP from per-detection true-positive flags (in score order), 101-point interpolation."""
    keep = ~ignored
    tp = tp[keep].astype(np.float64)
    if num_gt == 0:
        return float("nan")
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp)
    cfp = np.cumsum(1.0 - tp)
    recall = ctp / num_gt
    precision = ctp / (ctp + cfp)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at any higher recall
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def _match_class(dets, gts, iou_thr: float, area_range: Optional[Tuple[float, float]]):
    """Greedy matching of one class over all images.

    ``dets``: list of (image, score, box) sorted by score; ``gts``: image -> boxes [k, 4].
    Returns (tp flags, ignored flags, number of ground truth boxes in range).
    """
    in_range = {}
    num_gt = 0
    for img, boxes in gts.items():
        flag = np.ones(len(boxes), bool) if area_range is None else _in_range(boxes, area_range)
        in_range[img] = flag
        num_gt += int(flag.sum())
    taken = {img: np.zeros(len(b), bool) for img, b in gts.items()}
    tp = np.zeros(len(dets), bool)
    ignored = np.zeros(len(dets), bool)
    for d, (img, _, box) in enumerate(dets):
        boxes = gts.get(img)
        best, best_ign = -1, True
        if boxes is not None and len(boxes):
            ious = box_iou(np.asarray(box)[None], boxes)[0]
            free = (~taken[img]) & (ious >= iou_thr)
            # the highest-IoU free box in range; only when there is none, the highest-IoU ignored one
            for pool, ign in ((free & in_range[img], False), (free & ~in_range[img], True)):
                if pool.any():
                    best, best_ign = int(np.argmax(np.where(pool, ious, -1.0))), ign
                    break
        if best >= 0:
            taken[img][best] = True
            tp[d] = not best_ign
            ignored[d] = best_ign
        elif area_range is not None:
            ignored[d] = not bool(_in_range(np.asarray(box)[None], area_range)[0])
    return tp, ignored, num_gt


def _in_range(boxes: np.ndarray, area_range: Tuple[float, float]) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (area >= area_range[0]) & (area < area_range[1])


def average_precision(detections: Sequence[Sequence[Tuple[int, float, Sequence[float]]]],
                      ground_truth: Sequence[Tuple[np.ndarray, np.ndarray]], num_classes: int,
                      iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                      area_range: Optional[Tuple[float, float]] = None) -> Dict[str, object]:
    """COCO-style AP.

    Args:
        detections: per image, ``(class, score, (x0, y0, x1, y1))`` tuples.
        ground_truth: per image, ``(boxes [k, 4], classes [k])``.
        num_classes: classes 0 .. num_classes - 1.
        iou_thresholds: the thresholds averaged for ``map`` (``map50`` is always IoU 0.5).
        area_range: (lo, hi) box area in pixels to score (others ignored), or None.

    Returns ``{"map50", "map", "per_class50": [AP@0.5 per class, nan without ground truth],
    "num_gt", "num_det"}``.
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truth)} of ground truth")
    by_class_det = {c: [] for c in range(num_classes)}
    by_class_gt = {c: {} for c in range(num_classes)}
    for img, dets in enumerate(detections):
        for c, score, box in dets:
            by_class_det[int(c)].append((img, float(score), tuple(float(v) for v in box)))
    for img, (boxes, classes) in enumerate(ground_truth):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        classes = np.asarray(classes).reshape(-1)
        for c in range(num_classes):
            sel = classes == c
            if sel.any():
                by_class_gt[c][img] = boxes[sel]
    thresholds = sorted(set(float(t) for t in iou_thresholds) | {0.5})
    ap = np.full((num_classes, len(thresholds)), np.nan)
    for c in range(num_classes):
        dets = sorted(by_class_det[c], key=lambda d: -d[1])  # stable: ties keep the given order
        for t, thr in enumerate(thresholds):
            tp, ign, num_gt = _match_class(dets, by_class_gt[c], thr, area_range)
            ap[c, t] = interpolated_ap(tp, ign, num_gt)
    col50 = thresholds.index(0.5)
    cols = [thresholds.index(float(t)) for t in iou_thresholds]
    have = ~np.isnan(ap[:, col50])
    return {
        "map50": float(np.mean(ap[have, col50])) if have.any() else float("nan"),
        "map": float(np.mean(ap[have][:, cols])) if have.any() else float("nan"),
        "per_class50": [float(v) for v in ap[:, col50]],
        "num_gt": int(sum(len(np.asarray(c).reshape(-1)) for _, c in ground_truth)),
        "num_det": int(sum(len(d) for d in detections)),
    }
