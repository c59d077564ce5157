"""The models the evaluator compares, behind one small interface.

Three kinds, chosen by the ``--model`` string:

* an open_clip name (``ViT-B-32``; ``ViT-B-32@openai`` pins the pretrained tag): zero-shot CLIP;
  the image tower (``model.visual``) is what gets merged, the text tower is shared and unmerged.
* ``timm:<name>`` (``timm:vit_base_patch16_224``, ``timm:deit_small_patch16_224``): a timm
  classifier scored with its own head; weights from ``--pretrained /path/to/checkpoint``.
* ``reference-cifar10`` / ``reference-tiny`` or a reference checkpoint path: the small timm ViT
  trained on CIFAR-10 (:mod:`eval.reference`), scored with its own 10-way head.

The evaluator never builds model code itself: it loads through ``encoders`` / timm / the
reference module and only wraps forward passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from mergeseek.errors import ConfigError

log = logging.getLogger(__name__)

REFERENCE_NAMES = ("reference-cifar10", "reference-cifar10-56", "reference-tiny", "reference-speech", "reference-detector",
                   "reference-detector-tiny")


@dataclass
class ModelUnderTest:
    """One loaded, unmerged model plus what the evaluator needs to run and describe it.

    Args:
        name: the ``--model`` string (without ``@tag``).
        kind: ``clip`` (zero-shot, text tower) or ``classifier`` (own head).
        pretrained: weights tag or path; None for random weights.
        meaningful: True when the weights are trained, so accuracy numbers mean something.
        base: the module that gets merged (CLIP ``visual`` or the timm model), unmerged.
        preprocess: PIL image -> CHW float tensor.
        device: torch device string.
        precision: ``fp32``, ``fp16`` or ``bf16``.
        label_space: what a classifier's logits index (``imagenet1k``, ``cifar10``; ``""`` unknown).
        num_classes: classifier head size (0 for CLIP).
        clip: the whole open_clip model (for the text tower); None for classifiers.
        tokenizer: open_clip tokenizer; None for classifiers.
    """

    name: str
    kind: str
    pretrained: Optional[str]
    meaningful: bool
    base: Any
    preprocess: Callable
    device: str = "cpu"
    precision: str = "fp32"
    label_space: str = ""
    num_classes: int = 0
    clip: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ shape facts
    @property
    def family(self) -> str:
        return "open_clip" if self.kind == "clip" else "timm"

    @property
    def width(self) -> int:
        from mergeseek.encoders.patch import vit_shape

        return vit_shape(self.base)[0]

    @property
    def mlp_ratio(self) -> float:
        from mergeseek.encoders.patch import vit_shape

        return vit_shape(self.base)[1]

    def base_token_counts(self) -> list[int]:
        from mergeseek.encoders import token_counts

        return token_counts(self.base)

    def describe(self) -> dict:
        return {
            "model": self.name,
            "kind": self.kind,
            "pretrained": self.pretrained or "none",
            "weights_meaningful": self.meaningful,
            "width": self.width,
            "layers": len(self.base_token_counts()),
            "tokens": self.base_token_counts()[0],
            "mlp_ratio": self.mlp_ratio,
            "precision": self.precision,
            "device": self.device,
            "label_space": self.label_space,
        }

    # ------------------------------------------------------------------ forwards
    def autocast(self):
        from mergeseek.runtime import autocast

        return autocast(self.device, self.precision)

    def forward(self, module: Any, pixels) -> tuple[Any, Optional[Any]]:
        """One batch through ``module`` (the base or a merged copy).

        Returns (L2-normalised float32 embedding [B, D], logits [B, C] or None). For classifiers
        the embedding is the head's input (pre-logits), caught with a hook so the patched forward
        (size-weighted pooling) is the one that runs.
        """
        import torch

        with torch.inference_mode(), self.autocast():
            if self.kind == "clip":
                emb = module(pixels)
                logits = None
            else:
                caught = []
                handle = module.head.register_forward_hook(lambda _m, inp, _out: caught.append(inp[0]))
                try:
                    logits = module(pixels)
                finally:
                    handle.remove()
                emb = caught[0] if caught else logits
                logits = logits.float()
        return torch.nn.functional.normalize(emb.float(), dim=-1), logits

    def encode_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Normalised text embeddings from the (never merged) CLIP text tower."""
        import torch

        if self.clip is None:
            raise ConfigError(f"model {self.name} is a classifier and has no text tower; text queries need a CLIP model")
        out = []
        for s in range(0, max(1, len(texts)), batch_size):  # no text: one empty batch, for the width
            tokens = self.tokenizer(texts[s : s + batch_size] or [""]).to(self.device)
            with torch.inference_mode(), self.autocast():
                feats = self.clip.encode_text(tokens)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()[: len(texts)])
        return np.concatenate(out)


# ---------------------------------------------------------------------------- loading
def split_model_spec(spec: str, pretrained: Optional[str]) -> tuple[str, Optional[str]]:
    """``ViT-B-32@openai`` -> (``ViT-B-32``, ``openai``); without ``@`` the shared ``pretrained``."""
    name, sep, tag = spec.partition("@")
    return name.strip(), (tag.strip() if sep else pretrained)


