"""``reference-detector``: a small CenterNet-style detector on a timm ViT, trained here on ``synth-detection``.

The backbone is the CIFAR reference's ViT (timm ``VisionTransformer``: 56 px in 4 px patches =
14 x 14 = 196 patch tokens + a class token, width 192, 9 blocks), so every merge method of the
timm patch applies to it unchanged. The dense head reads the *whole* token grid after the last
block (with merging, ``unmerge=true`` restores that grid: ``encoders/merging/unmerge.py``):

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
import os
import time
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
            have the same width and depth.
        freeze_blocks: the patch embedding, position embedding, class token and the first N blocks
            keep their ``init`` weights (no gradient flows through them: CPU training costs about
            9 + 2 x 3 instead of 3 x 9 block passes per picture at depth 9 with N = 6).
        picture_size: side of the generated training pictures (``synth-detection``'s ``size``).
        epochs, steps_per_epoch, batch_size, lr, min_lr, weight_decay, warmup_epochs, grad_clip:
            AdamW, linear warmup then cosine to ``min_lr`` per step; every step draws
            ``batch_size`` fresh training pictures.
        size_weight, offset_weight: weights of the L1 losses on log sizes and centre offsets.
        eval_pictures: test pictures scored (mAP@0.5) after every epoch.
        max_detections: boxes kept per picture when decoding.
        seed: pictures, order and initialisation.
    """

    name: str = "reference-detector"
    img_size: int = 56
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 9
    num_heads: int = 3
    mlp_ratio: float = 4.0
    head_dim: int = 128
    num_classes: int = 10
    mean: Tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: Tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    init: str = "reference-cifar10-56"
    freeze_blocks: int = 6
    picture_size: int = 112
    epochs: int = 6
    steps_per_epoch: int = 120
    batch_size: int = 8
    lr: float = 3e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: int = 0
    grad_clip: float = 1.0
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
        lr=1e-3, eval_pictures=4),
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

        def grid_features(self, x):
            """[B, C, g, g]: the backbone's last-block tokens at every patch position."""
            tokens = self.backbone.forward_features(x)
            g = self.cfg.grid
            patches = tokens[:, self.backbone.num_prefix_tokens:]
            if patches.shape[1] != g * g:
                raise ConfigError(f"the detector's backbone returned {patches.shape[1]} patch tokens, the head needs "
                                  f"{g * g}: merge it with unmerge=true (e.g. --merge r=8,unmerge=true)")
            return patches.transpose(1, 2).reshape(x.shape[0], -1, g, g)

        def forward(self, x):
            y = self.out(torch.nn.functional.gelu(self.conv(self.grid_features(x))))
            return y[:, : self.cfg.num_classes], y[:, self.cfg.num_classes:]

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
    import torch

    path = detector_weights_path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"detector weights {path} are not present; train them with `cli.py train-reference --config "
            f"reference-detector --out runs/detector` and export with `cli.py train-reference --config "
            f"reference-detector --export runs/detector/last.pt`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt == EXPORT_FORMAT:
        cfg, state = DetectorConfig.from_dict(blob["config"]), blob["state_dict"]
    elif fmt == TRAIN_FORMAT:
        cfg, state = DetectorConfig.from_dict(blob["meta"]["config"]), blob["model"]
    else:
        raise WeightsUnavailableError(f"{path} is not a detector checkpoint (format={fmt!r})")
    model = build_detector(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval(), cfg


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
    scale = ds.images.shape[1] / cfg.img_size
    out: List[list] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                heat, box = model(pictures_to_tensor(ds.images[s:min(n, s + batch_size)], cfg))
                scores, cls, boxes = decode(heat, box, cfg)
                for sc, c, b in zip(scores.numpy(), cls.numpy(), boxes.numpy() * scale):
                    out.append([(int(ci), float(si), tuple(float(v) for v in bi)) for si, ci, bi in zip(sc, c, b)])
    finally:
        model.train(was_training)
    return out


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


# ------------------------------------------------------------------------------ training
def make_targets(boxes_list, labels_list, cfg: DetectorConfig, picture_size: int):
    """CenterNet targets on the g x g grid: heatmap [B, C, g, g] (a Gaussian peak of 1 at each
    object's centre cell, sigma = sqrt(w * h) / 6 cells, at least 0.5), box targets [B, 4, g, g]
    ((dx, dy) centre offset in the cell, (log w, log h) in cells) and their mask [B, g, g]."""
    import torch

    g = cfg.grid
    stride = picture_size / g
    b = len(boxes_list)
    heat = torch.zeros(b, cfg.num_classes, g, g)
    reg = torch.zeros(b, 4, g, g)
    mask = torch.zeros(b, g, g)
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    for i, (boxes, labels) in enumerate(zip(boxes_list, labels_list)):
        for (x0, y0, x1, y1), c in zip(np.asarray(boxes, dtype=np.float64), labels):
            cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
            w, h = (x1 - x0) / stride, (y1 - y0) / stride
            ix, iy = min(int(cx), g - 1), min(int(cy), g - 1)
            sigma = max(0.5, float(np.sqrt(w * h)) / 6)
            peak = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma ** 2))
            heat[i, int(c)] = torch.maximum(heat[i, int(c)], peak)
            reg[i, :, iy, ix] = torch.tensor([cx - ix, cy - iy, np.log(w), np.log(h)], dtype=torch.float32)
            mask[i, iy, ix] = 1.0
    return heat, reg, mask


