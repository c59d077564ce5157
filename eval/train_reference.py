"""Train, resume and export the CIFAR-10 reference ViT (see :mod:`eval.reference`).

Runs on a bare GPU box with the core dependencies (torch, timm, numpy, pillow, typer; tqdm optional)::

    mergeseek train-reference --data $MERGESEEK_DATA/cifar10 --out runs/ref --device cuda
    mergeseek train-reference --export runs/ref/last.pt --to eval/reference/

(``python -m mergeseek.eval.train_reference ...`` is the same command; the options live in ``cli.py``.)

The whole training set is decoded once into a uint8 tensor on the device; crops, flips, colour
jitter, mixup/cutmix and the resize to the model's input size are batched tensor ops, so the
loop never touches PIL. Every epoch ends with an atomic checkpoint (``last.pt``) and a
``manifest.json``; a rerun with the same ``--out`` continues from the last finished epoch, and
per-epoch seeding makes a resumed run follow the same data order and augmentation as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from mergeseek.errors import ConfigError, WeightsUnavailableError
from mergeseek.eval.checkpoints import export_fp16, read_training_checkpoint
from mergeseek.eval.reference import (
    EXPORT_FORMAT, TRAIN_FORMAT, PreprocessInfo, ReferenceConfig, build_model, cifar10_npz_path, evaluate_reference,
    file_sha256, load_cifar10_npz, load_reference, normalize_resize,
)

log = logging.getLogger(__name__)

SUBSET_SIZE = 1000
SUBSET_DEFINITION = "first 1000 test images in class-interleaved order (100 per class)"
CHECKPOINT_NAME = "last.pt"


@dataclass
class TrainResult:
    checkpoint: Path
    manifest: Path
    start_epoch: int
    epochs_done: int
    epochs_planned: int
    complete: bool
    top1_test: Optional[float]
    top1_subset: Optional[float]
    history: List[Dict[str, Any]] = field(default_factory=list)
    subset: str = "the fixed 1000"  # what top1_subset was scored on


@dataclass
class ExportResult:
    weights: Path
    manifest: Path
    top1_subset: Optional[float]
    subset: str = "the fixed 1000"  # what top1_subset was scored on


# ------------------------------------------------------------------------------- helpers
def resolve_device(device: str):
    """``runtime.resolve_device`` as a ``torch.device``."""
    import torch

    from mergeseek.runtime import resolve_device as resolve

    return torch.device(resolve(device))


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    from mergeseek.runtime import atomic_write

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(data: Dict[str, Any], path: Path) -> None:
    from mergeseek.runtime import atomic_write

    atomic_write(path, json.dumps(data, indent=2) + "\n")


def lr_at(step: int, total_steps: int, warmup_steps: int, cfg: ReferenceConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to ``cfg.min_lr`` (per optimizer step)."""
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model, weight_decay: float):
    """No weight decay on biases, norms, position embedding and class token."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def augment(images, cfg: ReferenceConfig, info: PreprocessInfo, gen):
    """uint8 [B,H,W,3] on the device -> augmented, resized, normalised float [B,3,S,S].

    Random crop = zero-pad then take an HxW window at a per-image offset; implemented as two
    gathers over index grids so the whole batch is cropped (and flipped) in one go.
    """
    import torch
    import torch.nn.functional as F

    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    b, _, h, w = x.shape
    dev = x.device
    p = cfg.crop_padding
    if p > 0:
        x = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), device=dev, generator=gen)
        ox = torch.randint(0, 2 * p + 1, (b,), device=dev, generator=gen)
    else:
        oy = ox = torch.zeros(b, dtype=torch.long, device=dev)
    rows = oy[:, None] + torch.arange(h, device=dev)
    cols = ox[:, None] + torch.arange(w, device=dev)
    if cfg.hflip:
        flip = torch.rand(b, device=dev, generator=gen) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    x = x.gather(2, rows[:, None, :, None].expand(b, 3, h, x.shape[3]))
    x = x.gather(3, cols[:, None, None, :].expand(b, 3, h, w))
    if cfg.jitter > 0:
        def factor():
            return 1.0 + (torch.rand(b, 1, 1, 1, device=dev, generator=gen) * 2 - 1) * cfg.jitter

        def gray(t):
            return 0.299 * t[:, 0:1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3]

        x = x * factor()                                                   # brightness
        mean = gray(x).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * factor() + mean                                   # contrast
        g = gray(x)
        x = ((x - g) * factor() + g).clamp_(0.0, 1.0)                      # saturation
    return normalize_resize(x, info)


def mix_batch(x, target, cfg: ReferenceConfig, rng: np.random.Generator):
    """Mixup or CutMix with the batch reversed as partner; returns inputs and soft targets."""
    if cfg.mix_prob <= 0 or rng.random() >= cfg.mix_prob or (cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0):
        return x, target
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < 0.5)
    partner_x, partner_t = x.flip(0), target.flip(0)
    if use_cutmix:
        lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = partner_x[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)   # the area actually pasted
    else:
        lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
        x = x * lam + partner_x * (1 - lam)
    return x, target * lam + partner_t * (1 - lam)


def _versions() -> Dict[str, str]:
    import timm
    import torch

    return {"torch": str(torch.__version__), "timm": str(timm.__version__), "numpy": str(np.__version__),
            "python": platform.python_version()}


def build_manifest(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON record of a training run (also the base of the exported manifest)."""
    final = meta.get("final") or {}
    return {
        "format": "mergeseek-reference-manifest/1",
        "name": meta["config"]["name"],
        "command": meta["commands"][-1] if meta["commands"] else "",
        "commands": meta["commands"],
        "data": meta["data"],
        "train_images": meta["train_images"],
        "epochs": meta["epoch"],
        "epochs_planned": meta["config"]["epochs"],
        "complete": meta["epoch"] >= meta["config"]["epochs"],
        "top1_test": final.get("top1_test"),
        "test_images": final.get("test_images"),
        "top1_first1000": final.get("top1_subset"),
        "subset_images": final.get("subset_images"),
        "subset_definition": SUBSET_DEFINITION,
        "top1_precision": "fraction in [0, 1], fp32 forward",
        "num_tokens": (meta["config"]["img_size"] // meta["config"]["patch_size"]) ** 2 + 1,
        "params": meta["params"],
        "train_wall_s": round(meta["train_wall_s"], 1),
        "device": meta["device"],
        "versions": meta["versions"],
        "config": meta["config"],
        "history": meta["history"],
        **({"init": meta["init"]} if meta.get("init") else {}),
    }


# ------------------------------------------------------------------------------- training
def _load_resume(out: Path, resume: Optional[Path], fresh: bool):
    import torch

    path = resume if resume is not None else out / CHECKPOINT_NAME
    if resume is not None and not path.is_file():
        raise WeightsUnavailableError(f"--resume checkpoint {path} does not exist; pass an existing last.pt")
    if fresh or not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != TRAIN_FORMAT:
        raise ConfigError(f"{path} is not a training checkpoint (format={blob.get('format')!r}); "
                          f"pass --fresh or a different --out")
    return blob


def _check_compatible(cfg: ReferenceConfig, saved: Dict[str, Any], path: Path) -> None:
    ours = {k: v for k, v in cfg.to_dict().items() if k != "epochs"}
    theirs = {k: v for k, v in saved.items() if k != "epochs"}
    diffs = sorted(k for k in ours if ours[k] != theirs.get(k))
    if diffs:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours[k]!r}" for k in diffs)
        raise ConfigError(f"checkpoint {path} was trained with a different config ({detail}); "
                          f"use the same settings, --fresh, or another --out")


