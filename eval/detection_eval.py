"""The detector in ``cli.py eval``: ``--model reference-detector --dataset synth-detection``.

The merged part is the detector's ViT backbone (``ModelUnderTest.base``): every candidate is a
weight-sharing copy of it patched with the ``--merge`` config plus ``unmerge=true`` (the head reads
every grid position, :mod:`encoders.merging.unmerge`), so token counts, FLOP ratios and the timed
forward are the backbone's, as for the image references. Each batch of pictures is preprocessed
once and run through every candidate, then the shared head and decoding; the scores are COCO-style
mAP (:mod:`eval.detection_metrics`): ``map50`` (the primary metric), ``map`` (IoU .50:.95) and
``map50`` per object size (``small`` / ``medium`` / ``large``, :data:`eval.datasets.detection.SIZE_BUCKETS`).
``det_agree`` is the fraction of the unmerged model's detections (score >= 0.3) that the candidate
finds too (same class, IoU >= 0.5, score >= 0.3).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np

from mergeseek.eval.models import ModelUnderTest

log = logging.getLogger(__name__)

AGREE_SCORE = 0.3


@dataclass
class DetectorUnderTest(ModelUnderTest):
    """A detector: ``base`` is its backbone (what merging patches), ``detector`` the whole model."""

    detector: Any = field(default=None, repr=False)
    dcfg: Any = None

    def adapt_merges(self, merges: Sequence[Any]) -> list:
        """The configs the backbone runs: each with ``unmerge=true`` (the head needs the grid)."""
        return [m if not m.enabled or m.unmerge else dataclasses.replace(m, unmerge=True) for m in merges]


@dataclass(frozen=True)
class _PicturePreprocess:
    """PIL -> the detector's normalised input [3, S, S] (``detector_reference.pictures_to_tensor``)."""

    dcfg: Any

    def __call__(self, im):
        from mergeseek.eval.detector_reference import pictures_to_tensor

        return pictures_to_tensor([np.asarray(im.convert("RGB"), dtype=np.uint8)], self.dcfg)[0]


def load_detector_under_test(name: str, device: str, precision: str) -> DetectorUnderTest:
    """The trained detector, or random weights (reported as not meaningful) when they are absent."""
    from mergeseek.eval import detector_reference as dr

    if dr.detector_weights_path(name).is_file():
        model, cfg = dr.read_detector_weights(name)
        meaningful = True
    else:
        log.warning("detector weights for %s are not present: using random weights", name)
        cfg = dr.get_detector_config(name)
        model, meaningful = dr.build_detector(cfg).eval(), False
    model = model.to(device)
    return DetectorUnderTest(
        name=name, kind="detector", pretrained=name if meaningful else None, meaningful=meaningful,
        base=model.backbone, preprocess=_PicturePreprocess(cfg), device=device, precision=precision,
        label_space="cifar10", num_classes=cfg.num_classes, detector=model, dcfg=cfg)


def evaluate_detection(mut: DetectorUnderTest, cands: Dict[str, Any], ds, batch_size: int, progress: bool = False):
    """Every candidate backbone on ``ds`` (a ``DetectionSet``): mAP rows as a ``DatasetResult``."""
    import torch

    from mergeseek.eval.config import BASELINE
    from mergeseek.eval.detector_reference import decoded_lists, pictures_to_tensor, score_detections
    from mergeseek.eval.results import CandidateResult, DatasetResult

    if not isinstance(mut, DetectorUnderTest):
        return DatasetResult.skipped(ds, f"{mut.name} is not a detector; {ds.name} needs --model reference-detector")
    found: Dict[str, List[list]] = {k: [] for k in cands}
    starts = range(0, len(ds), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"{mut.name} {ds.name}", unit="batch")
    for s in starts:
        pixels = pictures_to_tensor(ds.images[s:s + batch_size], mut.dcfg).to(mut.device)
        for name, backbone in cands.items():
            with torch.inference_mode(), mut.autocast():
                heat, box = mut.detector(pixels, backbone=backbone)
            found[name] += decoded_lists(heat.float().cpu(), box.float().cpu(), mut.dcfg, ds.images.shape[1])
    rows = []
    for name, dets in found.items():
        scores = score_detections(dets, ds, mut.dcfg.num_classes)
        metrics = {k: scores[k] for k in ("map50", "map", "map50_small", "map50_medium", "map50_large")}
        rows.append(CandidateResult(config=name, metrics=metrics,
                                    agreement={"det_agree": detection_agreement(dets, found[BASELINE])}))
    sizes = ", ".join(f"{n} sqrt(area) {lo}-{hi if hi < 1 << 20 else 'up'} px" for n, lo, hi in _buckets())
    notes = (f"{int(ds.offsets[-1])} objects; mAP COCO-style (101-point); sizes: {sizes}",
             "the backbone runs with unmerge=true (the head reads every grid position); speed and FLOPs are the "
             "backbone's",
             f"det_agree: share of the unmerged model's detections (score >= {AGREE_SCORE}) found again "
             "(same class, IoU >= 0.5)")
    return DatasetResult(dataset=ds.name, kind="detection", source=ds.source, n_images=len(ds), n_queries=0,
                         n_classes=len(ds.classes), protocol="CenterNet head on the unmerged grid",
                         primary="map50", notes=notes, results=tuple(rows))


def _buckets():
    from mergeseek.eval.datasets.detection import SIZE_BUCKETS

    return SIZE_BUCKETS


def detection_agreement(dets: List[list], reference: List[list]) -> float:
    """Share of ``reference``'s confident detections that ``dets`` repeats (class, IoU >= 0.5)."""
    from mergeseek.eval.detection_metrics import box_iou

    hit = total = 0
    for mine, ref in zip(dets, reference):
        ref = [d for d in ref if d[1] >= AGREE_SCORE]
        mine = [d for d in mine if d[1] >= AGREE_SCORE]
        total += len(ref)
        for c, _, box in ref:
            same = [m[2] for m in mine if m[0] == c]
            hit += bool(same) and bool((box_iou(np.asarray(box)[None], np.asarray(same)) >= 0.5).any())
    return hit / total if total else float("nan")
