"""A small reference ViT trained on real CIFAR-10, so merge quality can be measured offline.

Pretrained CLIP weights cannot be downloaded here, and a random-weight model says nothing about
how much accuracy a merge costs. This module holds what the evaluator needs to use the trained
reference (architecture config, offline loading, CIFAR-10 reading, top-1); the training loop
lives in :mod:`eval.train_reference`.

The model is a plain timm ``VisionTransformer`` (class token, plain blocks, ``global_pool='token'``)
so every merge method in ``encoders`` applies to it unchanged::

    model, prep = load_reference("reference-cifar10")          # eval/reference/reference-cifar10.pt
    images, labels = load_cifar10_npz("$MERGESEEK_DATA/cifar10", "test", limit=1000)
    top1 = evaluate_reference(model, images, labels)             # fraction in [0, 1]

Only torch, timm, numpy and pillow are imported (inside functions), so the same code runs on a
training machine that has none of the retrieval dependencies. CIFAR-10 packs are read by
:mod:`eval.datasets.classification` (the one reader of the format).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import numpy as np

from mergeseek.errors import ConfigError, InputError, WeightsUnavailableError
from mergeseek.options import parse_options

log = logging.getLogger(__name__)

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
DEFAULT_REFERENCE = "reference-cifar10"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Channel statistics of the CIFAR-10 training set (the usual published values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
EXPORT_FORMAT = "mergeseek-reference/1"
TRAIN_FORMAT = "mergeseek-reference-train/1"


@dataclass(frozen=True)
class ReferenceConfig:
    """Every hyper-parameter of one reference model: architecture, input and training recipe.

    Args:
        name: registry name; also the stem of the exported files (``<name>.pt`` / ``.json``).
        source_size: side of the stored images (CIFAR is 32).
        img_size: side the images are resized to before the patch embedding; 48 with patch 4
            gives 144 patches + 1 class token = 145 tokens, enough for merging to matter.
        patch_size, embed_dim, depth, num_heads, mlp_ratio, num_classes: the timm ViT.
        drop_path_rate: stochastic depth at the last block (linearly increasing).
        mean, std: per-channel normalisation applied after resizing.
        epochs, batch_size, lr, min_lr, weight_decay, warmup_epochs: AdamW with linear warmup
            then cosine decay to ``min_lr``, stepped per batch (1e-3 at 1024 is DeiT's 5e-4 per 512).
        label_smoothing: cross-entropy label smoothing.
        crop_padding: zero padding (source pixels) before the random crop back to source size.
        hflip: random horizontal flips.
        jitter: strength of the per-image brightness / contrast / saturation jitter (0 = off).
        mix_prob: probability that a batch is mixed; ``mixup_alpha`` / ``cutmix_alpha`` are the
            Beta parameters, and when both are > 0 each mixed batch picks one at random.
        grad_clip: gradient-norm clip (0 = off).
        seed: seeds data order, augmentation and initialisation.
    """

    name: str = "reference-cifar10"
    source_size: int = 32
    img_size: int = 48
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 9
    num_heads: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 10
    drop_path_rate: float = 0.1
    mean: Tuple[float, float, float] = CIFAR10_MEAN
    std: Tuple[float, float, float] = CIFAR10_STD
    epochs: int = 200
    batch_size: int = 1024
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: int = 10
    label_smoothing: float = 0.1
    crop_padding: int = 4
    hflip: bool = True
    jitter: float = 0.2
    mix_prob: float = 0.8
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("source_size", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes",
                    "epochs", "batch_size")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"reference config {key}={getattr(self, key)} is not valid; it must be >= 1")
        if self.img_size % self.patch_size:
            raise ConfigError(f"reference config img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"reference config embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"reference config mean/std need 3 values each, got {self.mean} / {self.std}")
        for key in ("mix_prob", "label_smoothing", "drop_path_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"reference config {key}={getattr(self, key)} is not valid; give a value in [0, 1]")

    @property
    def num_tokens(self) -> int:
        """Tokens entering the first block: patches plus the class token."""
        return (self.img_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ReferenceConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"reference config has unknown keys {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def parse(cls, text: str) -> "ReferenceConfig":
        """``"reference-cifar10,epochs=100,lr=5e-4"``: a registered name then key=value overrides."""
        keys = sorted(f.name for f in dataclasses.fields(cls))
        parsed = parse_options(text, "reference config", keys, head="optional")
        return get_config(parsed.head or DEFAULT_REFERENCE)._replaced(parsed.pairs)

    def with_overrides(self, items) -> "ReferenceConfig":
        """Apply ``key=value`` strings (or one comma-separated string) on top of this config."""
        text = items if isinstance(items, str) else ",".join(items)
        keys = sorted(f.name for f in dataclasses.fields(self))
        return self._replaced(parse_options(text, "reference config", keys).pairs)

    def _replaced(self, pairs) -> "ReferenceConfig":
        changes: Dict[str, Any] = {key: _coerce(key, raw, getattr(self, key)) for key, raw in pairs}
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        base = CONFIGS.get(self.name)
        if base is None:
            return ",".join(f"{k}={_fmt(v)}" for k, v in self.to_dict().items())
        diffs = [f"{k}={_fmt(v)}" for k, v in self.to_dict().items() if v != base.to_dict()[k]]
        return ",".join([self.name] + diffs)





def _coerce(key: str, raw: str, current: Any) -> Any:
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("1", "true", "on", "yes", "0", "false", "off", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "on", "yes")
        if isinstance(current, tuple):
            return tuple(float(v) for v in raw.strip("[]").split(","))
        return type(current)(raw)
    except ValueError:
        raise ConfigError(f"reference config {key}={raw!r} is not valid; expected {type(current).__name__}") from None


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(repr(v) for v in value) + "]"
    return str(value)


CONFIGS: Dict[str, ReferenceConfig] = {
    # The committed reference: ~4M parameters, 145 tokens, trained on a GPU.
    "reference-cifar10": ReferenceConfig(),
    # The same ViT at 56 px (14 x 14 patches + class = 197 tokens, ViT-B/16's count), fine-tuned on CPU
    # from reference-cifar10's weights (--init; position embeddings resampled): the second model of
    # issue #26. A short recipe: few images, small batches, low learning rate, light mixing.
    "reference-cifar10-56": ReferenceConfig(
        name="reference-cifar10-56", img_size=56, epochs=1, batch_size=64, lr=1e-4, min_lr=1e-6, warmup_epochs=0,
        mix_prob=0.3, jitter=0.1,
    ),
    # A seconds-on-CPU model for tests and smoke runs (17 tokens); never a quality reference.
    "reference-tiny": ReferenceConfig(
        name="reference-tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        mlp_ratio=2.0, drop_path_rate=0.0, epochs=3, batch_size=32, lr=3e-3, min_lr=1e-4, weight_decay=0.0,
        warmup_epochs=0, label_smoothing=0.0, jitter=0.0, mix_prob=0.0,
    ),
}


def get_config(name: str) -> ReferenceConfig:
    if name not in CONFIGS:
        raise ConfigError(f"reference config {name!r} is unknown; choose one of: {', '.join(CONFIGS)}")
    return CONFIGS[name]


@dataclass(frozen=True)
class PreprocessInfo:
    """How uint8 HxWx3 images become model input: resize (bilinear) to ``input_size``, normalise."""

    input_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_config(cls, cfg: ReferenceConfig) -> "PreprocessInfo":
        return cls(input_size=cfg.img_size, mean=tuple(cfg.mean), std=tuple(cfg.std))


def build_model(cfg: ReferenceConfig):
    """A randomly initialised timm ``VisionTransformer`` for ``cfg`` (class token, token pooling)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes, global_pool="token",
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, class_token=True, drop_path_rate=cfg.drop_path_rate,
    )
    # timm's own convention for "how to feed this model"; evaluate_reference reads it back.
    model.pretrained_cfg = {
        "architecture": cfg.name, "input_size": (3, cfg.img_size, cfg.img_size), "mean": tuple(cfg.mean),
        "std": tuple(cfg.std), "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": cfg.num_classes,
    }
    return model