def train_reference(data: Path, out: Path, config: ReferenceConfig, *, epochs: Optional[int] = None,
                    device: str = "auto", limit: Optional[int] = None, eval_limit: Optional[int] = None,
                    resume: Optional[Path] = None, fresh: bool = False, compile: Optional[bool] = None,
                    time_budget_s: Optional[float] = None, stop_after: Optional[int] = None, eval_every: int = 1,
                    progress: bool = True, command: str = "", init: Optional[str] = None) -> TrainResult:
    """Train (or continue training) the reference model; checkpoint and manifest every epoch.

    Args:
        data: folder with ``train_jpeg.npz`` / ``test_jpeg.npz``.
        out: run folder (``last.pt``, ``manifest.json``); an existing ``last.pt`` is resumed.
        config: architecture and recipe; ``epochs`` overrides ``config.epochs`` (when resuming
            without it, the checkpoint's planned epochs are kept).
        limit / eval_limit: train on / evaluate on the first N (class-interleaved) images.
        resume: an explicit checkpoint to continue from; ``fresh`` ignores ``out/last.pt``.
        compile: ``torch.compile`` the training forward; None = on CUDA only (1.7x on an H100).
        eval_every: score the test set every N epochs (the last epoch always).
        time_budget_s / stop_after: end this invocation early (after a whole epoch) so a later
            run resumes -- for machines with a per-command time limit.
        init: start a new run from another reference's weights (``eval.reference.init_from``);
            ignored when a checkpoint is resumed.
    """
    out = Path(out)
    dev = resolve_device(device)
    blob = _load_resume(out, Path(resume) if resume else None, fresh)
    cfg = _planned_config(config, epochs, blob, out / CHECKPOINT_NAME)
    data_hash = _data_hash(data, blob, out)
    out.mkdir(parents=True, exist_ok=True)
    run = _start_run(cfg, dev, blob, data, data_hash, limit, eval_limit, compile, init)
    ckpt_path, manifest_path = out / CHECKPOINT_NAME, out / "manifest.json"
    meta, start_epoch = run.meta, run.meta["epoch"]
    log.info("%s: %d params, %d tokens, %d images, %d steps/epoch, epochs %d..%d on %s", cfg.name, meta["params"],
             cfg.num_tokens, run.n, run.steps_per_epoch, start_epoch + 1, cfg.epochs, meta["device"])

    run_start = time.perf_counter()
    epochs_this_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        ep_start = time.perf_counter()
        record = _train_epoch(run, epoch, progress)
        if (epoch + 1) % max(1, eval_every) == 0 or epoch + 1 == cfg.epochs:
            record["top1_test"] = evaluate_reference(run.model, run.test.images, run.test.labels, batch_size=1000,
                                                     preprocess=run.info, autocast=dev.type == "cuda")
        meta["history"].append(record)
        if epochs_this_run == 0:
            meta["commands"].append(command)
        meta["epoch"] = epoch + 1
        meta["train_wall_s"] += time.perf_counter() - ep_start
        if meta["epoch"] >= cfg.epochs:
            meta["final"] = _final_eval(run.model, run.test, run.info)
        _save(run.model, run.opt, meta, ckpt_path, manifest_path)
        top1 = record["top1_test"]
        log.info("epoch %d/%d loss %.4f top1 %s (%d imgs) %.1fs, %.0f img/s", epoch + 1, cfg.epochs, record["loss"],
                 "-" if top1 is None else f"{top1:.4f}", len(run.test.labels), record["train_s"],
                 record["imgs_per_s"])
        epochs_this_run += 1
        if _stop_now(epoch, epochs_this_run, time.perf_counter() - run_start, stop_after, time_budget_s):
            break
    if meta["epoch"] >= cfg.epochs and "final" not in meta:  # resumed a finished run that lacks final numbers
        meta["final"] = _final_eval(run.model, run.test, run.info)
        _save(run.model, run.opt, meta, ckpt_path, manifest_path)
    if epochs_this_run == 0:
        log.info("%s already holds %d of %d epochs; nothing to train", ckpt_path, meta["epoch"], cfg.epochs)
    final = meta.get("final") or {}
    return TrainResult(checkpoint=ckpt_path, manifest=manifest_path, start_epoch=start_epoch,
                       epochs_done=meta["epoch"], epochs_planned=cfg.epochs, complete=meta["epoch"] >= cfg.epochs,
                       top1_test=final.get("top1_test"), top1_subset=final.get("top1_subset"),
                       history=list(meta["history"]))


