"""The CIFAR-10 reference ViT: data reading, augmentation, training, resume, export, offline loading.

Unit tests build a tiny CIFAR-style JPEG pack in a temp folder (same arrays as the real one), so
they never need /work/shared; only the last test reads the real test set, and skips without it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mergeseek.errors import ConfigError, InputError, WeightsUnavailableError
from mergeseek.eval.reference import (
    CIFAR10_CLASSES, REFERENCE_DIR, PreprocessInfo, ReferenceConfig, build_model, evaluate_reference,
    get_config, load_cifar10_npz, load_reference, preprocess_uint8, reference_available,
)
from mergeseek.eval.train_reference import augment, export_reference, train_reference

REPO = Path(__file__).resolve().parents[1]
# The real test set: under $MERGESEEK_DATA when set, else the checkout's neighbour folder.
SHARED_CIFAR = Path(os.environ["MERGESEEK_DATA"]) / "cifar10" if os.environ.get("MERGESEEK_DATA") else (
    REPO.parent / "shared" / "data" / "cifar10")
# Class colours far apart in RGB, so the tiny model can learn them in a few epochs.
COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [230, 30, 230],
                    [30, 230, 230], [240, 240, 240], [20, 20, 20], [140, 70, 20], [120, 120, 200]])


def _write_pack(path: Path, per_class: int, seed: int) -> None:
    """A CIFAR-10 JPEG pack like the shared one: sorted by class, JPEG bytes concatenated."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs, labels, names = [], [], []
    for c, cls in enumerate(CIFAR10_CLASSES):
        for k in range(per_class):
            img = COLOURS[c] + rng.normal(0, 25, (32, 32, 3))
            img[rng.integers(0, 24):, rng.integers(0, 24):] //= 2  # a darker corner block, varied per image
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=75)
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
            labels.append(c)
            names.append(f"{cls}/{k:04d}.jpg")
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, labels=np.array(labels, dtype=np.int64),
             names=np.array(names), classes=np.array(CIFAR10_CLASSES))


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cifar10")
    _write_pack(d / "train_jpeg.npz", per_class=24, seed=0)
    _write_pack(d / "test_jpeg.npz", per_class=10, seed=1)
    return d


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and far faster when other work shares the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**overrides) -> ReferenceConfig:
    return get_config("reference-tiny").with_overrides([f"{k}={v}" for k, v in overrides.items()])


def _train(cifar_dir, out, cfg, **kw):
    return train_reference(cifar_dir, out, cfg, device="cpu", progress=False, command="pytest", **kw)


# ------------------------------------------------------------------------------- config and data
def test_config_round_trips_and_reference_shape(one_thread):
    cfg = ReferenceConfig.parse("reference-cifar10,lr=0.0005,depth=6,hflip=false,mean=[0.5,0.5,0.5]")
    assert (cfg.lr, cfg.depth, cfg.hflip, cfg.mean) == (5e-4, 6, False, (0.5, 0.5, 0.5))
    assert ReferenceConfig.parse(str(cfg)) == cfg
    assert str(get_config("reference-cifar10")) == "reference-cifar10"
    with pytest.raises(ConfigError, match="valid keys"):
        ReferenceConfig.parse("reference-cifar10,dpeth=6")
    with pytest.raises(ConfigError, match="divisible"):
        ReferenceConfig.parse("embed_dim=100,num_heads=3")

    ref = get_config("reference-cifar10")
    model = build_model(ref).eval()
    assert ref.num_tokens == 145 and model.global_pool == "token" and model.cls_token is not None
    tokens = model.forward_features(torch.zeros(1, 3, ref.img_size, ref.img_size))
    assert tokens.shape == (1, 145, ref.embed_dim)


def test_load_cifar10_npz_decodes_in_class_interleaved_order(cifar_dir):
    full = load_cifar10_npz(cifar_dir, "test")
    assert full.images.shape == (100, 32, 32, 3) and full.images.dtype == np.uint8
    assert np.bincount(full.labels).tolist() == [10] * 10
    head = load_cifar10_npz(cifar_dir / "test_jpeg.npz", "test", limit=20)
    assert head.labels.tolist() == list(range(10)) * 2
    assert np.array_equal(head.images, full.images[:20])
    # Decoded pixels sit near their class colour (JPEG is lossy; the darker block lowers the mean).
    centre = head.images[:10, 2:6, 2:6].reshape(10, -1, 3).mean(axis=1)
    assert np.all(np.argmin(((centre[:, None] - COLOURS[None]) ** 2).sum(-1), axis=1) == np.arange(10))
    with pytest.raises(InputError, match="does not exist"):
        load_cifar10_npz(cifar_dir / "nope", "test")


