"""Training and export of ``reference-detector`` (:mod:`eval.detector_reference` holds the model,
its loading and the shared ``detect`` contract).

``cli.py train-reference --config reference-detector --data DATA --out runs/detector``: every step
draws ``batch_size`` fresh pictures from the training half of ``synth-detection``
(:func:`eval.datasets.detection.picture`, picture index = step * batch + i, so a resumed run sees
the same pictures), CenterNet targets (:func:`make_targets`), focal + L1 loss
(:func:`detection_loss`), AdamW with warmup and cosine decay (``train_reference.lr_at``); after
every epoch mAP on the first ``eval_pictures`` test pictures, an atomic checkpoint and manifest.
``--export runs/detector/last.pt`` writes fp16 weights and a manifest to ``eval/reference/``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from mergeseek.errors import ConfigError
from mergeseek.eval.detector_reference import (EXPORT_FORMAT, TRAIN_FORMAT, DetectorConfig, build_detector,
                                               evaluate_detector, pictures_to_tensor)

log = logging.getLogger(__name__)


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
    """Copy a classification reference's ViT weights (all but its head) into the detector's backbone.

    Where the detector's patches are ``k`` times the reference's side (same grid, ``k`` times the
    input), each kernel weight is spread over a ``k x k`` block and divided by ``k * k``: the
    patch embedding then equals "average-pool the picture by ``k``, then the reference's", and
    training can use the finer pixels from there."""
    from mergeseek.eval.reference import file_sha256, load_reference
    from mergeseek.eval.reference import _resolve_weights as reference_path

    ref, _ = load_reference(name, device="cpu")
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    key = "patch_embed.proj.weight"
    want = model.backbone.state_dict()[key].shape
    if key in state and state[key].shape != want:
        state[key] = resample_patch_kernel(state[key], want, name)
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head")]:
        raise ConfigError(f"init={name}: its ViT does not fit the detector's backbone (missing {missing}, "
                          f"unexpected {unexpected}); use a reference of the same width, depth and grid")
    path = reference_path(name)
    return {"from": name, "weights_sha256": file_sha256(path)}


def resample_patch_kernel(weight, shape, name: str = "init"):
    """A ``[C, 3, p, p]`` patch kernel -> ``[C, 3, k p, k p]`` equal to ``k x k`` average pooling
    followed by the original kernel (``k`` a whole number)."""
    p, q = weight.shape[-1], shape[-1]
    if tuple(weight.shape[:2]) != tuple(shape[:2]) or q % p:
        raise ConfigError(f"init={name}: its patch kernel {tuple(weight.shape)} cannot be spread to "
                          f"{tuple(shape)}; the detector's patch side must be a multiple of the reference's")
    k = q // p
    return weight.repeat_interleave(k, dim=-1).repeat_interleave(k, dim=-2) / (k * k)


def train_detector(data: Path, out: Path, cfg: DetectorConfig, *, time_budget_s: Optional[float] = None,
                   fresh: bool = False, command: str = "", sources=None, spec=None, test=None, eval_every: int = 1,
                   device: str = "auto"):
    """Train (or resume from ``out/last.pt``) the detector; ``data`` is the folder holding
    ``cifar10/``, ``coco_captions/`` and ``imagenet_sample/`` (the ``synth-detection`` sources).
    The test pictures are scored every ``eval_every`` epochs and after the last one. ``device``:
    auto (CUDA when present), cpu, cuda or cuda:N; the pictures and their targets are drawn on the
    CPU either way (the same pictures on every device), the model steps on ``device``."""
    import torch

    from mergeseek.eval.datasets.detection import DetectionSpec, cache_folder, load_sources, load_synth_detection
    from mergeseek.eval.checkpoints import device_label
    from mergeseek.eval.train_reference import TrainResult, atomic_torch_save, atomic_write_json, resolve_device

    spec = spec or DetectionSpec(size=cfg.picture_size)
    if spec.size != cfg.picture_size:
        raise ConfigError(f"synth-detection size={spec.size} does not match the detector's picture_size="
                          f"{cfg.picture_size}")
    t0 = time.perf_counter()
    sources = sources or load_sources(data, spec)
    test = test if test is not None else load_synth_detection(cache_folder(None, data), data, "test", spec, sources)
    log.info("sources and test split ready in %.1fs (%d test pictures)", time.perf_counter() - t0, len(test))
    out = Path(out)
    dev = resolve_device(device)
    model, opt, meta = _start(cfg, out / TRAIN_CHECKPOINT, fresh, data, spec, sources, dev)
    out.mkdir(parents=True, exist_ok=True)
    meta["commands"].append(command)
    meta["device"] = device_label(dev)
    log.info("%s: %d params, %d tokens, %d pictures/step, epochs %d..%d on %s", cfg.name,
             meta["params"], cfg.num_tokens, cfg.batch_size, meta["epoch"] + 1, cfg.epochs, meta["device"])
    start = time.perf_counter()
    while meta["epoch"] < cfg.epochs:
        ep_start = time.perf_counter()
        epoch = meta["epoch"]
        sums, lr = _train_epoch(model, opt, cfg, spec, sources, epoch)
        train_s = time.perf_counter() - ep_start
        record = {"epoch": epoch + 1, "lr": lr, "train_s": round(train_s, 1),
                  **{k: round(v / cfg.steps_per_epoch, 5) for k, v in sums.items()}}
        stopping = time_budget_s is not None and epoch + 1 < cfg.epochs and (
            time.perf_counter() - start + train_s > time_budget_s)  # another epoch would pass the budget
        scored = (epoch + 1) % max(1, eval_every) == 0 or epoch + 1 >= cfg.epochs or stopping
        if scored:  # the last epoch of a run is always scored, so the manifest's figure is its own
            scores = evaluate_detector(model, cfg, test, limit=cfg.eval_pictures)
            record.update(map50_test=round(scores["map50"], 4), map_test=round(scores["map"], 4),
                          eval_pictures=scores["pictures"])
            meta["map50_test"], meta["map_test"], meta["eval_pictures"] = scores["map50"], scores["map"], scores["pictures"]
        meta["history"].append(record)
        meta["epoch"], meta["train_wall_s"] = epoch + 1, meta["train_wall_s"] + train_s
        atomic_torch_save({"format": TRAIN_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "meta": meta}, out / TRAIN_CHECKPOINT)
        atomic_write_json(_describe_run(meta)[0], out / "manifest.json")
        said = (f"mAP@0.5 {record['map50_test']:.4f} mAP {record['map_test']:.4f} ({record['eval_pictures']} test "
                "pictures) " if scored else "")
        log.info("epoch %d/%d loss %.4f %s%.1fs", epoch + 1, cfg.epochs, record["loss"], said, train_s)
        if stopping:
            log.info("stopping after epoch %d: another epoch would pass the %.0fs budget; rerun to resume",
                     meta["epoch"], time_budget_s)
            break
    return TrainResult(checkpoint=out / TRAIN_CHECKPOINT, manifest=out / "manifest.json", start_epoch=0,
                       epochs_done=meta["epoch"], epochs_planned=cfg.epochs, complete=meta["epoch"] >= cfg.epochs,
                       top1_test=meta.get("map50_test"), top1_subset=meta.get("map50_test"),
                       history=list(meta["history"]), subset=f"mAP@0.5 on {meta.get('eval_pictures')} test pictures")


TRAIN_CHECKPOINT = "last.pt"


def _train_epoch(model, opt, cfg: DetectorConfig, spec, sources, epoch: int):
    """One epoch of ``cfg.steps_per_epoch`` steps on fresh pictures; returns (loss sums, last lr)."""
    import torch

    from mergeseek.eval.datasets.detection import picture
    from mergeseek.eval.train_reference import lr_at

    torch.manual_seed(cfg.seed * 100_003 + epoch)
    dev = next(model.parameters()).device
    model.train()
    total, warm = cfg.epochs * cfg.steps_per_epoch, cfg.warmup_epochs * cfg.steps_per_epoch
    sums: Dict[str, float] = {"loss": 0.0, "focal": 0.0, "offset": 0.0, "size": 0.0}
    recent, lr, ep_start = 0.0, cfg.lr, time.perf_counter()
    for i in range(cfg.steps_per_epoch):
        step = epoch * cfg.steps_per_epoch + i
        lr = lr_at(step, total, warm, cfg)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        pics = [picture(spec, sources, "train", step * cfg.batch_size + j) for j in range(cfg.batch_size)]
        x = pictures_to_tensor([p[0] for p in pics], cfg).to(dev)
        heat_t, reg_t, mask = (t.to(dev) for t in make_targets([p[1] for p in pics], [p[2] for p in pics], cfg,
                                                              spec.size))
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
    return sums, lr


def _start(cfg: DetectorConfig, ckpt: Path, fresh: bool, data: Path, spec, sources, dev=None):
    """Model (on ``dev``, default the CPU), optimizer and run record: new (backbone from ``cfg.init``),
    or restored from ``ckpt`` (saved on any device)."""
    import torch

    torch.manual_seed(cfg.seed)
    model = build_detector(cfg)
    resume = ckpt.is_file() and not fresh
    init = init_backbone(model, cfg.init) if cfg.init and not resume else None  # before the optimizer sees the weights
    freeze(model, cfg)
    if dev is not None:
        model.to(dev)
    opt = torch.optim.AdamW(detector_param_groups(model, cfg), lr=cfg.lr)
    if resume:
        from mergeseek.eval.checkpoints import resume_training

        return model, opt, resume_training(ckpt, TRAIN_FORMAT, cfg, model, opt, "detector")
    meta = {"config": cfg.to_dict(), "epoch": 0, "history": [], "commands": [], "train_wall_s": 0.0,
            "data": {"path": str(data), "spec": dataclasses.asdict(spec), "key": spec.key(sources)},
            "params": sum(p.numel() for p in model.parameters()), "init": init}
    return model, opt, meta


def detector_param_groups(model, cfg: DetectorConfig):
    """AdamW groups: backbone and head apart (the head at ``head_lr_scale`` times the rate), each
    split into decayed weights and undecayed biases / norms / embeddings."""
    from mergeseek.eval.train_reference import param_groups

    groups = []
    for part, scale in ((model.backbone, 1.0), (_HeadView(model), cfg.head_lr_scale)):
        for group in param_groups(part, cfg.weight_decay):
            if group["params"]:
                groups.append({**group, "lr_scale": scale})
    return groups


class _HeadView:
    """The detector's parameters outside its backbone, for ``param_groups``."""

    def __init__(self, model):
        self.model = model

    def named_parameters(self):
        return ((n, p) for n, p in self.model.named_parameters() if not n.startswith("backbone."))


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


