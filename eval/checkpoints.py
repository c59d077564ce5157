"""Trained references' weights on disk, shared by every model ``cli.py train-reference`` makes (the
CIFAR-10 reference, the speech reference, the detector): reading a training checkpoint, the fp16
export, loading exported or training weights into a freshly built model, and the manifest fields
every run records."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Dict

from mergeseek.errors import WeightsUnavailableError


def read_training_checkpoint(checkpoint: Path, fmt: str, train_hint: str) -> dict:
    """A training checkpoint of format ``fmt`` (``train_hint``: the command that makes one), or one line."""
    import torch

    if not Path(checkpoint).is_file():
        raise WeightsUnavailableError(f"checkpoint {checkpoint} does not exist; train first ({train_hint})")
    blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if blob.get("format") != fmt:
        raise WeightsUnavailableError(f"{checkpoint} is not a training checkpoint of this model "
                                      f"(format={blob.get('format')!r}, expected {fmt!r})")
    return blob


def export_fp16(model_state: dict, to: Path, cfg, fmt: str) -> Path:
    """``<to>/<cfg.name>.pt``: a trained model's weights in float16, with ``cfg`` and ``fmt``."""
    from mergeseek.eval.train_reference import atomic_torch_save

    Path(to).mkdir(parents=True, exist_ok=True)
    weights = Path(to) / f"{cfg.name}.pt"
    state = {k: v.half() if v.is_floating_point() else v for k, v in model_state.items()}
    atomic_torch_save({"format": fmt, "config": cfg.to_dict(), "state_dict": state}, weights)
    return weights


def load_trained_model(path: Path, config_cls, build, formats: tuple[str, str], what: str, train: tuple[str, str]):
    """-> (model in eval mode, float32 on the CPU, config) from the exported (``formats[0]``) or training
    (``formats[1]``) weights at ``path`` of a model that ``build(config)`` makes; one line when the file is
    missing (naming the commands that make it, ``train`` = (config name, training folder)) or of another model."""
    import torch

    path = Path(path)
    if not path.is_file():
        name, out = train
        raise WeightsUnavailableError(
            f"{what} weights {path} are not present; train them with `cli.py train-reference --config {name} "
            f"--out {out}` and export with `cli.py train-reference --config {name} --export {out}/last.pt`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt == formats[0]:
        cfg, state = config_cls.from_dict(blob["config"]), blob["state_dict"]
    elif fmt == formats[1]:
        cfg, state = config_cls.from_dict(blob["meta"]["config"]), blob["model"]
    else:
        raise WeightsUnavailableError(f"{path} is not a {what} checkpoint (format={fmt!r})")
    model = build(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval(), cfg


def device_label(dev) -> str:
    """What a run's manifest says it trained on: the GPU's name, or the CPU's cores and torch threads."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def run_manifest(meta: Dict[str, Any], num_tokens: int) -> Dict[str, Any]:
    """The fields every reference's manifest shares (name, commands, data, epochs, size, time, machine,
    versions, config, history), from a training checkpoint's ``meta``."""
    import timm
    import torch

    return {"name": meta["config"]["name"], "commands": meta["commands"], "data": meta["data"],
            "epochs": meta["epoch"], "epochs_planned": meta["config"]["epochs"],
            "complete": meta["epoch"] >= meta["config"]["epochs"], "num_tokens": num_tokens,
            "params": meta["params"], "train_wall_s": round(meta["train_wall_s"], 1),
            "device": meta.get("device") or f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
            "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__),
                         "python": platform.python_version()},
            "config": meta["config"], "history": meta["history"]}


def export_trained(checkpoint: Path, to: Path, config_cls, formats: tuple[str, str], train: tuple[str, str],
                   describe_run, score_key: str) -> ExportResult:
    """``<to>/<name>.pt`` (fp16 weights, ``formats[0]``) and ``<to>/<name>.json`` from a training
    checkpoint of format ``formats[1]``. ``describe_run(meta)`` -> (the manifest, what the score was
    measured on); the manifest gains the weights' file, hash and origin; the score is ``meta[score_key]``."""
    from mergeseek.eval.reference import file_sha256
    from mergeseek.eval.train_reference import ExportResult, atomic_torch_save, atomic_write_json

    name, out = train
    blob = read_training_checkpoint(checkpoint, formats[1], f"cli.py train-reference --config {name} --out {out}")
    meta = blob["meta"]
    cfg = config_cls.from_dict(meta["config"])
    weights = export_fp16(blob["model"], to, cfg, formats[0])
    manifest, subset = describe_run(meta)
    manifest = {**manifest, "weights_file": weights.name, "weights_sha256": file_sha256(weights),
                "weights_dtype": "float16", "exported_from": str(checkpoint)}
    atomic_write_json(manifest, Path(to) / f"{cfg.name}.json")
    return ExportResult(weights=weights, manifest=Path(to) / f"{cfg.name}.json", top1_subset=meta.get(score_key),
                        subset=subset)


def resume_training(ckpt: Path, fmt: str, cfg, model, opt, what: str) -> Dict[str, Any]:
    """Load a training checkpoint of format ``fmt`` into ``model`` and ``opt`` and return its ``meta``
    (its config made ``cfg``: only ``epochs`` may differ, so a run can be extended); one line naming
    ``--fresh`` when the file is another model's or was trained with another config."""
    import torch

    from mergeseek.errors import ConfigError

    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ConfigError(f"{ckpt} is not a {what} training checkpoint; pass --fresh or another --out")
    theirs = {k: v for k, v in blob["meta"]["config"].items() if k != "epochs"}
    if theirs != {k: v for k, v in cfg.to_dict().items() if k != "epochs"}:
        raise ConfigError(f"{ckpt} was trained with another config; pass --fresh or another --out")
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    meta = blob["meta"]
    meta["config"] = cfg.to_dict()
    return meta