def load_model(spec: str, pretrained: Optional[str], device: str = "cpu", precision: str = "fp32") -> ModelUnderTest:
    """Load one ``--model`` value (see module doc) unmerged."""
    from mergeseek.encoders.encoder import PRECISIONS, normalize_pretrained, resolve_device

    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not valid; choose one of: {', '.join(PRECISIONS)}")
    device = resolve_device(device)
    name, tag = split_model_spec(spec, pretrained)
    tag = normalize_pretrained(tag)
    if name in REFERENCE_NAMES or name.endswith((".pt", ".json")) or Path(name).is_dir():
        return _load_reference(name, device, precision)  # --pretrained does not apply
    if name.startswith("timm:"):
        return _load_timm(name[len("timm:"):], tag, device, precision)
    return _load_clip(name, tag, device, precision)


def _load_clip(name: str, tag: Optional[str], device: str, precision: str) -> ModelUnderTest:
    from mergeseek.encoders import load_open_clip

    model, preprocess, tokenizer = load_open_clip(name, tag, device)
    return ModelUnderTest(
        name=name, kind="clip", pretrained=tag, meaningful=tag is not None, base=model.visual,
        preprocess=preprocess, device=device, precision=precision, clip=model, tokenizer=tokenizer,
    )


def _load_timm(name: str, checkpoint: Optional[str], device: str, precision: str) -> ModelUnderTest:
    import timm
    from timm.data import create_transform, resolve_data_config

    from mergeseek.errors import WeightsUnavailableError

    if name not in timm.list_models():
        raise ConfigError(f"timm model {name!r} is unknown; see timm.list_models('vit_*') (e.g. vit_base_patch16_224, "
                          f"deit_small_patch16_224, vit_base_patch16_224.mae)")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise WeightsUnavailableError(
            f"timm checkpoint {checkpoint!r} is not a file; timm weights cannot be downloaded here, so download "
            f"them elsewhere and pass --pretrained /path/to/model.safetensors, or --pretrained none for random weights"
        )
    model = timm.create_model(name, pretrained=False, checkpoint_path=checkpoint or "")
    model.to(device).eval()
    cfg = resolve_data_config({}, model=model)
    n_cls = int(getattr(model, "num_classes", 0) or 0)
    return ModelUnderTest(
        name=f"timm:{name}", kind="classifier", pretrained=checkpoint, meaningful=checkpoint is not None,
        base=model, preprocess=create_transform(**cfg), device=device, precision=precision,
        label_space="imagenet1k" if n_cls == 1000 else "", num_classes=n_cls,
    )


def _load_reference(name: str, device: str, precision: str) -> ModelUnderTest:
    """The CIFAR-10 reference ViT with its trained weights; a registered name whose weights are
    absent falls back to random weights (reported as not meaningful)."""
    from mergeseek.eval import reference as ref
    from mergeseek.eval.speech_reference import is_speech_config

    if is_speech_config(name):
        return _load_speech(name, device, precision)
    if name.startswith("reference-detector"):  # the detector (eval/detection_eval.py): its backbone is merged
        from mergeseek.eval.detection_eval import load_detector_under_test

        return load_detector_under_test(name, device, precision)
    if name in REFERENCE_NAMES and not ref.reference_available(name):
        log.warning("reference weights for %s are not present: using random weights", name)
        model = ref.build_model(ref.get_config(name)).to(device).eval()
        info, meaningful = ref.preprocess_info_of(model), False
    else:
        model, info = ref.load_reference(name, device)
        meaningful = True
    return ModelUnderTest(
        name=name, kind="classifier", pretrained=name if meaningful else None, meaningful=meaningful, base=model,
        preprocess=_ReferencePreprocess(info), device=device, precision=precision,
        label_space="cifar10" if int(model.num_classes) == 10 else "", num_classes=int(model.num_classes),
    )


def _load_speech(name: str, device: str, precision: str) -> ModelUnderTest:
    """The speech reference (``eval.speech_reference``): spectrograms in, its own 20-way head."""
    from mergeseek.eval import speech_reference as sr

    if sr.speech_reference_available(name):
        model, cfg = sr.load_speech_reference(name, device)
        meaningful = True
    else:
        log.warning("reference weights for %s are not present: using random weights", name)
        cfg = sr.get_speech_config(name)
        model, meaningful = sr.build_speech_model(cfg).to(device).eval(), False
    return ModelUnderTest(
        name=name, kind="classifier", pretrained=name if meaningful else None, meaningful=meaningful, base=model,
        preprocess=sr.SpectrogramPreprocess.from_config(cfg), device=device, precision=precision,
        label_space="speech-words", num_classes=int(model.num_classes),
    )


@dataclass(frozen=True)
class _ReferencePreprocess:
    """PIL -> the reference's input through ``eval.reference.preprocess_uint8`` (so CIFAR images
    are scaled exactly as in training); non-square images are centre-cropped to a square first."""

    info: Any

    def __call__(self, im):
        from mergeseek.eval.reference import preprocess_uint8

        w, h = im.size
        if w != h:
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        arr = np.array(im.convert("RGB"), dtype=np.uint8)[None]  # writable copy for torch
        return preprocess_uint8(arr, self.info)[0]
