"""``Encoder``: an open_clip model (optionally token-merged) that turns images and texts into
L2-normalised float32 vectors.

Loading accepts an open_clip model name with a pretrained tag, a local checkpoint path, or
``None`` / ``"none"`` for random weights (asked for explicitly).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from mergeseek.encoders.config import MergeConfig
from mergeseek.errors import ConfigError, MissingDependencyError, WeightsUnavailableError
from mergeseek.runtime import autocast, resolve_device  # noqa: F401  (resolve_device: re-exported, eval.models uses it)

log = logging.getLogger(__name__)
_WARNED: dict = {}  # one-time warnings of this process

PRECISIONS = ("fp32", "fp16", "bf16")
ImageLike = Any  # PIL.Image.Image, HxWx3 uint8 numpy array, or an already preprocessed CHW tensor


def normalize_pretrained(pretrained: Optional[str]) -> Optional[str]:
    """``none``/empty -> None (random init); a path with a leading ``~`` expanded (a quoted one
    reaches us unexpanded); anything else (a tag, a path) unchanged."""
    if pretrained is None or str(pretrained).strip().lower() in ("", "none", "random"):
        return None
    return os.path.expanduser(str(pretrained)) if str(pretrained).startswith("~") else str(pretrained)


def load_open_clip(model_name: str, pretrained: Optional[str], device: str = "cpu", image_size: Optional[int] = None):
    """Create an open_clip model, its eval transform and tokenizer; raise one clear error offline.

    ``image_size`` overrides the model's input side (positional embeddings are interpolated when
    pretrained weights are loaded), e.g. ViT-B-16 at 448 px for high-resolution benchmarks.
    Attention modules are switched to ``encoders.cpu_attention``'s batch-first path, which
    only differs from the stock module under CPU half-precision autocast.
    """
    import open_clip

    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(
            f"model {model_name!r} is not an open_clip model; see `python -c \"import open_clip; "
            f"print(open_clip.list_models())\"` (e.g. ViT-B-32, ViT-B-16, ViT-L-14)"
        )
    pretrained = normalize_pretrained(pretrained)
    if pretrained is not None and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_path:
            raise WeightsUnavailableError(f"checkpoint file {pretrained!r} does not exist; pass an existing file to --pretrained")
        if pretrained not in tags:
            raise ConfigError(
                f"pretrained tag {pretrained!r} is unknown for {model_name}; valid tags: {', '.join(tags) or '(none)'}, "
                "a local checkpoint path, or none"
            )
    import torch

    try:
        # Random weights are drawn from a fixed seed (without touching the global RNG), so an index
        # built with random weights can be searched from another process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device, force_image_size=image_size
            )
    except (RuntimeError, OSError) as exc:
        hf = _hf_text_tower(model_name)
        if hf and "pip install transformers" in str(exc):
            raise MissingDependencyError(
                f"{model_name} has a Hugging Face text tower ({hf}): pip install transformers (its config and "
                f"tokenizer files must also be in the Hugging Face cache; see docs/AIC.md)") from None
        if hf and isinstance(exc, OSError):  # transformers could not fetch the tower's config (offline, no cache)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise WeightsUnavailableError(
                f"the text tower of {model_name} needs the Hugging Face files of {hf} ({first}); load them once "
                "online, or point HF_HOME at a cache that has them (see docs/AIC.md)") from None
        if isinstance(exc, OSError):
            raise
        if pretrained is not None and ("download" in str(exc).lower() or "hub" in str(exc).lower()):
            raise WeightsUnavailableError(
                f"weights {model_name}/{pretrained} cannot be downloaded here (offline?); download the checkpoint "
                f"elsewhere and pass its path with --pretrained /path/to/open_clip_model.safetensors, "
                f"or pass --pretrained none for random weights"
            ) from exc
        raise
    model.eval()
    # CPU half-precision autocast sends torch's MultiheadAttention down a ~10-20x slower path; this
    # switch computes that case batch-first and leaves every other call to the stock module.
    from mergeseek.encoders.cpu_attention import use_batch_first_attention

    use_batch_first_attention(model)
    return model, preprocess, LazyTokenizer(model_name)


def _hf_text_tower(model_name: str) -> str:
    """The Hugging Face model behind ``model_name``'s text tower (multilingual CLIPs such as
    ``xlm-roberta-base-ViT-B-32``, ``nllb-clip-base``), or "" for open_clip's own tower."""
    import open_clip

    cfg = open_clip.get_model_config(model_name) or {}
    return str((cfg.get("text_cfg") or {}).get("hf_model_name") or "")


