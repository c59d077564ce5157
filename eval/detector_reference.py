"""``reference-detector``: a small CenterNet-style detector on a timm ViT, trained here on ``synth-detection``.

The backbone is the CIFAR reference's ViT (timm ``VisionTransformer``, width 192, 9 blocks) on
the 112 px picture in 8 px patches = 14 x 14 = 196 patch tokens + a class token (the picture is
not shrunk; the reference's 4 px patch kernel is spread over 8 px when training starts), so every
merge method of the timm patch applies to it unchanged. The dense head reads the *whole* token
grid after the last block (with merging, ``unmerge=true`` restores that grid:
``encoders/merging/unmerge.py``):

    tokens [B, 196, 192] -> grid [B, 192, 14, 14] -> conv3x3 (192 -> 128) -> GELU
        -> conv1x1 -> 10 class heatmaps (sigmoid) + 4 box channels per cell:
           (dx, dy) the centre's offset inside the cell, (log w, log h) the box size in cells

Decoding keeps each heatmap cell that is the maximum of its 3 x 3 neighbourhood (CenterNet's
peak picking instead of NMS), the ``max_detections`` best scores over all classes and cells,
and turns each into a box in pixels of the caller's picture.

The contract every user of the detector shares (``cli.py index --detect``, the evaluation)::

    det = load_reference_detector()                     # eval/reference/reference-detector.pt
    det.labels                                          # the CIFAR-10 class names
    det.detect([pil_image, ...], min_score=0.3)         # per image: [(label, score, (x0, y0, x1, y1)), ...]

Training (``cli.py train-reference --config reference-detector --out runs/detector``) is the
loop below (:func:`train_detector`): pictures drawn fresh every step from the training half of
``synth-detection`` (:mod:`eval.datasets.detection`), CenterNet's focal loss on Gaussian heatmaps
plus L1 on offsets and log sizes at object centres, AdamW with warmup and cosine decay, a
checkpoint and manifest every epoch (a rerun with the same ``--out`` resumes), ``--export``
writes fp16 weights and a manifest to ``eval/reference/``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mergeseek.errors import ConfigError, InputError, WeightsUnavailableError
from mergeseek.options import parse_options

log = logging.getLogger(__name__)

EXPORT_FORMAT = "mergeseek-detector-reference/1"
TRAIN_FORMAT = "mergeseek-detector-reference-train/1"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
Detection = Tuple[str, float, Tuple[float, float, float, float]]


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture, input and recipe of the detector.

    Args:
        name: registry name and stem of the exported files.
        img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio: the timm ViT (class token;
            ``img_size / patch_size`` squared patch tokens, 196 by default).
        head_dim: channels of the head's 3 x 3 convolution.
        num_classes: heatmaps (the CIFAR-10 classes).
        mean, std: per-channel normalisation after the resize to ``img_size``.
        init: reference whose backbone weights start training (``""``: random); its blocks must
            have the same width, depth and grid; a patch side ``k`` times the reference's spreads
            its kernel (:func:`eval.detector_train.resample_patch_kernel`).
        freeze_blocks: the patch embedding, position embedding, class token and the first N blocks
            keep their ``init`` weights (no gradient flows through them: CPU training costs about
            9 + 2 x 3 instead of 3 x 9 block passes per picture at depth 9 with N = 6).
        picture_size: side of the generated training pictures (``synth-detection``'s ``size``).
        epochs, steps_per_epoch, batch_size, lr, min_lr, weight_decay, warmup_epochs, grad_clip:
            AdamW, linear warmup then cosine to ``min_lr`` per step; every step draws
            ``batch_size`` fresh training pictures.
        head_lr_scale: the head's learning rate is ``head_lr_scale`` times the backbone's (the head
            starts from random weights, the backbone from ``init``).
        size_weight, offset_weight: weights of the L1 losses on log sizes and centre offsets.
        eval_pictures: test pictures scored (mAP@0.5) after every epoch.
        max_detections: boxes kept per picture when decoding.
        seed: pictures, order and initialisation.
    """

    name: str = "reference-detector"
    img_size: int = 112
    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 9
    num_heads: int = 3
    mlp_ratio: float = 4.0
    head_dim: int = 128
    num_classes: int = 10
    mean: Tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: Tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    init: str = "reference-cifar10-56"
    freeze_blocks: int = 0
    picture_size: int = 112
    epochs: int = 15
    steps_per_epoch: int = 150
    batch_size: int = 16
    lr: float = 3e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    grad_clip: float = 1.0
    head_lr_scale: float = 5.0
    size_weight: float = 1.0
    offset_weight: float = 1.0
    eval_pictures: int = 100
    max_detections: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "head_dim", "num_classes", "epochs",
                    "steps_per_epoch", "batch_size", "picture_size", "max_detections"):
            if getattr(self, key) < 1:
                raise ConfigError(f"detector config {key}={getattr(self, key)} is not valid; it must be >= 1")
        if self.img_size % self.patch_size:
            raise ConfigError(f"detector config img_size={self.img_size} is not a multiple of "
                              f"patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"detector config embed_dim={self.embed_dim} is not divisible by "
                              f"num_heads={self.num_heads}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2 + 1

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DetectorConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"detector config has unknown keys {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def parse(cls, text: str) -> "DetectorConfig":
        """``"reference-detector,epochs=4"``: a registered name then key=value overrides."""
        keys = sorted(f.name for f in dataclasses.fields(cls))
        parsed = parse_options(text, "detector config", keys, head="optional")
        base = get_detector_config(parsed.head or "reference-detector")
        changes: Dict[str, Any] = {}
        for key, raw in parsed.pairs:
            current = getattr(base, key)
            try:
                changes[key] = (tuple(float(v) for v in raw.strip("[]").split(",")) if isinstance(current, tuple)
                                else type(current)(raw))
            except ValueError:
                raise ConfigError(f"detector config {key}={raw!r} is not valid; expected "
                                  f"{type(current).__name__}") from None
        return dataclasses.replace(base, **changes)


DETECTOR_CONFIGS: Dict[str, DetectorConfig] = {
    "reference-detector": DetectorConfig(),
    # seconds on CPU, for tests: 32 px in 8 px patches = 16 + 1 tokens, tiny width and depth, random init
    "reference-detector-tiny": DetectorConfig(
        name="reference-detector-tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        mlp_ratio=2.0, head_dim=16, init="", freeze_blocks=1, picture_size=64, epochs=2, steps_per_epoch=3, batch_size=4,
        lr=1e-3, warmup_epochs=0, eval_pictures=4),
}


def get_detector_config(name: str) -> DetectorConfig:
    if name not in DETECTOR_CONFIGS:
        raise ConfigError(f"detector reference {name!r} is unknown; choose one of: {', '.join(DETECTOR_CONFIGS)}")
    return DETECTOR_CONFIGS[name]


def is_detector_config(text: str) -> bool:
    """True when a ``--config`` / ``--model`` string names a detector reference."""
    return str(text).split(",")[0].strip() in DETECTOR_CONFIGS


# ------------------------------------------------------------------------------ the model
def _torch_module():
    import torch

    class CenterNetViT(torch.nn.Module):
        """timm ViT backbone + a CenterNet head on its patch-token grid.

        ``forward(x)`` -> (heatmap logits [B, classes, g, g], box channels [B, 4, g, g]).
        The backbone is ``self.backbone`` (patch *it* with ``apply_merging(..., "r=8,unmerge=true")``:
        the head needs every grid position back).
        """

        def __init__(self, cfg: DetectorConfig):
            super().__init__()
            from timm.models.vision_transformer import VisionTransformer

            self.cfg = cfg
            self.backbone = VisionTransformer(
                img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0, global_pool="token")
            self.conv = torch.nn.Conv2d(cfg.embed_dim, cfg.head_dim, 3, padding=1)
            self.out = torch.nn.Conv2d(cfg.head_dim, cfg.num_classes + 4, 1)
            with torch.no_grad():  # CenterNet's prior: every cell starts at p = 0.1 for every class
                self.out.bias[: cfg.num_classes].fill_(-2.19)
                self.out.bias[cfg.num_classes:].zero_()

        def head(self, tokens):
            """The backbone's output tokens [B, 1 + g * g, C] -> (heatmap logits, box channels)."""
            g = self.cfg.grid
            patches = tokens[:, self.backbone.num_prefix_tokens:]
            if patches.shape[1] != g * g:
                raise ConfigError(f"the detector's backbone returned {patches.shape[1]} patch tokens, the head needs "
                                  f"{g * g}: merge it with unmerge=true (e.g. --merge r=8,unmerge=true)")
            grid = patches.transpose(1, 2).reshape(tokens.shape[0], -1, g, g)
            y = self.out(torch.nn.functional.gelu(self.conv(grid)))
            return y[:, : self.cfg.num_classes], y[:, self.cfg.num_classes:]

        def forward(self, x, backbone=None):
            """``backbone``: another (merged) copy of the backbone over the same weights (the evaluator's)."""
            return self.head((backbone or self.backbone).forward_features(x))

    return CenterNetViT


def build_detector(cfg: DetectorConfig):
    """A randomly initialised detector (``cfg.init`` is applied by training, not here)."""
    model = _torch_module()(cfg)
    model.backbone.pretrained_cfg = {"architecture": cfg.name, "input_size": (3, cfg.img_size, cfg.img_size),
                                     "mean": cfg.mean, "std": cfg.std, "num_classes": 0}
    return model


def images_to_tensor(images: Sequence[Any], cfg: DetectorConfig):
    """PIL images (any size, any mode) -> normalised float [B, 3, S, S] and each image's (w, h)."""
    from PIL import Image

    for img in images:
        if not isinstance(img, Image.Image):
            raise InputError(f"detect() takes PIL images, got {type(img).__name__}")
    return pictures_to_tensor([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images], cfg), \
        [img.size for img in images]


def pictures_to_tensor(pictures: Sequence[np.ndarray], cfg: DetectorConfig):
    """uint8 [H, W, 3] arrays -> normalised float [B, 3, S, S], each resized (PIL bilinear) to the
    model's side: the one input path of training, evaluation and ``detect``."""
    import torch

    from PIL import Image

    if len(pictures) == 0:
        return torch.zeros(0, 3, cfg.img_size, cfg.img_size)
    s = cfg.img_size
    arrays = [p if p.shape[:2] == (s, s) else np.asarray(Image.fromarray(p).resize((s, s), Image.BILINEAR))
              for p in pictures]
    return normalize_uint8(torch.from_numpy(np.stack(arrays)), cfg)


def normalize_uint8(x, cfg: DetectorConfig):
    """uint8 [B, S, S, 3] at the model's size -> normalised float [B, 3, S, S]."""
    import torch

    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


def decode(heat_logits, boxes, cfg: DetectorConfig, max_detections: Optional[int] = None):
    """Heatmap peaks -> (scores [B, K], classes [B, K], boxes [B, K, 4] in model-input pixels).

    A cell counts when it is the maximum of its 3 x 3 neighbourhood in its class's heatmap;
    the K = ``max_detections`` best (class, cell) scores of each image are kept, sorted.
    """
    import torch
    import torch.nn.functional as F

    k = max_detections or cfg.max_detections
    heat = heat_logits.float().sigmoid()
    b, c, g, _ = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    k = min(k, c * g * g)
    scores, flat = peaks.reshape(b, -1).topk(k, dim=1)
    cls = flat // (g * g)
    cell = flat % (g * g)
    cy, cx = (cell // g).float(), (cell % g).float()
    reg = boxes.float().reshape(b, 4, g * g).gather(2, cell[:, None].expand(b, 4, k))
    stride = cfg.img_size / g
    px = (cx + reg[:, 0]) * stride
    py = (cy + reg[:, 1]) * stride
    w = reg[:, 2].clamp(-4, 4).exp() * stride
    h = reg[:, 3].clamp(-4, 4).exp() * stride
    out = torch.stack([px - w / 2, py - h / 2, px + w / 2, py + h / 2], dim=-1)
    return scores, cls, out.clamp(0, cfg.img_size)


class ReferenceDetector:
    """A loaded detector: ``labels`` and ``detect(images, min_score)`` (the shared contract).

    ``model`` is the :class:`CenterNetViT`; ``cfg`` its :class:`DetectorConfig`.
    """

    def __init__(self, model, cfg: DetectorConfig, device: str = "cpu", labels: Sequence[str] = CIFAR10_CLASSES):
        self.model = model.eval()
        self.cfg = cfg
        self.device = device
        self.labels: Tuple[str, ...] = tuple(labels)[: cfg.num_classes]

    def predict(self, x, min_score: float = 0.0):
        """Normalised [B, 3, S, S] -> per image a list of (class index, score, box in model pixels)."""
        import torch

        with torch.inference_mode():
            heat, box = self.model(x.to(self.device))
            scores, cls, boxes = decode(heat, box, self.cfg)
        out = []
        for s, c, bx in zip(scores.cpu().numpy(), cls.cpu().numpy(), boxes.cpu().numpy()):
            keep = s >= min_score
            out.append([(int(ci), float(si), tuple(float(v) for v in bi)) for si, ci, bi in zip(s[keep], c[keep],
                                                                                               bx[keep])])
        return out

    def detect(self, images: List[Any], min_score: float = 0.3) -> List[List[Detection]]:
        """Per image: ``(label, score, (x0, y0, x1, y1))`` in pixels of that image, best first."""
        if not 0.0 <= float(min_score) <= 1.0:
            raise ConfigError(f"min_score={min_score} is not valid; give a value in [0, 1]")
        if not images:
            return []
        x, sizes = images_to_tensor(images, self.cfg)
        found = self.predict(x, float(min_score))
        s = self.cfg.img_size
        return [[(self.labels[c], score, (b[0] * w / s, b[1] * h / s, b[2] * w / s, b[3] * h / s))
                 for c, score, b in dets] for dets, (w, h) in zip(found, sizes)]


# ------------------------------------------------------------------------------ loading
def detector_weights_path(weights: Union[str, Path, None] = None) -> Path:
    from mergeseek.eval.reference import REFERENCE_DIR

    if weights is None or str(weights) in DETECTOR_CONFIGS:
        return REFERENCE_DIR / f"{weights or 'reference-detector'}.pt"
    return Path(weights).expanduser()


def read_detector_weights(weights: Union[str, Path, None] = None):
    """-> (randomly built model with the weights loaded, DetectorConfig), from exported or training weights."""
    from mergeseek.eval.checkpoints import load_trained_model

    return load_trained_model(detector_weights_path(weights), DetectorConfig, build_detector,
                              (EXPORT_FORMAT, TRAIN_FORMAT), "detector", ("reference-detector", "runs/detector"))


def load_reference_detector(weights: Union[str, Path, None] = None, merge: Optional[str] = None,
                            device: str = "cpu") -> ReferenceDetector:
    """The committed detector (``eval/reference/reference-detector.pt``), or ``weights`` (a path or a
    registered name); ``merge`` a merge config for its backbone (``unmerge=true`` is added: the
    head needs the whole grid)."""
    model, cfg = read_detector_weights(weights)
    if merge:
        merge_backbone(model, merge)
    return ReferenceDetector(model.to(device), cfg, device)


def merge_backbone(model, merge: Optional[str]):
    """Patch the detector's backbone with ``merge`` (None / ``none``: unpatch); ``unmerge=true`` is
    implied, since the head reads every grid position."""
    from mergeseek.encoders.config import MergeConfig
    from mergeseek.encoders.patch import apply_merging

    cfg = MergeConfig.parse(merge)
    if cfg.enabled and not cfg.unmerge:
        cfg = dataclasses.replace(cfg, unmerge=True)
    apply_merging(model.backbone, cfg)
    return model


# ------------------------------------------------------------------------------ evaluation
def detect_set(model, cfg: DetectorConfig, ds, batch_size: int = 50, limit: Optional[int] = None):
    """Per picture of a ``DetectionSet``, ``(class, score, box)`` in the picture's pixels (no score floor)."""
    import torch

    n = len(ds) if limit is None else min(limit, len(ds))
    out: List[list] = []
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                heat, box = model(pictures_to_tensor(ds.images[s:min(n, s + batch_size)], cfg).to(dev))
                out += decoded_lists(heat.cpu(), box.cpu(), cfg, ds.images.shape[1])
    finally:
        model.train(was_training)
    return out


def decoded_lists(heat, box, cfg: DetectorConfig, picture_side: int) -> List[list]:
    """Head outputs -> per picture ``[(class, score, box in picture pixels), ...]`` (all kept peaks)."""
    scores, cls, boxes = decode(heat, box, cfg)
    scale = picture_side / cfg.img_size
    return [[(int(ci), float(si), tuple(float(v) for v in bi)) for si, ci, bi in zip(sc, c, b)]
            for sc, c, b in zip(scores.numpy(), cls.numpy(), boxes.numpy() * scale)]


def score_detections(detections, ds, num_classes: int) -> Dict[str, Any]:
    """mAP@0.5, mAP@[.5:.95] and mAP@0.5 per object size (``SIZE_BUCKETS``) of ``detections`` on ``ds``."""
    from mergeseek.eval.datasets.detection import SIZE_BUCKETS
    from mergeseek.eval.detection_metrics import average_precision

    gts = [ds.targets(i) for i in range(len(detections))]
    scores = average_precision(detections, gts, num_classes)
    out: Dict[str, Any] = {"map50": scores["map50"], "map": scores["map"], "per_class50": scores["per_class50"],
                           "objects": scores["num_gt"], "pictures": len(detections)}
    for name, lo, hi in SIZE_BUCKETS:
        sized = average_precision(detections, gts, num_classes, iou_thresholds=(0.5,),
                                  area_range=(float(lo) ** 2, float(hi) ** 2))
        out[f"map50_{name}"] = sized["map50"]
    return out


def evaluate_detector(model, cfg: DetectorConfig, ds, limit: Optional[int] = None) -> Dict[str, Any]:
    return score_detections(detect_set(model, cfg, ds, limit=limit), ds.limited(limit), cfg.num_classes)
