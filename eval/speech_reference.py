"""``reference-speech``: an AST-style ViT over log-mel patches, trained here on ``speech-words``.

The model is timm's ``VisionTransformer`` with ``in_chans=1`` and a rectangular
``img_size=(n_mels, frames)``: a 64 x 128 log-mel spectrogram in 8 x 8 patches gives 8 x 16 =
128 tokens, average-pooled (no class token, see ``global_pool``), so every merge method of the
timm patch applies unchanged (as AST does with 16 x 16 patches on 128 x 1024). Input scaling (:func:`scale`): each
clip's own mean log-mel is taken off (a gain change is a constant shift of log-mel; with the
global mean instead, the ViT sat at chance for 100-200 steps in two tries) and the result is
divided by a fixed ``std``.

Training (``cli.py train-reference --config reference-speech``) runs the loop of
:mod:`eval.train_reference`'s kind on CPU: AdamW with warmup and cosine decay, label smoothing,
SpecAugment-style frequency and time masks; a checkpoint and manifest every epoch, resumed by
a rerun with the same ``--out``; ``--export`` writes fp16 weights and a manifest to
``eval/reference/`` beside the image reference's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from mergeseek.errors import ConfigError, InputError, WeightsUnavailableError
from mergeseek.options import parse_options

log = logging.getLogger(__name__)

EXPORT_FORMAT = "mergeseek-speech-reference/1"
TRAIN_FORMAT = "mergeseek-speech-reference-train/1"

# The merge setting recommended for audio (docs/BENCHMARKS.md, "Audio: the speech reference and HF
# AST (issue #30)"): PiToMe's energy rule at r=16 takes 41% of the block FLOPs off this 128-token,
# 6-block reference (FLOP ratio 1.70x) and scored 0.02 pt below unmerged on the 9,600 held-out
# clips of ``speech-words,split=test-x20`` (ToMe's bipartite at the same r: 0.82 below). The hashed
# variant (no N x N similarity) scored 0.32 below unmerged.
RECOMMENDED_MERGE = "method=energy,r=16"
RECOMMENDED_MERGE_HASHED = "method=energy_lsh,r=16"


@dataclass(frozen=True)
class SpeechConfig:
    """Architecture, input and recipe of the speech reference.

    Args:
        name: registry name and stem of the exported files.
        n_mels, frames: the spectrogram (must match the ``speech-words`` spec).
        patch_size: square patches over (mel, frame); 8 -> 8 x 16 = 128 patches.
        embed_dim, depth, num_heads, mlp_ratio, num_classes, drop_path_rate: the timm ViT.
        mean: the training clips' mean log-mel (a record; :func:`scale` takes each clip's own mean off).
        std: the fixed divisor of the mean-free log-mel.
        epochs, batch_size, lr, min_lr, weight_decay, warmup_epochs, label_smoothing, grad_clip:
            AdamW, linear warmup then cosine to ``min_lr`` per step.
        freq_mask, time_mask: widest SpecAugment mask (bands / frames; 0 = off), one of each.
        global_pool: ``avg`` (no class token; size-weighted mean of the patch tokens when merged)
            or ``token`` (a class token). ``avg``: with a class token the ViT sat at chance for the
            first 100-200 steps in four CPU tries, longer than the CPU budget allows.
        seed: data order, augmentation and initialisation.
    """

    name: str = "reference-speech"
    n_mels: int = 64
    frames: int = 128
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 20
    drop_path_rate: float = 0.0
    mean: float = -5.0
    std: float = 3.0
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: int = 0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    freq_mask: int = 8
    time_mask: int = 16
    global_pool: str = "avg"
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("n_mels", "frames", "patch_size", "embed_dim", "depth", "num_heads", "num_classes", "epochs",
                    "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"speech config {key}={getattr(self, key)} is not valid; it must be >= 1")
        if self.n_mels % self.patch_size or self.frames % self.patch_size:
            raise ConfigError(f"speech config n_mels={self.n_mels} and frames={self.frames} must be multiples of "
                              f"patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"speech config embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")

    @property
    def num_tokens(self) -> int:
        return (self.n_mels // self.patch_size) * (self.frames // self.patch_size) + (self.global_pool == "token")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SpeechConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"speech config has unknown keys {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**data)

    @classmethod
    def parse(cls, text: str) -> "SpeechConfig":
        """``"reference-speech,epochs=10"``: a registered name then key=value overrides."""
        keys = sorted(f.name for f in dataclasses.fields(cls))
        parsed = parse_options(text, "speech config", keys, head="optional")
        base = get_speech_config(parsed.head or "reference-speech")
        changes = {}
        for key, raw in parsed.pairs:
            try:
                changes[key] = type(getattr(base, key))(raw)
            except ValueError:
                raise ConfigError(f"speech config {key}={raw!r} is not valid; expected "
                                  f"{type(getattr(base, key)).__name__}") from None
        return dataclasses.replace(base, **changes)


SPEECH_CONFIGS: Dict[str, SpeechConfig] = {
    "reference-speech": SpeechConfig(),
    # seconds on CPU, for tests: 16 mel x 32 frames in 4 x 4 patches = 32 tokens, tiny width and depth
    "reference-speech-tiny": SpeechConfig(name="reference-speech-tiny", n_mels=16, frames=32, patch_size=4,
                                          embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3,
                                          drop_path_rate=0.0, epochs=2, batch_size=8, warmup_epochs=0),
}


def get_speech_config(name: str) -> SpeechConfig:
    if name not in SPEECH_CONFIGS:
        raise ConfigError(f"speech reference {name!r} is unknown; choose one of: {', '.join(SPEECH_CONFIGS)}")
    return SPEECH_CONFIGS[name]


def is_speech_config(text: str) -> bool:
    """True when a ``--config`` / ``--model`` string names a speech reference."""
    return str(text).split(",")[0].strip() in SPEECH_CONFIGS


def scale(x, cfg: SpeechConfig):
    """log-mel [..., F, T] -> model input: each clip's own mean removed (a gain change is a
    constant shift of log-mel), then divided by the fixed ``cfg.std``."""
    return (x - x.mean(dim=(-2, -1), keepdim=True)) / cfg.std


def build_speech_model(cfg: SpeechConfig):
    """A randomly initialised timm ``VisionTransformer`` over [B, 1, n_mels, frames] spectrograms."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=(cfg.n_mels, cfg.frames), patch_size=cfg.patch_size, in_chans=1, num_classes=cfg.num_classes,
        global_pool=cfg.global_pool, class_token=cfg.global_pool == "token", fc_norm=cfg.global_pool == "avg",
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path_rate=cfg.drop_path_rate,
    )
    model.pretrained_cfg = {"architecture": cfg.name, "input_size": (1, cfg.n_mels, cfg.frames), "mean": (cfg.mean,),
                            "std": (cfg.std,), "num_classes": cfg.num_classes}
    return model