def _planned_config(config: ReferenceConfig, epochs: Optional[int], blob, ckpt_path: Path) -> ReferenceConfig:
    """The config to train with: ``epochs`` applied; a resumed run keeps its planned epochs and must match."""
    if blob is not None:
        saved_epochs = blob["meta"]["config"]["epochs"]
        config = ReferenceConfig.from_dict({**config.to_dict(), "epochs": epochs or saved_epochs})
        _check_compatible(config, blob["meta"]["config"], ckpt_path)
        if config.epochs != saved_epochs:
            log.warning("epochs changed %d -> %d: the cosine schedule is re-stretched from here on",
                        saved_epochs, config.epochs)
    elif epochs is not None:
        config = ReferenceConfig.from_dict({**config.to_dict(), "epochs": epochs})
    return config


def _data_hash(data: Path, blob, out: Path) -> Dict[str, str]:
    """sha256 of both packs; a resumed run must see the data it was trained on."""
    data_hash = {split: file_sha256(cifar10_npz_path(data, split)) for split in ("train", "test")}
    if blob is not None and blob["meta"]["data"]["sha256"] != data_hash:
        raise ConfigError(f"checkpoint in {out} was trained on other data (sha256 {blob['meta']['data']['sha256']}) "
                          f"than --data {data} ({data_hash}); pass the same data, --fresh or another --out")
    return data_hash