def detection_loss(heat_logits, box, heat_t, reg_t, mask, cfg: DetectorConfig):
    """CenterNet's focal loss on the heatmaps (alpha 2, beta 4) + weighted L1 on offsets and log
    sizes at object centres, each divided by the number of objects; returns (total, parts)."""
    import torch
    import torch.nn.functional as F

    p = heat_logits.float().sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat_t.eq(1.0).float()
    num = pos.sum().clamp_min(1.0)
    pos_loss = (torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - p) * p ** 2 * (1 - heat_t) ** 4 * (1 - pos)).sum()
    focal = -(pos_loss + neg_loss) / num
    m = mask[:, None]
    l1 = F.l1_loss(box.float() * m, reg_t * m, reduction="none")
    offset = l1[:, :2].sum() / num
    size = l1[:, 2:].sum() / num
    total = focal + cfg.offset_weight * offset + cfg.size_weight * size
    return total, {"focal": float(focal.detach()), "offset": float(offset.detach()), "size": float(size.detach())}


def init_backbone(model, name: str) -> Dict[str, Any]:
    """Copy a classification reference's ViT weights (all but its head) into the detector's backbone."""
    from mergeseek.eval.reference import file_sha256, load_reference
    from mergeseek.eval.reference import _resolve_weights as reference_path

    ref, _ = load_reference(name, device="cpu")
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head")]:
        raise ConfigError(f"init={name}: its ViT does not fit the detector's backbone (missing {missing}, "
                          f"unexpected {unexpected}); use a reference of the same width, depth and grid")
    path = reference_path(name)
    return {"from": name, "weights_sha256": file_sha256(path)}