class LazyTokenizer:
    """open_clip's tokenizer of ``model_name``, loaded at the first text.

    Image work (indexing, image queries) never needs it, and some models' tokenizers need the
    ``transformers`` package and files from the Hugging Face hub (SigLIP, MobileCLIP-2...): a
    machine without them can still index, and text search then fails with one line saying why.
    """

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._tok = None

    def load(self):
        if self._tok is None:
            import open_clip

            try:
                self._tok = open_clip.get_tokenizer(self.model_name)
            except ImportError as exc:
                pkg = exc.name or "transformers"
                raise MissingDependencyError(
                    f"the text tokenizer of {self.model_name} needs the Python package {pkg!r}, which is not installed: "
                    f"pip install {pkg} (indexing and image queries work without it; text queries do not)") from None
            except OSError as exc:  # transformers could not fetch the tokenizer files (offline, no cache)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise WeightsUnavailableError(
                    f"the text tokenizer of {self.model_name} cannot be loaded ({first}); it comes from the Hugging "
                    "Face hub: load it once online, or point HF_HOME at a cache that has it") from None
        return self._tok

    def __call__(self, texts, *args, **kwargs):
        return self.load()(texts, *args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("_") or name == "model_name":  # not loaded yet / being unpickled
            raise AttributeError(name)
        return getattr(self.load(), name)


@dataclass
class Encoder:
    """Batch image/text encoder over an open_clip CLIP model.

    Args:
        model_name: open_clip model name (``ViT-B-32``, ``ViT-B-16``, ...).
        pretrained: tag (``openai``, ``laion2b_s34b_b79k``), checkpoint path, or None for random init.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``fp16`` or ``bf16`` (autocast; fp16 on CPU falls back to bf16).
        merge: token-merging config (string or ``MergeConfig``); ``none`` leaves the model as shipped.
        batch_size: images/texts per forward pass.
        image_size: input side override (None: the model's own).
        compile: ``torch.compile`` the image tower (merged or not; CUDA graphs on CUDA), with
            every batch padded to ``batch_size`` so nothing recompiles (``encoders.compile``):
            True or ``"model"`` (one graph), ``"blocks"`` (each block alone; shorter compile).
        cuda_graph: on CUDA, replay the eager image tower as a CUDA graph (no compiler; captured
            at the first batch, batches padded to ``batch_size``; ``encoders.compile.GraphedTower``).
            Ignored off CUDA; not combined with ``compile`` (which already replays graphs).
    """

    model_name: str = "ViT-B-32"
    pretrained: Optional[str] = "openai"
    device: str = "auto"
    precision: str = "fp32"
    merge: Union[MergeConfig, str, None] = None
    batch_size: int = 32
    image_size_override: Optional[int] = None
    compile: Union[bool, str] = False
    cuda_graph: bool = False
    model: Any = field(default=None, repr=False)
    preprocess: Optional[Callable] = field(default=None, repr=False)
    tokenizer: Optional[Callable] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not valid; choose one of: {', '.join(PRECISIONS)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} is not valid; it must be >= 1")
        self.pretrained = normalize_pretrained(self.pretrained)
        self.merge = MergeConfig.parse(self.merge)
        self.device = resolve_device(self.device)
        if self.model is None:
            self.model, self.preprocess, self.tokenizer = load_open_clip(
                self.model_name, self.pretrained, self.device, self.image_size_override
            )
        if self.merge.enabled:
            from mergeseek.encoders.patch import apply_merging

            apply_merging(self.model, self.merge)
        self._tower = None
        from mergeseek.encoders.compile import compile_scope

        scope = compile_scope(self.compile)
        if scope is not None:
            from mergeseek.encoders.compile import CompiledTower

            self._tower = CompiledTower(self.model.visual, self.batch_size, self.device, scope=scope)
        elif self.cuda_graph and str(self.device).startswith("cuda"):
            from mergeseek.encoders.compile import GraphedTower

            self._tower = GraphedTower(self.model.visual, self.batch_size, self.device)

    @property
    def compile_s(self) -> Optional[float]:
        """Seconds the first (compiling) image batch took; None before it or without ``compile``."""
        return None if self._tower is None else self._tower.compile_s

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Width of the image embedding (towers without ``output_dim``, e.g. open_clip's timm
        towers such as ConvNeXt, are measured once with a blank image)."""
        out = getattr(self.model.visual, "output_dim", None)
        if out is not None:
            return int(out)
        if getattr(self, "_dim", None) is None:
            import torch

            with torch.inference_mode():
                blank = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
                self._dim = int(self.model.encode_image(blank).shape[-1])
        return self._dim

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def describe(self) -> dict:
        """What produced these vectors (stored in index manifests and eval reports)."""
        return {
            "model": self.model_name,
            "pretrained": self.pretrained or "none",
            "merge": str(self.merge),
            "dim": self.dim,
            "precision": self.precision,
        }

    # ------------------------------------------------------------------ encoding
    def preprocess_images(self, images: Sequence[ImageLike]):
        """Images (PIL, HxWx3 uint8 arrays or preprocessed CHW tensors) -> a [B,3,H,W] float tensor."""
        import torch
        from PIL import Image

        tensors = []
        for im in images:
            if isinstance(im, torch.Tensor):
                tensors.append(im)
                continue
            if isinstance(im, np.ndarray):
                im = Image.fromarray(im)
            tensors.append(self.preprocess(bounded_aspect(im.convert("RGB"), self.preprocess)))
        return torch.stack(tensors)

    def _autocast(self):
        return autocast(self.device, self.precision)

    def encode_image_tensor(self, pixels) -> "torch.Tensor":  # noqa: F821
        """One forward of the image tower on a preprocessed batch; returns normalised float32 [B, dim]."""
        import torch

        with torch.inference_mode(), self._autocast():
            pixels = pixels.to(self.device, non_blocking=True)
            feats = self._tower(pixels) if self._tower is not None else self.model.encode_image(pixels)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def stream(self, reuse) -> "ReuseEncoder":  # noqa: F821
        """This encoder's image tower over a stream of video frames that reuses work across the
        frames of a shot (``reuse``: a ``ReuseConfig`` or ``threshold=0.05,refresh=16``); see
        encoders/reuse/ and docs/REUSE.md."""
        from mergeseek.encoders.reuse import ReuseEncoder

        if str(self.device).startswith("cuda") and not _WARNED.get("reuse-cuda"):
            _WARNED["reuse-cuda"] = True
            log.warning("reuse across frames runs slower than per-frame encoding on a GPU (0.41x on an H200, static "
                        "clips, ViT-B-16 fp16; docs/BENCHMARKS.md): it pays on CPUs; leave --reuse off on CUDA")
        return ReuseEncoder(self, reuse)

    def encode_images(self, images: Sequence[ImageLike], progress: bool = False) -> np.ndarray:
        """Encode images in batches; returns float32 [n, dim], L2-normalised."""
        out = [np.zeros((0, self.dim), np.float32)]
        for chunk in _batches(images, self.batch_size, progress, "encode images"):
            out.append(self.encode_image_tensor(self.preprocess_images(chunk)).cpu().numpy())
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Encode texts in batches; returns float32 [n, dim], L2-normalised."""
        import torch

        from mergeseek.encoders.text import encode_text

        out = [np.zeros((0, self.dim), np.float32)]
        _warn_if_truncated(self.tokenizer, texts)
        for chunk in _batches(list(texts), self.batch_size, progress, "encode texts"):
            tokens = self.tokenizer(list(chunk)).to(self.device)
            with torch.inference_mode(), self._autocast():
                feats = encode_text(self.model, tokens)  # on the batch's real length where exact (encoders/text.py)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)


def _token_count(tokenizer: Callable, text: str) -> Optional[int]:
    """Tokens ``text`` takes in the text tower, start and end tokens included (None: unknown)."""
    try:
        if hasattr(tokenizer, "encode"):  # open_clip's SimpleTokenizer (the OpenAI BPE)
            return len(tokenizer.encode(text)) + 2
        hf = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        if hf is not None:
            return len(hf(text)["input_ids"])
    except Exception:  # a tokenizer without these methods: no warning rather than a failed search
        return None
    return None


def _warn_if_truncated(tokenizer: Callable, texts: Sequence[str]) -> None:
    """The tokenizer cuts texts at the context length silently; say so, once per text."""
    ctx = getattr(tokenizer, "context_length", None)
    if not ctx:
        return
    for i, text in enumerate(texts):
        n = _token_count(tokenizer, text)
        if n is not None and n > ctx:
            log.warning("text %d is %d tokens, longer than the text tower's context of %d: only its first %d "
                        "tokens are used (%r...); shorten it to keep the rest", i, n, ctx, ctx - 2, text[:60])


MAX_ASPECT = 4  # longest side / shortest side an image is resized with (see bounded_aspect)


def bounded_aspect(im, preprocess):
    """``im`` with its long side cut, around its centre, to ``MAX_ASPECT`` times its short side, when
    ``preprocess`` resizes the short side and then keeps the centre square (open_clip's default):
    the square it keeps is the same, but a 2 x 20,000 banner no longer becomes a 224 x 2,240,000
    intermediate (1.2 GB and seconds; a longer one would end the run out of memory). Any other
    preprocessing (e.g. squashing to a square) gets the image unchanged."""
    steps = list(getattr(preprocess, "transforms", ()))
    if len(steps) < 2 or type(steps[0]).__name__ != "Resize" or type(steps[1]).__name__ != "CenterCrop":
        return im
    size = steps[0].size
    if not (isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1)):
        return im  # a (h, w) resize squashes: the whole image is kept
    w, h = im.size
    short, long_ = min(w, h), max(w, h)
    if long_ <= MAX_ASPECT * short:
        return im
    keep = MAX_ASPECT * short
    cut = (long_ - keep) // 2
    return im.crop((cut, 0, cut + keep, h) if w > h else (0, cut, w, cut + keep))


def _batches(items: Sequence, size: int, progress: bool, desc: str) -> Iterable[Sequence]:
    starts = range(0, len(items), size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        yield items[s : s + size]