@dataclass
class _Run:
    """What the epochs of one invocation share: data on the device, model, optimizer, schedule."""

    cfg: ReferenceConfig
    info: PreprocessInfo
    dev: Any
    model: Any
    fwd: Any  # the model, or its torch.compile wrapper
    opt: Any
    meta: Dict[str, Any]
    train_x: Any
    train_y: Any
    test: Any
    n: int
    bs: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def _start_run(cfg: ReferenceConfig, dev, blob, data: Path, data_hash: Dict[str, str], limit: Optional[int],
               eval_limit: Optional[int], compile: Optional[bool], init: Optional[str] = None) -> _Run:
    """Decode the data once onto the device; build (or restore) model, optimizer and run record."""
    import torch

    from mergeseek.eval import checkpoints

    t0 = time.perf_counter()
    train = load_cifar10_npz(data, "train", limit)
    test = load_cifar10_npz(data, "test", eval_limit)
    log.info("decoded %d train / %d test images in %.1fs", len(train.labels), len(test.labels),
             time.perf_counter() - t0)
    train_x = torch.from_numpy(train.images).to(dev)
    train_y = torch.from_numpy(train.labels).to(dev)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    init_record = None
    if init and blob is None:
        from mergeseek.eval.reference import init_from

        init_record = init_from(model, init)
    model = model.to(dev)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    if blob is not None:
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        meta = blob["meta"]
        meta["config"] = cfg.to_dict()
    else:
        meta = {"config": cfg.to_dict(), "epoch": 0, "history": [], "commands": [], "train_wall_s": 0.0,
                "data": {"path": str(data), "sha256": data_hash}, "train_images": len(train.labels),
                "params": sum(p.numel() for p in model.parameters())}
        if init_record:
            meta["init"] = init_record
    if meta["train_images"] != len(train.labels):
        raise ConfigError(f"checkpoint trained on {meta['train_images']} images but --limit gives "
                          f"{len(train.labels)}; pass the same --limit, --fresh or another --out")
    meta["versions"] = _versions()
    meta["device"] = checkpoints.device_label(dev)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if compile is None:
        compile = dev.type == "cuda"
    n = len(train.labels)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs
    return _Run(cfg=cfg, info=PreprocessInfo.from_config(cfg), dev=dev, model=model,
                fwd=torch.compile(model) if compile else model, opt=opt, meta=meta, train_x=train_x, train_y=train_y,
                test=test, n=n, bs=bs, steps_per_epoch=steps_per_epoch, total_steps=cfg.epochs * steps_per_epoch,
                warmup_steps=cfg.warmup_epochs * steps_per_epoch)


def _train_epoch(run: _Run, epoch: int, progress: bool) -> Dict[str, Any]:
    """One pass over the training set; returns the epoch's history record (top1_test still None)."""
    import torch
    import torch.nn.functional as F

    cfg, dev, opt = run.cfg, run.dev, run.opt
    ep_start = time.perf_counter()
    # Everything random in an epoch derives from (seed, epoch): resuming replays it exactly.
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(run.n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).to(dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 104_729 + epoch)
    rng = np.random.default_rng([cfg.seed, epoch])
    run.model.train()
    loss_sum = torch.zeros((), device=dev)
    lr = cfg.lr
    bar = _progress(range(run.steps_per_epoch), progress, f"epoch {epoch + 1}/{cfg.epochs}")
    for i in bar:
        lr = lr_at(epoch * run.steps_per_epoch + i, run.total_steps, run.warmup_steps, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = order[i * run.bs:(i + 1) * run.bs]
        x = augment(run.train_x[idx], cfg, run.info, gen)
        target = F.one_hot(run.train_y[idx], cfg.num_classes).float()
        x, target = mix_batch(x, target, cfg, rng)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = run.fwd(x)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        opt.step()
        loss_sum += loss.detach()
        if progress and hasattr(bar, "set_postfix") and (i % 20 == 0 or i == run.steps_per_epoch - 1):
            bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.3f}", lr=f"{lr:.2e}")
    train_s = time.perf_counter() - ep_start
    return {"epoch": epoch + 1, "loss": round(loss_sum.item() / run.steps_per_epoch, 5), "top1_test": None,
            "lr": lr, "train_s": round(train_s, 2), "imgs_per_s": round(run.steps_per_epoch * run.bs / train_s, 1)}