def test_augment_is_a_padded_crop_with_optional_flip_and_matches_eval_without_them():
    cfg = tiny(crop_padding=3)
    info = PreprocessInfo.from_config(cfg)
    imgs = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    out = augment(imgs, cfg, info, torch.Generator().manual_seed(0))
    plain = preprocess_uint8(imgs, info)
    raw = torch.nn.functional.pad(imgs.permute(0, 3, 1, 2).float() / 255, (3, 3, 3, 3))  # black border
    padded = (raw - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    for b in range(6):
        windows = [padded[b, :, y:y + 32, x:x + 32] for y in range(7) for x in range(7)]
        windows += [w.flip(-1) for w in windows]
        assert min(float((w - out[b]).abs().max()) for w in windows) < 1e-5, f"image {b} is no padded crop"
    same = augment(imgs, tiny(crop_padding=0, hflip=False), info, torch.Generator().manual_seed(0))
    assert torch.allclose(same, plain, atol=1e-6)


# ------------------------------------------------------------------------------- training
def test_training_loss_falls_and_the_model_learns(cifar_dir, tmp_path, one_thread):
    result = _train(cifar_dir, tmp_path / "run", tiny(epochs=6))
    losses = [h["loss"] for h in result.history]
    assert result.complete and len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.top1_test >= 0.5, result.history  # chance is 0.1
    manifest = json.loads(result.manifest.read_text())
    assert manifest["top1_test"] == result.top1_test and manifest["test_images"] == 100
    assert manifest["data"]["sha256"]["train"] and manifest["versions"]["timm"]
    assert manifest["config"]["name"] == "reference-tiny" and manifest["command"] == "pytest"


def test_resume_continues_the_epoch_counter_and_matches_an_uninterrupted_run(cifar_dir, tmp_path, one_thread):
    cfg = tiny(epochs=3, jitter=0.2, mix_prob=0.5, drop_path_rate=0.1)
    first = _train(cifar_dir, tmp_path / "a", cfg, stop_after=1)
    assert (first.epochs_done, first.complete) == (1, False)
    resumed = _train(cifar_dir, tmp_path / "a", cfg)
    assert (resumed.start_epoch, resumed.epochs_done) == (1, 3)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    straight = _train(cifar_dir, tmp_path / "b", cfg)
    a = torch.load(resumed.checkpoint, weights_only=True)["model"]
    b = torch.load(straight.checkpoint, weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "resumed weights differ from uninterrupted run"
    assert json.loads(resumed.manifest.read_text())["commands"] == ["pytest", "pytest"]
    with pytest.raises(ConfigError, match="different config"):
        _train(cifar_dir, tmp_path / "a", tiny(epochs=3, lr=0.1))


# ------------------------------------------------------------------------------- export / loading
def test_export_round_trips_offline(cifar_dir, tmp_path, one_thread):
    run = _train(cifar_dir, tmp_path / "run", tiny(epochs=2))
    exp = export_reference(run.checkpoint, tmp_path / "ref", data=cifar_dir)
    blob = torch.load(exp.weights, weights_only=True)
    assert all(v.dtype == torch.float16 for v in blob["state_dict"].values() if v.is_floating_point())
    manifest = json.loads(exp.manifest.read_text())
    assert manifest["weights_file"] == "reference-tiny.pt" and manifest["weights_dtype"] == "float16"
    assert manifest["epochs"] == 2 and manifest["top1_first1000"] == run.top1_subset

    test = load_cifar10_npz(cifar_dir, "test")
    for source in (exp.weights, exp.manifest, tmp_path / "ref"):
        model, info = load_reference(source)
        assert not model.training and info.input_size == 32
        assert evaluate_reference(model, test.images, test.labels) == manifest["export_check"]["top1_first1000"]
    trained, _ = load_reference(run.checkpoint)  # a training checkpoint loads too (fp32)
    x = preprocess_uint8(test.images[:8], info)
    with torch.no_grad():
        assert torch.allclose(model(x), trained(x), atol=2e-2)
    assert abs(exp.top1_subset - run.top1_subset) <= 0.02  # fp16 rounding moves at most a couple of images


def test_missing_and_unknown_references_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr("mergeseek.eval.reference.REFERENCE_DIR", tmp_path)
    assert not reference_available("reference-tiny")
    with pytest.raises(WeightsUnavailableError, match="train_reference"):
        load_reference("reference-tiny")
    with pytest.raises(ConfigError, match="reference-cifar10"):
        load_reference("resnet-50")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_reference(str(tmp_path / "missing.pt"))


def test_reference_model_accepts_token_merging(one_thread):
    from mergeseek.encoders import MergeConfig, apply_merging, token_counts

    cfg = tiny(img_size=48, patch_size=4, depth=3)  # 145 tokens like the real reference, tiny width
    model = build_model(cfg).eval()
    apply_merging(model, MergeConfig.parse("r=16"))
    imgs = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    evaluate_reference(model, imgs, np.zeros(4, dtype=np.int64))
    assert token_counts(model) == [129, 113, 97]


def test_cli_train_reference_passes_its_options_through(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from mergeseek import cli
    from mergeseek.eval.train_reference import ExportResult

    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return ExportResult(weights=tmp_path / "w.pt", manifest=tmp_path / "w.json", top1_subset=0.5)

    monkeypatch.setattr("mergeseek.eval.train_reference.run", fake_run)
    res = CliRunner().invoke(cli.app, ["train-reference", "--data", "d", "--out", "o", "--epochs", "7", "--set",
                                       "lr=5e-4", "--limit", "100", "--no-compile", "--time-budget", "60",
                                       "--export", "o/last.pt", "--to", "x"])
    assert res.exit_code == 0, res.output
    assert "top-1 0.5000" in res.output
    assert (seen["data"], seen["out"], seen["epochs"], seen["overrides"], seen["limit"]) == ("d", "o", 7, "lr=5e-4", 100)
    assert (seen["compile"], seen["time_budget"], seen["export"], seen["to"]) == (False, 60.0, "o/last.pt", "x")


# ------------------------------------------------------------------------------- committed checkpoint
@pytest.mark.slow  # about 20 s on 2 CPU cores: 1,000 images through the 145-token model
def test_committed_reference_reproduces_its_recorded_accuracy():
    manifest_path = REFERENCE_DIR / "reference-cifar10.json"
    if not manifest_path.is_file():
        pytest.skip(f"no committed reference at {manifest_path} (train and export it first)")
    if not (SHARED_CIFAR / "test_jpeg.npz").is_file():
        pytest.skip(f"CIFAR-10 test pack not found at {SHARED_CIFAR}")
    manifest = json.loads(manifest_path.read_text())
    recorded = (manifest.get("export_check") or {}).get("top1_first1000", manifest["top1_first1000"])
    model, info = load_reference("reference-cifar10")
    test = load_cifar10_npz(SHARED_CIFAR, "test", limit=1000)
    top1 = evaluate_reference(model, test.images, test.labels, batch_size=250, preprocess=info)
    assert abs(top1 - recorded) <= 0.005, f"offline top-1 {top1:.4f} vs recorded {recorded:.4f}"


def test_init_from_another_reference_resamples_the_position_embeddings(tmp_path, one_thread):
    """train-reference --init: every weight copied, the position grid resampled to the new input
    size (the class token's embedding kept), the source recorded."""
    from mergeseek.eval.reference import EXPORT_FORMAT, build_model, get_config, init_from

    src_cfg = get_config("reference-tiny")
    torch.manual_seed(0)
    src = build_model(src_cfg)
    path = tmp_path / "src.pt"
    torch.save({"format": EXPORT_FORMAT, "config": src_cfg.to_dict(), "state_dict": src.state_dict()}, path)
    dst = build_model(src_cfg.with_overrides("img_size=48,name=reference-tiny"))  # 6 x 6 patches instead of 4 x 4
    record = init_from(dst, path)
    assert record["path"] == str(path) and len(record["sha256"]) == 64
    for name, value in src.state_dict().items():
        if name != "pos_embed":
            torch.testing.assert_close(dst.state_dict()[name], value)
    assert dst.pos_embed.shape == (1, 37, 32)
    torch.testing.assert_close(dst.pos_embed[:, :1], src.pos_embed[:, :1])  # the class token's, untouched
    grid = dst.pos_embed[0, 1:].reshape(6, 6, 32)
    # a constant grid stays constant under resampling: a check independent of the interpolation
    const = build_model(src_cfg)
    with torch.no_grad():
        const.load_state_dict(src.state_dict())
        const.pos_embed[:, 1:] = 0.25
    torch.save({"format": EXPORT_FORMAT, "config": src_cfg.to_dict(), "state_dict": const.state_dict()}, path)
    init_from(dst, path)
    torch.testing.assert_close(dst.pos_embed[0, 1:], torch.full((36, 32), 0.25))
    assert grid.shape == (6, 6, 32)