def preprocess_info_of(model) -> PreprocessInfo:
    pc = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" not in pc:
        raise InputError("model has no pretrained_cfg with input_size/mean/std; build it with "
                         "eval.reference.build_model or load it with load_reference, or pass preprocess=")
    return PreprocessInfo(input_size=int(pc["input_size"][-1]), mean=tuple(pc["mean"]), std=tuple(pc["std"]))


def preprocess_uint8(images, info: PreprocessInfo, device=None):
    """uint8 [N,H,W,3] (numpy or torch) -> normalised float32 [N,3,S,S] on ``device``.

    Training and evaluation both go through here (training adds crops and flips before the
    resize), so the two see identically scaled pixels.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"expected uint8 images shaped [N,H,W,3], got {tuple(x.shape)} {x.dtype}")
    x = x.to(device) if device is not None else x
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return normalize_resize(x, info)


def normalize_resize(x, info: PreprocessInfo):
    """float [N,3,H,W] in [0,1] -> resized to ``info.input_size`` and normalised."""
    import torch
    import torch.nn.functional as F

    if x.shape[-1] != info.input_size or x.shape[-2] != info.input_size:
        x = F.interpolate(x, size=(info.input_size, info.input_size), mode="bilinear", align_corners=False,
                          antialias=False)
    mean = torch.tensor(info.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def evaluate_reference(model, images_uint8, labels, batch_size: int = 256, preprocess: Optional[PreprocessInfo] = None,
                       autocast: bool = False) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` on uint8 [N,H,W,3] images.

    Runs on the model's device in eval mode (restoring train mode afterwards). ``autocast`` uses
    bf16 on CUDA (training-time checks); the recorded reference numbers are fp32.
    """
    import torch

    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(labels) != len(images_uint8):
        raise InputError(f"got {len(images_uint8)} images but {len(labels)} labels; pass one label per image")
    if len(labels) == 0:
        raise InputError("no images to evaluate; pass at least one image")
    info = preprocess or preprocess_info_of(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(labels), batch_size):
                x = preprocess_uint8(images_uint8[start:start + batch_size], info, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                    logits = model(x)
                pred = logits.argmax(dim=-1).cpu()
                correct += int((pred == labels[start:start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(labels)


# ---------------------------------------------------------------------------------- data
class Cifar10Split(NamedTuple):
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int64 [N]


def cifar10_npz_path(path: Union[str, Path], split: str) -> Path:
    """``path`` is the folder holding ``{train,test}_jpeg.npz`` or one of those files."""
    from mergeseek.eval.datasets.classification import cifar10_pack_path

    return cifar10_pack_path(Path(path), split)


def interleaved_order(labels: np.ndarray) -> np.ndarray:
    """Indices that deal the images out class by class: 1st of each class, then 2nd of each, ...

    The JPEG packs are sorted by class, so "the first N images" would be N airplanes; in this
    order every prefix is class-balanced (the first 1,000 test images are 100 per class). The
    rule lives in :func:`eval.datasets.base.interleaved_order` (``--limit`` subsets use it too).
    """
    from mergeseek.eval.datasets.base import interleaved_order as deal

    return deal(labels)


def load_cifar10_npz(path: Union[str, Path], split: str = "test", limit: Optional[int] = None) -> Cifar10Split:
    """Decode a CIFAR-10 JPEG pack into uint8 images [N,32,32,3] and int64 labels.

    Images come in class-interleaved order (see :func:`interleaved_order`), so ``limit=N`` gives
    a balanced, fixed subset. Only the images kept are decoded. The pack is read by
    :func:`eval.datasets.classification.load_cifar10_pack`, the one reader of the format.
    """
    from mergeseek.eval.datasets.classification import load_cifar10_pack

    p = cifar10_npz_path(path, split)
    pack = load_cifar10_pack(p)
    order = interleaved_order(pack.labels)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit={limit} is not valid; give a positive number of images or none")
        order = order[:limit]
    images = np.empty((len(order), 32, 32, 3), dtype=np.uint8)
    for out_i, i in enumerate(order):
        arr = np.asarray(pack.images.load(int(i)))
        if arr.shape != (32, 32, 3):
            raise InputError(f"{p}: image {i} is {arr.shape}, expected (32, 32, 3)")
        images[out_i] = arr
    return Cifar10Split(images, pack.labels[order])


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- loading
def _resolve_weights(name_or_path: Union[str, Path]) -> Path:
    p = Path(name_or_path)
    if p.is_dir():
        candidates = sorted(p.glob("*.pt"))
        preferred = p / f"{DEFAULT_REFERENCE}.pt"
        if preferred.is_file():
            return preferred
        if len(candidates) == 1:
            return candidates[0]
        raise WeightsUnavailableError(f"folder {p} holds {len(candidates)} .pt files; pass the file itself")
    if p.suffix == ".json" and p.is_file():
        weights = json.loads(p.read_text()).get("weights_file", p.with_suffix(".pt").name)
        return p.parent / weights
    if p.is_file():
        return p
    if str(name_or_path) in CONFIGS:
        return REFERENCE_DIR / f"{name_or_path}.pt"
    if p.suffix in (".pt", ".pth", ".json") or "/" in str(name_or_path):
        raise WeightsUnavailableError(f"reference checkpoint {str(name_or_path)!r} does not exist; pass an existing "
                                      f"file or a registered name ({', '.join(CONFIGS)})")
    raise ConfigError(f"reference model {str(name_or_path)!r} is unknown; choose one of: {', '.join(CONFIGS)} "
                      f"or pass a checkpoint path")


def init_from(model, name_or_path: Union[str, Path]) -> Dict[str, Any]:
    """Load another reference's weights into ``model`` (same width, depth and heads; the position
    embeddings are resampled to ``model``'s patch grid, as timm does for a new input size).
    Returns a record of the source (path, sha256, its config name) for the training manifest."""
    from timm.layers import resample_abs_pos_embed

    path = _resolve_weights(name_or_path)
    src, _ = load_reference(path)
    state = src.state_dict()
    grid = model.patch_embed.grid_size
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=model.num_prefix_tokens)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsUnavailableError(f"--init {path} does not fit this architecture (missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}); give a reference of the same width and depth")
    return {"path": str(path), "sha256": file_sha256(path), "name": src.pretrained_cfg.get("architecture")}


def reference_available(name_or_path: Union[str, Path] = DEFAULT_REFERENCE) -> bool:
    """True when the weights for ``name_or_path`` exist locally (no network is ever used)."""
    try:
        return _resolve_weights(name_or_path).is_file()
    except (ConfigError, WeightsUnavailableError):
        return False


def load_reference(name_or_path: Union[str, Path] = DEFAULT_REFERENCE, device: str = "cpu"):
    """Load a trained reference ViT offline -> ``(timm VisionTransformer in eval mode, PreprocessInfo)``.

    Accepts a registered name (weights in ``eval/reference/<name>.pt``), an exported ``.pt`` or its
    ``.json`` manifest, a folder, or a training checkpoint (``runs/ref/last.pt``). Weights are
    cast to float32 whatever their stored precision.
    """
    import torch

    path = _resolve_weights(name_or_path)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"reference weights {path} are not present; train them with `python -m mergeseek.eval.train_reference --data "
            f"$MERGESEEK_DATA/cifar10 --out runs/ref --device cuda` and export with `python -m mergeseek.eval.train_reference "
            f"--export runs/ref/last.pt --to eval/reference/`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and what to do
        raise WeightsUnavailableError(f"could not read reference checkpoint {path}: {exc}; re-export it") from exc
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt not in (EXPORT_FORMAT, TRAIN_FORMAT):
        raise WeightsUnavailableError(f"{path} is not a mergeseek reference checkpoint (format={fmt!r}); "
                                      f"expected {EXPORT_FORMAT} or {TRAIN_FORMAT}")
    if fmt == EXPORT_FORMAT:
        cfg, state = ReferenceConfig.from_dict(blob["config"]), blob["state_dict"]
    else:
        cfg, state = ReferenceConfig.from_dict(blob["meta"]["config"]), blob["model"]
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise WeightsUnavailableError(f"{path} does not match the {cfg.name} architecture under this timm version "
                                      f"(missing {missing[:5]}, unexpected {unexpected[:5]}); re-export it")
    model.to(device).eval()
    log.info("loaded reference %s from %s (%d tokens)", cfg.name, path, cfg.num_tokens)
    return model, PreprocessInfo.from_config(cfg)