@dataclass(frozen=True)
class SpectrogramPreprocess:
    """float log-mel [1, F, T] (or [F, T]) -> the model's scaled input [1, F, T] (as :func:`scale`)."""

    mean: float
    std: float
    n_mels: int
    frames: int

    def __call__(self, spec):
        import torch

        x = torch.as_tensor(spec, dtype=torch.float32)
        x = x[None] if x.ndim == 2 else x
        if tuple(x.shape) != (1, self.n_mels, self.frames):
            raise InputError(f"spectrogram is {tuple(x.shape)}, the speech reference takes (1, {self.n_mels}, "
                             f"{self.frames}); generate it with eval.datasets.speech (same n_mels and frames)")
        return scale(x, self)

    @classmethod
    def from_config(cls, cfg: SpeechConfig) -> "SpectrogramPreprocess":
        return cls(cfg.mean, cfg.std, cfg.n_mels, cfg.frames)


def evaluate_speech(model, features: np.ndarray, labels: np.ndarray, cfg: SpeechConfig, batch_size: int = 256) -> float:
    """Top-1 (a fraction in [0, 1]) of ``model`` on float16/32 log-mel [N, F, T]."""
    import torch

    if len(features) != len(labels) or len(labels) == 0:
        raise InputError(f"got {len(features)} spectrograms and {len(labels)} labels; pass one label each, at least one")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for s in range(0, len(labels), batch_size):
                x = scale(torch.from_numpy(features[s:s + batch_size].astype(np.float32))[:, None], cfg).to(dev)
                correct += int((model(x).argmax(-1).cpu().numpy() == labels[s:s + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(labels)


# ------------------------------------------------------------------------------ loading
def speech_weights_path(name_or_path: Union[str, Path]) -> Path:
    from mergeseek.eval.reference import REFERENCE_DIR

    if str(name_or_path) in SPEECH_CONFIGS:
        return REFERENCE_DIR / f"{name_or_path}.pt"
    return Path(name_or_path)


def speech_reference_available(name: str = "reference-speech") -> bool:
    return speech_weights_path(name).is_file()


def load_speech_reference(name_or_path: Union[str, Path] = "reference-speech", device: str = "cpu"):
    """-> (timm VisionTransformer in eval mode, SpeechConfig), from exported or training weights."""
    from mergeseek.eval.checkpoints import load_trained_model

    model, cfg = load_trained_model(speech_weights_path(name_or_path), SpeechConfig, build_speech_model,
                                    (EXPORT_FORMAT, TRAIN_FORMAT), "speech reference",
                                    ("reference-speech", "runs/speech"))
    return model.to(device), cfg


# ------------------------------------------------------------------------------ training
def spec_augment(x, cfg: SpeechConfig, gen):
    """One frequency mask and one time mask per example (width uniform in [0, max]), set to 0
    (the scaled input's mean)."""
    import torch

    b, _, f, t = x.shape
    out = x.clone()
    for size, axis, limit in ((cfg.freq_mask, 2, f), (cfg.time_mask, 3, t)):
        if size <= 0:
            continue
        width = torch.randint(0, size + 1, (b,), generator=gen)
        start = (torch.rand(b, generator=gen) * (limit - width + 1)).long()
        pos = torch.arange(limit)
        mask = (pos[None] >= start[:, None]) & (pos[None] < (start + width)[:, None])  # [b, limit]
        shape = (b, 1, limit, 1) if axis == 2 else (b, 1, 1, limit)
        out = out.masked_fill(mask.view(shape), 0.0)
    return out


def train_speech(data: Path, out: Path, cfg: SpeechConfig, *, time_budget_s: Optional[float] = None,
                 eval_limit: Optional[int] = None, command: str = "", fresh: bool = False, spec=None,
                 device: str = "auto"):
    """Train (or resume from ``out/last.pt``) the speech reference on the ``speech-words`` cache under
    ``data``. ``device``: auto (CUDA when present), cpu, cuda or cuda:N; batches are drawn and
    masked on the CPU (the same on every device), the model steps on ``device``."""
    import torch

    from mergeseek.eval.datasets.speech import SpeechWordsSpec, load_split
    from mergeseek.eval.checkpoints import device_label
    from mergeseek.eval.train_reference import TrainResult, atomic_torch_save, atomic_write_json, resolve_device

    spec = spec or SpeechWordsSpec()
    train, test = load_split(data, "train", spec), load_split(data, "test", spec)
    if train.features.shape[1:] != (cfg.n_mels, cfg.frames) or len(spec.words) != cfg.num_classes:
        raise ConfigError(f"speech-words features {train.features.shape[1:]} / {len(spec.words)} words do not fit "
                          f"{cfg.name} ({cfg.n_mels}, {cfg.frames}) / {cfg.num_classes} classes")
    test_x, test_y = test.features[:eval_limit], test.labels[:eval_limit]
    dev = resolve_device(device)
    model, opt, meta = _start(cfg, out / "last.pt", fresh, data, spec, len(train.labels), len(test.labels), dev)
    out.mkdir(parents=True, exist_ok=True)
    meta["commands"].append(command)
    meta["device"] = device_label(dev)
    log.info("%s: %d params, %d tokens, %d train / %d test clips, epochs %d..%d on %s", cfg.name,
             meta["params"], cfg.num_tokens, len(train.labels), len(test_y), meta["epoch"] + 1, cfg.epochs,
             meta["device"])
    start = time.perf_counter()
    while meta["epoch"] < cfg.epochs:
        t0 = time.perf_counter()
        record = _epoch(model, opt, cfg, meta["epoch"], torch.from_numpy(train.features), torch.from_numpy(train.labels))
        record["top1_test"] = top1 = evaluate_speech(model, test_x, test_y, cfg)
        record["train_s"] = train_s = round(time.perf_counter() - t0, 2)
        meta["history"].append(record)
        meta["epoch"], meta["train_wall_s"] = meta["epoch"] + 1, meta["train_wall_s"] + train_s
        meta["top1_test"], meta["test_clips"] = top1, len(test_y)
        atomic_torch_save({"format": TRAIN_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "meta": meta}, out / "last.pt")
        atomic_write_json(_describe_run(meta)[0], out / "manifest.json")
        log.info("epoch %d/%d loss %.4f top1 %.4f (%d clips) %.1fs", meta["epoch"], cfg.epochs, record["loss"], top1,
                 len(test_y), train_s)
        if time_budget_s is not None and meta["epoch"] < cfg.epochs and (
                time.perf_counter() - start + train_s > time_budget_s):
            log.info("stopping after epoch %d: another epoch would pass the %.0fs budget; rerun to resume",
                     meta["epoch"], time_budget_s)
            break
    top1 = meta.get("top1_test")
    return TrainResult(checkpoint=out / "last.pt", manifest=out / "manifest.json", start_epoch=0,
                       epochs_done=meta["epoch"], epochs_planned=cfg.epochs, complete=meta["epoch"] >= cfg.epochs,
                       top1_test=top1, top1_subset=top1, history=list(meta["history"]),
                       subset="the whole test split")


def _start(cfg: SpeechConfig, ckpt: Path, fresh: bool, data: Path, spec, n_train: int, n_test: int, dev=None):
    """Model (on ``dev``, default the CPU), optimizer and run record: new, or restored from ``ckpt``
    (which must share ``cfg``; saved on any device)."""
    import torch

    from mergeseek.eval.train_reference import param_groups

    torch.manual_seed(cfg.seed)
    model = build_speech_model(cfg)
    if dev is not None:
        model.to(dev)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    if ckpt.is_file() and not fresh:
        from mergeseek.eval.checkpoints import resume_training

        return model, opt, resume_training(ckpt, TRAIN_FORMAT, cfg, model, opt, "speech reference")
    meta = {"config": cfg.to_dict(), "epoch": 0, "history": [], "commands": [], "train_wall_s": 0.0,
            "data": {"path": str(data), "key": spec.key(), "train_clips": n_train, "test_clips": n_test,
                     "spec": dataclasses.asdict(spec)},
            "params": sum(p.numel() for p in model.parameters())}
    return model, opt, meta


def _epoch(model, opt, cfg: SpeechConfig, epoch: int, x_all, y_all) -> Dict[str, Any]:
    """One pass over the training clips; everything random derives from (seed, epoch)."""
    import torch
    import torch.nn.functional as F

    from mergeseek.eval.train_reference import lr_at

    gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # drop-path
    n = len(y_all)
    bs = min(cfg.batch_size, n)
    steps = n // bs
    order = torch.randperm(n, generator=gen)
    dev = next(model.parameters()).device
    model.train()
    loss_sum, lr, recent = 0.0, cfg.lr, 0.0
    for i in range(steps):
        lr = lr_at(epoch * steps + i, cfg.epochs * steps, cfg.warmup_epochs * steps, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = order[i * bs:(i + 1) * bs]
        x = spec_augment(scale(x_all[idx].float()[:, None], cfg), cfg, gen).to(dev)
        loss = F.cross_entropy(model(x), y_all[idx].to(dev), label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_sum, recent = loss_sum + loss.item(), recent + loss.item()
        if (i + 1) % 25 == 0:
            log.info("epoch %d step %d/%d loss %.4f (last 25 steps)", epoch + 1, i + 1, steps, recent / 25)
            recent = 0.0
    return {"epoch": epoch + 1, "loss": round(loss_sum / steps, 5), "lr": lr}


def _describe_run(meta: Dict[str, Any]) -> tuple[Dict[str, Any], str]:
    """The exported manifest of a speech run and what its score was measured on."""
    from mergeseek.eval.checkpoints import run_manifest

    manifest = {"format": "mergeseek-speech-reference-manifest/1",
                **run_manifest(meta, SpeechConfig.from_dict(meta["config"]).num_tokens),
                "top1_test": meta.get("top1_test"), "test_clips": meta.get("test_clips"),
                "top1_precision": "fraction in [0, 1], fp32 forward, whole test split"}
    return manifest, "the whole test split"


def export_speech(checkpoint: Path, to: Path):
    """``<to>/<name>.pt`` (fp16 weights) and ``<to>/<name>.json`` (manifest) from a training checkpoint."""
    from mergeseek.eval.checkpoints import export_trained

    return export_trained(checkpoint, to, SpeechConfig, (EXPORT_FORMAT, TRAIN_FORMAT),
                          ("reference-speech", "runs/speech"), _describe_run, "top1_test")


def run_speech(*, data: Optional[str], out: str, config: str, overrides: str = "", epochs: Optional[int] = None,
               export: Optional[str] = None, to: str = "eval/reference", time_budget: Optional[float] = None,
               eval_limit: Optional[int] = None, fresh: bool = False, command: str = "", device: str = "auto"):
    """``cli.py train-reference --config reference-speech ...``: ``data`` is the ``speech_words``
    folder (default: under the data root); ``export`` writes fp16 weights to ``to``; ``device``:
    auto (CUDA when present), cpu, cuda or cuda:N."""
    if export:
        return export_speech(Path(export), Path(to))
    from mergeseek.eval.train_reference import resolve_device

    resolve_device(device)  # a device that is not there is refused before any data is read
    if data is None:
        from mergeseek.eval.config import default_data_root

        data = str(default_data_root() / "speech_words")
    text = ",".join(t for t in (config, overrides) if t)
    cfg = SpeechConfig.parse(text)
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    return train_speech(Path(data), Path(out), cfg, time_budget_s=time_budget, eval_limit=eval_limit,
                        command=command, fresh=fresh, device=device)