def _stop_now(epoch: int, epochs_this_run: int, elapsed: float, stop_after: Optional[int],
              time_budget_s: Optional[float]) -> bool:
    """End this invocation after ``stop_after`` epochs, or when another epoch would pass the budget."""
    if stop_after is not None and epochs_this_run >= stop_after:
        return True
    if time_budget_s is not None and elapsed + elapsed / epochs_this_run > time_budget_s:
        log.info("stopping after epoch %d: another epoch would pass the %.0fs budget; rerun to resume",
                 epoch + 1, time_budget_s)
        return True
    return False


def _final_eval(model, test, info: PreprocessInfo) -> Dict[str, Any]:
    """fp32 numbers for the manifest: the whole (or limited) test set and the fixed subset."""
    k = min(SUBSET_SIZE, len(test.labels))
    return {
        "top1_test": evaluate_reference(model, test.images, test.labels, batch_size=500, preprocess=info),
        "test_images": len(test.labels),
        "top1_subset": evaluate_reference(model, test.images[:k], test.labels[:k], batch_size=500, preprocess=info),
        "subset_images": k,
    }


def _save(model, opt, meta: Dict[str, Any], ckpt_path: Path, manifest_path: Path) -> None:
    atomic_torch_save({"format": TRAIN_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                       "meta": meta}, ckpt_path)
    atomic_write_json(build_manifest(meta), manifest_path)


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------- export
def export_reference(checkpoint: Path, to: Path, data: Optional[Path] = None) -> ExportResult:
    """Write ``<to>/<name>.pt`` (fp16 weights) and ``<to>/<name>.json`` (manifest) from a checkpoint.

    When ``data`` holds the CIFAR-10 test pack, the exported weights are reloaded exactly as
    :func:`eval.reference.load_reference` does and scored on the fixed subset on CPU in fp32;
    that number (``export_check``) is what offline checks compare against.
    """
    checkpoint, to = Path(checkpoint), Path(to)
    blob = read_training_checkpoint(checkpoint, TRAIN_FORMAT, "mergeseek train-reference --data ... --out runs/ref")
    meta = blob["meta"]
    cfg = ReferenceConfig.from_dict(meta["config"])
    if meta["epoch"] < cfg.epochs:
        log.warning("exporting an unfinished run: epoch %d of %d", meta["epoch"], cfg.epochs)
    weights = export_fp16(blob["model"], to, cfg, EXPORT_FORMAT)
    manifest = build_manifest(meta)
    manifest.update({"weights_file": weights.name, "weights_sha256": file_sha256(weights),
                     "weights_dtype": "float16", "exported_from": str(checkpoint)})
    check = None
    if data is not None and (Path(data) / "test_jpeg.npz").is_file():
        model, info = load_reference(weights, device="cpu")
        test = load_cifar10_npz(data, "test", SUBSET_SIZE)
        check = evaluate_reference(model, test.images, test.labels, batch_size=250, preprocess=info)
        manifest["export_check"] = {"top1_first1000": check, "subset_images": len(test.labels),
                                    "device": "cpu", "compute": "float32 from the float16 weights",
                                    "test_sha256": file_sha256(Path(data) / "test_jpeg.npz")}
        log.info("exported weights score %.4f on the %s", check, SUBSET_DEFINITION)
    else:
        log.warning("no test pack at %s: the export is not re-scored (export_check left out)", data)
    atomic_write_json(manifest, to / f"{cfg.name}.json")
    return ExportResult(weights=weights, manifest=to / f"{cfg.name}.json", top1_subset=check)