def _describe_run(meta: Dict[str, Any]) -> tuple[Dict[str, Any], str]:
    """The exported manifest of a detector run and what its score was measured on."""
    from mergeseek.eval.checkpoints import run_manifest

    manifest = {"format": "mergeseek-detector-reference-manifest/1",
                **run_manifest(meta, DetectorConfig.from_dict(meta["config"]).num_tokens), "init": meta.get("init"),
                "map50_test": meta.get("map50_test"), "map_test": meta.get("map_test"),
                "eval_pictures": meta.get("eval_pictures"),
                "metric": "COCO-style mAP (101-point), fp32 forward, first eval_pictures of the synth-detection test split"}
    return manifest, f"mAP@0.5 on {meta.get('eval_pictures')} test pictures"


def export_detector(checkpoint: Path, to: Path):
    """``<to>/<name>.pt`` (fp16 weights) and ``<to>/<name>.json`` (manifest) from a training checkpoint."""
    from mergeseek.eval.checkpoints import export_trained

    return export_trained(checkpoint, to, DetectorConfig, (EXPORT_FORMAT, TRAIN_FORMAT),
                          ("reference-detector", "runs/detector"), _describe_run, "map50_test")


def run_detector(*, data: Optional[str], out: str, config: str, overrides: str = "", epochs: Optional[int] = None,
                 export: Optional[str] = None, to: str = "eval/reference", time_budget: Optional[float] = None,
                 fresh: bool = False, command: str = "", eval_every: int = 1, device: str = "auto"):
    """``cli.py train-reference --config reference-detector ...``: ``data`` is the folder holding the
    ``synth-detection`` sources (default: the data root); ``export`` writes fp16 weights to ``to``;
    ``device``: auto (CUDA when present), cpu, cuda or cuda:N."""
    if export:
        return export_detector(Path(export), Path(to))
    from mergeseek.eval.train_reference import resolve_device

    resolve_device(device)  # a device that is not there is refused before any data is read
    if data is None:
        from mergeseek.eval.config import default_data_root

        data = str(default_data_root())
    cfg = DetectorConfig.parse(",".join(t for t in (config, overrides) if t))
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    return train_detector(Path(data), Path(out), cfg, time_budget_s=time_budget, fresh=fresh, command=command,
                          eval_every=eval_every, device=device)