def train_detector(data: Path, out: Path, cfg: DetectorConfig, *, time_budget_s: Optional[float] = None,
                   fresh: bool = False, command: str = "", sources=None, spec=None, test=None):
    """Train (or resume from ``out/last.pt``) the detector; ``data`` is the folder holding
    ``cifar10/``, ``coco_captions/`` and ``imagenet_sample/`` (the ``synth-detection`` sources)."""
    import torch

    from mergeseek.eval.datasets.detection import DetectionSpec, cache_folder, load_sources, load_synth_detection, \
        picture
    from mergeseek.eval.train_reference import TrainResult, atomic_torch_save, atomic_write_json, lr_at, param_groups

    spec = spec or DetectionSpec(size=cfg.picture_size)
    if spec.size != cfg.picture_size:
        raise ConfigError(f"synth-detection size={spec.size} does not match the detector's picture_size="
                          f"{cfg.picture_size}")
    t0 = time.perf_counter()
    sources = sources or load_sources(data, spec)
    test = test if test is not None else load_synth_detection(cache_folder(None, data), data, "test", spec, sources)
    log.info("sources and test split ready in %.1fs (%d test pictures)", time.perf_counter() - t0, len(test))
    out = Path(out)
    model, opt, meta = _start(cfg, out / TRAIN_CHECKPOINT, fresh, data, spec, sources)
    out.mkdir(parents=True, exist_ok=True)
    meta["commands"].append(command)
    total = cfg.epochs * cfg.steps_per_epoch
    warm = cfg.warmup_epochs * cfg.steps_per_epoch
    log.info("%s: %d params, %d tokens, %d pictures/step, epochs %d..%d on cpu (%d threads)", cfg.name,
             meta["params"], cfg.num_tokens, cfg.batch_size, meta["epoch"] + 1, cfg.epochs, torch.get_num_threads())
    start = time.perf_counter()
    while meta["epoch"] < cfg.epochs:
        ep_start = time.perf_counter()
        epoch = meta["epoch"]
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        model.train()
        sums: Dict[str, float] = {"loss": 0.0, "focal": 0.0, "offset": 0.0, "size": 0.0}
        recent = 0.0
        lr = cfg.lr
        for i in range(cfg.steps_per_epoch):
            step = epoch * cfg.steps_per_epoch + i
            lr = lr_at(step, total, warm, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            pics = [picture(spec, sources, "train", step * cfg.batch_size + j) for j in range(cfg.batch_size)]
            x = pictures_to_tensor([p[0] for p in pics], cfg)
            heat_t, reg_t, mask = make_targets([p[1] for p in pics], [p[2] for p in pics], cfg, spec.size)
            heat, box = model(x)
            loss, parts = detection_loss(heat, box, heat_t, reg_t, mask, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sums["loss"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] += v
            recent += float(loss.detach())
            if (i + 1) % 20 == 0:
                log.info("epoch %d step %d/%d loss %.4f (last 20 steps) %.1f pictures/s", epoch + 1, i + 1,
                         cfg.steps_per_epoch, recent / 20,
                         (i + 1) * cfg.batch_size / (time.perf_counter() - ep_start))
                recent = 0.0
        train_s = time.perf_counter() - ep_start
        scores = evaluate_detector(model, cfg, test, limit=cfg.eval_pictures)
        record = {"epoch": epoch + 1, "lr": lr, "train_s": round(train_s, 1),
                  **{k: round(v / cfg.steps_per_epoch, 5) for k, v in sums.items()},
                  "map50_test": round(scores["map50"], 4), "map_test": round(scores["map"], 4),
                  "eval_pictures": scores["pictures"]}
        meta["history"].append(record)
        meta["epoch"], meta["train_wall_s"] = epoch + 1, meta["train_wall_s"] + train_s
        meta["map50_test"], meta["map_test"], meta["eval_pictures"] = scores["map50"], scores["map"], scores["pictures"]
        atomic_torch_save({"format": TRAIN_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "meta": meta}, out / TRAIN_CHECKPOINT)
        atomic_write_json(_manifest(meta), out / "manifest.json")
        log.info("epoch %d/%d loss %.4f mAP@0.5 %.4f mAP %.4f (%d test pictures) %.1fs", epoch + 1, cfg.epochs,
                 record["loss"], scores["map50"], scores["map"], scores["pictures"], train_s)
        if time_budget_s is not None and meta["epoch"] < cfg.epochs and (
                time.perf_counter() - start + train_s > time_budget_s):
            log.info("stopping after epoch %d: another epoch would pass the %.0fs budget; rerun to resume",
                     meta["epoch"], time_budget_s)
            break
    return TrainResult(checkpoint=out / TRAIN_CHECKPOINT, manifest=out / "manifest.json", start_epoch=0,
                       epochs_done=meta["epoch"], epochs_planned=cfg.epochs, complete=meta["epoch"] >= cfg.epochs,
                       top1_test=meta.get("map50_test"), top1_subset=meta.get("map50_test"),
                       history=list(meta["history"]), subset=f"mAP@0.5 on {meta.get('eval_pictures')} test pictures")


TRAIN_CHECKPOINT = "last.pt"


def _start(cfg: DetectorConfig, ckpt: Path, fresh: bool, data: Path, spec, sources):
    """Model, optimizer and run record: new (backbone from ``cfg.init``), or restored from ``ckpt``."""
    import torch

    from mergeseek.eval.train_reference import param_groups

    torch.manual_seed(cfg.seed)
    model = build_detector(cfg)
    freeze(model, cfg)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    if ckpt.is_file() and not fresh:
        blob = torch.load(ckpt, map_location="cpu", weights_only=True)
        if blob.get("format") != TRAIN_FORMAT:
            raise ConfigError(f"{ckpt} is not a detector training checkpoint; pass --fresh or another --out")
        theirs = {k: v for k, v in blob["meta"]["config"].items() if k != "epochs"}
        if theirs != {k: v for k, v in cfg.to_dict().items() if k != "epochs"}:
            raise ConfigError(f"{ckpt} was trained with another config; pass --fresh or another --out")
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        meta = blob["meta"]
        meta["config"] = cfg.to_dict()
        return model, opt, meta
    init = init_backbone(model, cfg.init) if cfg.init else None
    freeze(model, cfg)
    meta = {"config": cfg.to_dict(), "epoch": 0, "history": [], "commands": [], "train_wall_s": 0.0,
            "data": {"path": str(data), "spec": dataclasses.asdict(spec), "key": spec.key(sources)},
            "params": sum(p.numel() for p in model.parameters()), "init": init}
    return model, opt, meta


def freeze(model, cfg: DetectorConfig) -> None:
    """Stop gradients into the embeddings and the first ``cfg.freeze_blocks`` blocks."""
    bb = model.backbone
    frozen = [bb.patch_embed, *bb.blocks[: cfg.freeze_blocks]]
    for module in frozen:
        module.requires_grad_(False)
    if cfg.freeze_blocks > 0:
        for name in ("pos_embed", "cls_token"):
            if getattr(bb, name, None) is not None:
                getattr(bb, name).requires_grad_(False)


def _manifest(meta: Dict[str, Any]) -> Dict[str, Any]:
    import platform

    import timm
    import torch

    return {"format": "mergeseek-detector-reference-manifest/1", "name": meta["config"]["name"],
            "commands": meta["commands"], "data": meta["data"], "init": meta.get("init"), "epochs": meta["epoch"],
            "epochs_planned": meta["config"]["epochs"], "complete": meta["epoch"] >= meta["config"]["epochs"],
            "map50_test": meta.get("map50_test"), "map_test": meta.get("map_test"),
            "eval_pictures": meta.get("eval_pictures"),
            "metric": "COCO-style mAP (101-point), fp32 forward, first eval_pictures of the synth-detection test split",
            "num_tokens": DetectorConfig.from_dict(meta["config"]).num_tokens, "params": meta["params"],
            "train_wall_s": round(meta["train_wall_s"], 1),
            "device": f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
            "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__),
                         "python": platform.python_version()},
            "config": meta["config"], "history": meta["history"]}


def export_detector(checkpoint: Path, to: Path):
    """``<to>/<name>.pt`` (fp16 weights) and ``<to>/<name>.json`` (manifest) from a training checkpoint."""
    from mergeseek.eval.reference import file_sha256
    from mergeseek.eval.train_reference import ExportResult, atomic_write_json, export_fp16, read_training_checkpoint

    blob = read_training_checkpoint(checkpoint, TRAIN_FORMAT,
                                    "cli.py train-reference --config reference-detector --out runs/detector")
    meta = blob["meta"]
    cfg = DetectorConfig.from_dict(meta["config"])
    weights = export_fp16(blob["model"], to, cfg, EXPORT_FORMAT)
    manifest = _manifest(meta)
    manifest.update({"weights_file": weights.name, "weights_sha256": file_sha256(weights), "weights_dtype": "float16",
                     "exported_from": str(checkpoint)})
    atomic_write_json(manifest, Path(to) / f"{cfg.name}.json")
    return ExportResult(weights=weights, manifest=Path(to) / f"{cfg.name}.json", top1_subset=meta.get("map50_test"),
                        subset=f"mAP@0.5 on {meta.get('eval_pictures')} test pictures")


def run_detector(*, data: Optional[str], out: str, config: str, overrides: str = "", epochs: Optional[int] = None,
                 export: Optional[str] = None, to: str = "eval/reference", time_budget: Optional[float] = None,
                 fresh: bool = False, command: str = ""):
    """``cli.py train-reference --config reference-detector ...``: ``data`` is the folder holding the
    ``synth-detection`` sources (default: the data root); ``export`` writes fp16 weights to ``to``."""
    if export:
        return export_detector(Path(export), Path(to))
    if data is None:
        from mergeseek.eval.config import default_data_root

        data = str(default_data_root())
    cfg = DetectorConfig.parse(",".join(t for t in (config, overrides) if t))
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    return train_detector(Path(data), Path(out), cfg, time_budget_s=time_budget, fresh=fresh, command=command)