# ------------------------------------------------------------------------------- entry point
def run(*, data: Optional[str] = None, out: str = "runs/ref", config: str = "reference-cifar10", overrides: str = "",
        epochs: Optional[int] = None,
        batch_size: Optional[int] = None, device: str = "auto", limit: Optional[int] = None,
        eval_limit: Optional[int] = None, resume: Optional[str] = None, fresh: bool = False,
        compile: Optional[bool] = None, time_budget: Optional[float] = None, stop_after: Optional[int] = None,
        eval_every: int = 1, progress: bool = True,
        export: Optional[str] = None, to: str = "eval/reference", command: str = "", init: Optional[str] = None):
    """The one function behind ``cli.py train-reference`` (and ``python -m mergeseek.eval.train_reference``).

    ``data`` defaults to ``cifar10`` under the data root (``$MERGESEEK_DATA`` or the user's cache,
    see :func:`eval.config.default_data_root`). A speech config (``reference-speech``) trains the
    audio reference instead (:func:`eval.speech_reference.run_speech`).
    """
    from mergeseek.eval.detector_reference import is_detector_config
    from mergeseek.eval.detector_train import run_detector
    from mergeseek.eval.speech_reference import is_speech_config, run_speech

    given = {"--batch-size": batch_size is not None, "--device": device not in ("auto", "cpu"), "--limit": limit is not None,
             "--eval-limit": eval_limit is not None, "--resume": resume is not None, "--compile": compile is not None,
             "--stop-after": stop_after is not None, "--eval-every": eval_every != 1, "--init": init is not None}
    if is_detector_config(config):
        _refuse_unread(config, given, ("--eval-every", "--device"),
                       "--set batch_size=N, --set eval_pictures=N, --set init=NAME")
        return run_detector(data=data, out=out, config=config, overrides=overrides, epochs=epochs, export=export,
                            to=to, time_budget=time_budget, fresh=fresh, command=command, eval_every=eval_every,
                            device=device)
    if is_speech_config(config):
        _refuse_unread(config, given, ("--eval-limit", "--device"), "--set batch_size=N")
        return run_speech(data=data, out=out, config=config, overrides=overrides, epochs=epochs, export=export, to=to,
                          time_budget=time_budget, eval_limit=eval_limit, fresh=fresh, command=command, device=device)
    if data is None:
        from mergeseek.eval.config import default_data_root

        data = str(default_data_root() / "cifar10")
    if export:
        return export_reference(Path(export), Path(to), Path(data) if data else None)
    cfg = ReferenceConfig.parse(config).with_overrides(overrides)
    if batch_size is not None:
        cfg = cfg.with_overrides([f"batch_size={batch_size}"])
    return train_reference(Path(data), Path(out), cfg, epochs=epochs, device=device, limit=limit,
                           eval_limit=eval_limit, resume=Path(resume) if resume else None, fresh=fresh,
                           compile=compile, time_budget_s=time_budget, stop_after=stop_after,
                           eval_every=eval_every, progress=progress,
                           command=command, init=init)


def _refuse_unread(config: str, given: dict, reads: tuple, instead: str) -> None:
    """One line naming the options the trainer of ``config`` does not read (rather than ignoring them)."""
    unread = [flag for flag, on in given.items() if on and flag not in reads]
    if unread:
        from mergeseek.errors import ConfigError

        raise ConfigError(f"{', '.join(unread)} {'does' if len(unread) == 1 else 'do'} not apply to --config "
                          f"{config.split(',')[0]} (it reads --data, --out, --set, --epochs, --time-budget, --fresh, "
                          f"--export, --to{''.join(', ' + r for r in reads)}); use {instead}")


def describe(result) -> str:
    if isinstance(result, ExportResult):
        check = ("not re-scored" if result.top1_subset is None
                 else f"{result.subset}: {result.top1_subset:.4f}" if result.subset.startswith("mAP")  # the detector
                 else f"top-1 {result.top1_subset:.4f} on {result.subset}")
        return f"exported {result.weights} + {result.manifest} ({check})"
    state = "complete" if result.complete else "stopped, rerun to resume"
    top = "" if result.top1_test is None else (f"; top-1 {result.top1_test:.4f} test, "
                                               f"{result.top1_subset:.4f} on {result.subset}")
    if result.subset.startswith("mAP"):  # the detector (eval/detector_train.py) scores by mAP, not top-1
        top = f"; {result.subset}: {result.top1_test:.4f}"
    return f"epoch {result.epochs_done}/{result.epochs_planned} ({state}){top}; {result.checkpoint}, {result.manifest}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mergeseek.eval.train_reference ARGS`` runs ``cli.py train-reference ARGS``: the options are
    defined once, in ``cli.py`` (typer)."""
    from mergeseek.cli import app

    args = ["train-reference", *(sys.argv[1:] if argv is None else argv)]
    try:
        app(args=args, prog_name="mergeseek")  # typer prints usage errors and exits with the code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
