"""Issue #31: the synth-detection generator, the mAP implementation, the detector contract and its
evaluation, on tiny sets composed from scikit-image's photos (no ../shared data, CPU only)."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest

from mergeseek.errors import WeightsUnavailableError
from mergeseek.eval.datasets.detection import (DetectionSpec, generate, load_sources, load_synth_detection, picture,
                                               sources_from_arrays)
from mergeseek.eval.detection_metrics import average_precision, box_iou

SPEC = DetectionSpec(size=64, side=(12, 28), test_pictures=6)


def _crops(photo: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = photo.shape[:2]
    out = []
    for _ in range(n):
        y, x = int(rng.integers(h - 64)), int(rng.integers(w - 64))
        out.append(np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(
            np.ascontiguousarray(photo[y:y + 64, x:x + 64])).resize((32, 32))))
    return np.stack(out)


@pytest.fixture(scope="module")
def sources(photos):
    """Backgrounds: astronaut, coffee, rocket (train) and chelsea (test); objects: 32 x 32 crops of
    the same photos, labelled by photo (3 classes), different crops per split."""
    train_bg = [photos[0], photos[2], photos[3]]
    objs = [_crops(p, 4, i) for i, p in enumerate((photos[0], photos[2], photos[3]))]
    test_objs = [_crops(p, 2, 10 + i) for i, p in enumerate((photos[0], photos[2], photos[3]))]
    return sources_from_arrays(train_bg, [photos[1]], np.concatenate(objs), np.repeat(np.arange(3), 4),
                               np.concatenate(test_objs), np.repeat(np.arange(3), 2), ("astronaut", "coffee", "rocket"))


# ---------------------------------------------------------------------------- the data set
def test_same_seed_same_pictures_and_boxes(sources):
    a = generate(SPEC, sources, "test", 5)
    b = generate(SPEC, sources, "test", 5)
    for name in ("boxes", "labels", "offsets"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.images.array.tobytes() == b.images.array.tobytes()
    other = generate(DetectionSpec(size=64, side=(12, 28), seed=1), sources, "test", 5)
    assert other.images.array.tobytes() != a.images.array.tobytes()
    # picture i does not depend on which others are generated with it
    assert np.array_equal(generate(SPEC, sources, "test", 2, start=3).images.array, a.images.array[3:5])


def test_every_picture_holds_1_to_6_whole_non_overlapping_objects(sources):
    ds = generate(SPEC, sources, "train", 12)
    counts = np.diff(ds.offsets)
    assert counts.min() >= 1 and counts.max() <= 6 and counts.sum() == len(ds.labels)
    for i in range(len(ds)):
        boxes, labels = ds.targets(i)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        iou = box_iou(boxes, boxes)
        assert np.allclose(iou, np.eye(len(boxes)))  # no two boxes overlap
        assert set(labels.tolist()) <= {0, 1, 2}


def test_a_pasted_object_fills_its_box(sources):
    """The box's pixels are the object's (resized) pixels, not the background's: re-render the
    picture's first object by the documented recipe and compare."""
    canvas, boxes, labels = picture(SPEC, sources, "test", 0)
    x0, y0, x1, y1 = boxes[0].astype(int)
    patch = canvas[y0:y1, x0:x1].astype(int)
    from PIL import Image

    options = [np.asarray(Image.fromarray(o).resize((x1 - x0, y1 - y0), Image.BILINEAR)).astype(int)
               for o, lab in zip(sources.objects["test"], sources.labels["test"]) if lab == labels[0]]
    assert any(np.array_equal(patch, o) or np.array_equal(patch, o[:, ::-1]) for o in options)


def _write_sources(root, photos):
    """A data folder in the real layout: 10 background photos (coco_captions) and a CIFAR-10 pack."""
    from PIL import Image

    (root / "coco_captions" / "images").mkdir(parents=True)
    for i in range(10):
        Image.fromarray(photos[i % 4]).resize((96 + 8 * i, 80)).save(root / "coco_captions" / "images" / f"{i:03d}.jpg")
    (root / "cifar10").mkdir()
    for split, seed in (("train", 0), ("test", 1)):
        crops = _crops(photos[seed], 10, seed)
        blobs = []
        for c in crops:
            buf = io.BytesIO()
            Image.fromarray(c).save(buf, format="JPEG", quality=95)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        offsets = np.cumsum([0] + [len(b) for b in blobs])
        np.savez(root / "cifar10" / f"{split}_jpeg.npz", jpeg=np.concatenate(blobs), offsets=offsets,
                 labels=np.arange(10) % 10)


def test_real_layout_split_pools_and_cache(tmp_path, photos):
    root = tmp_path / "data"
    _write_sources(root, photos)
    spec = DetectionSpec(size=64, side=(12, 28), test_pictures=4)
    src = load_sources(root, spec)
    assert len(src.backgrounds["train"]) == 8 and len(src.backgrounds["test"]) == 2  # every 5th photo is test
    test_shapes = {bg.shape for bg in src.backgrounds["test"]}
    train_shapes = {bg.shape for bg in src.backgrounds["train"]}
    assert not test_shapes & train_shapes  # each photo has its own width here: the pools share none
    cache = tmp_path / "cache"
    first = load_synth_detection(cache, root, "test", spec)
    files = list(cache.rglob("test.npz"))
    assert len(files) == 1 and len(first) == 4
    again = load_synth_detection(cache, root, "test", spec)  # read back from the cache
    assert again.images.array.tobytes() == first.images.array.tobytes()
    assert np.array_equal(again.boxes, first.boxes) and again.source == str(files[0])
    # a changed source file is another set (a new key)
    from PIL import Image

    Image.fromarray(photos[0]).resize((50, 50)).save(root / "coco_captions" / "images" / "000.jpg")
    load_synth_detection(cache, root, "test", spec)
    assert len(list(cache.rglob("test.npz"))) == 2


# ---------------------------------------------------------------------------- mAP
def _gt(*items):
    boxes = np.array([b for b, _ in items], dtype=float).reshape(-1, 4)
    return boxes, np.array([c for _, c in items])


def test_map_perfect_missing_and_no_detections():
    gt = [_gt(((0, 0, 10, 10), 0), ((20, 20, 40, 40), 0)), _gt(((5, 5, 25, 25), 1))]
    perfect = [[(0, 0.9, (0, 0, 10, 10)), (0, 0.8, (20, 20, 40, 40))], [(1, 0.7, (5, 5, 25, 25))]]
    got = average_precision(perfect, gt, 2)
    assert got["map50"] == 1.0 and got["map"] == 1.0
    missing = [[(0, 0.9, (0, 0, 10, 10))], [(1, 0.7, (5, 5, 25, 25))]]
    # class 0: recall reaches 0.5 at precision 1 -> the 51 recall points 0..0.50 score 1, the rest 0
    assert average_precision(missing, gt, 2)["per_class50"][0] == pytest.approx(51 / 101)
    none = average_precision([[], []], gt, 2)
    assert none["map50"] == 0.0 and none["map"] == 0.0


def test_map_of_a_shifted_box_counts_only_the_thresholds_it_passes():
    gt = [_gt(((0, 0, 100, 100), 0))]
    shifted = [[(0, 0.9, (0, 0, 100, 62))]]  # IoU 0.62: passes .50, .55, .60 of the ten thresholds
    assert box_iou(np.array([[0, 0, 100, 62]]), np.array([[0, 0, 100, 100]]))[0, 0] == pytest.approx(0.62)
    got = average_precision(shifted, gt, 1)
    assert got["map50"] == 1.0 and got["map"] == pytest.approx(0.3)
    far = [[(0, 0.9, (0, 0, 100, 40))]]  # IoU 0.4
    assert average_precision(far, gt, 1)["map50"] == 0.0


def test_map_duplicates_and_ranking():
    gt = [_gt(((0, 0, 10, 10), 0))]
    dup_after = [[(0, 0.9, (0, 0, 10, 10)), (0, 0.8, (0, 0, 10, 10))]]  # the duplicate is a false positive...
    assert average_precision(dup_after, gt, 1)["map50"] == 1.0  # ...ranked after the hit: AP stays 1
    fp_first = [[(0, 0.95, (50, 50, 60, 60)), (0, 0.8, (0, 0, 10, 10))]]
    assert average_precision(fp_first, gt, 1)["map50"] == pytest.approx(0.5)
    gt2 = [_gt(((0, 0, 10, 10), 0), ((20, 20, 30, 30), 0))]
    ranked = [[(0, 0.9, (0, 0, 10, 10)), (0, 0.8, (60, 60, 70, 70)), (0, 0.7, (20, 20, 30, 30))]]
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> envelope 1 up to recall .5, 2/3 after
    assert average_precision(ranked, gt2, 1)["map50"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    # the wrong class finds nothing; a class without ground truth is left out of the mean
    wrong = [[(1, 0.9, (0, 0, 10, 10))]]
    got = average_precision(wrong, gt, 3)
    assert got["per_class50"][0] == 0.0 and np.isnan(got["per_class50"][1]) and got["map50"] == 0.0


def test_map_size_range_ignores_what_is_out_of_range():
    gt = [_gt(((0, 0, 10, 10), 0), ((20, 20, 60, 60), 0))]
    dets = [[(0, 0.9, (20, 20, 60, 60))]]  # finds the large box only
    assert average_precision(dets, gt, 1, area_range=(0, 20 ** 2))["map50"] == 0.0
    assert average_precision(dets, gt, 1, area_range=(20 ** 2, 1e9))["map50"] == 1.0
    assert average_precision(dets, gt, 1)["map50"] == pytest.approx(51 / 101)


# ---------------------------------------------------------------------------- the detector
def test_targets_decoded_back_are_the_ground_truth(sources):
    """make_targets -> logits that peak at the targets -> decode: the boxes come back, mAP 1."""
    import torch

    from mergeseek.eval.detector_reference import decode, get_detector_config
    from mergeseek.eval.detector_train import make_targets

    cfg = get_detector_config("reference-detector-tiny")  # 4 x 4 grid on 64 px pictures: 16 px cells
    spec = DetectionSpec(size=64, side=(20, 30), objects=(1, 2), seed=3)
    ds = generate(spec, sources, "test", 6)
    gts = [ds.targets(i) for i in range(len(ds))]
    heat, reg, mask = make_targets([g[0] for g in gts], [g[1] for g in gts], cfg, 64)
    assert int(mask.sum()) == len(ds.labels)
    logits = torch.logit(heat.clamp(1e-4, 1 - 1e-4)).masked_fill(heat < 1, -20.0)
    scores, cls, boxes = decode(logits, reg, cfg)
    found = [[(int(c), float(s), tuple((b * 2).tolist())) for s, c, b in zip(si, ci, bi) if s > 0.5]
             for si, ci, bi in zip(scores, cls, boxes)]  # model input 32 px -> picture 64 px
    for dets, (boxes_gt, labels_gt) in zip(found, gts):
        assert sorted(d[0] for d in dets) == sorted(labels_gt.tolist())
        for c, _, box in dets:
            assert box_iou(np.array([box]), boxes_gt[labels_gt == c]).max() > 0.99
    assert average_precision(found, gts, 3)["map"] == pytest.approx(1.0)


def test_missing_weights_are_one_line(tmp_path):
    from mergeseek.eval.detector_reference import load_reference_detector

    with pytest.raises(WeightsUnavailableError) as err:
        load_reference_detector(tmp_path / "nothing.pt")
    assert "\n" not in str(err.value) and "train-reference --config reference-detector" in str(err.value)


def test_train_resume_export_and_detect(tmp_path, sources):
    """The tiny detector trains, resumes, exports fp16 weights and keeps the detect() contract."""
    import torch
    from PIL import Image

    from mergeseek.eval.detector_reference import DetectorConfig, load_reference_detector, read_detector_weights
    from mergeseek.eval.detector_train import export_detector, train_detector

    cfg = DetectorConfig.parse("reference-detector-tiny")
    spec = DetectionSpec(size=cfg.picture_size, side=(12, 28))
    test = generate(spec, sources, "test", 4)
    out = tmp_path / "run"
    first = train_detector(tmp_path, out, cfg, sources=sources, spec=spec, test=test, command="test",
                           time_budget_s=0.0)  # stops after its first epoch
    assert first.epochs_done == 1 and not first.complete
    done = train_detector(tmp_path, out, cfg, sources=sources, spec=spec, test=test, command="test")
    assert done.epochs_done == 2 and done.complete and len(done.history) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["epochs"] == 2
    if not torch.cuda.is_available():  # device auto: the CPU here, named with its cores and threads
        assert manifest["device"].startswith("cpu (") and "torch threads" in manifest["device"]
    res = export_detector(out / "last.pt", tmp_path / "ref")
    from mergeseek.eval.train_reference import describe

    said = describe(res)  # the detector's export is scored by mAP, not top-1
    assert said.endswith(f"(mAP@0.5 on 4 test pictures: {done.history[-1]['map50_test']:.4f})") and "top-1" not in said, said
    blob = torch.load(res.weights, weights_only=True)
    assert all(v.dtype == torch.float16 for v in blob["state_dict"].values() if v.is_floating_point())
    model, _ = read_detector_weights(res.weights)
    trained = torch.load(out / "last.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k].half().float())
    det = load_reference_detector(res.weights)
    assert det.labels == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    images = [Image.fromarray(sources.backgrounds["test"][0]).resize((90, 50)), Image.new("L", (40, 70))]
    found = det.detect(images, min_score=0.0)
    assert len(found) == 2 and det.detect([]) == []
    for dets, im in zip(found, images):
        assert dets and dets == sorted(dets, key=lambda d: -d[1])
        for label, score, (x0, y0, x1, y1) in dets:
            assert label in det.labels and 0.0 <= score <= 1.0
            assert 0 <= x0 <= x1 <= im.width and 0 <= y0 <= y1 <= im.height
    high = det.detect(images, min_score=0.12)
    assert all(d[1] >= 0.12 for dets in high for d in dets)
    merged = load_reference_detector(res.weights, merge="r=2")
    assert merged.model.backbone._merge_cfg.unmerge  # the head needs the grid: unmerge implied
    assert [len(d) for d in merged.detect(images, min_score=0.0)] == [len(d) for d in found]


def test_eval_every_scores_every_nth_epoch_and_always_the_last(tmp_path, sources):
    from mergeseek.eval.detector_reference import DetectorConfig
    from mergeseek.eval.detector_train import train_detector

    cfg = dataclasses.replace(DetectorConfig.parse("reference-detector-tiny"), epochs=3, steps_per_epoch=1)
    spec = DetectionSpec(size=cfg.picture_size, side=(12, 28))
    test = generate(spec, sources, "test", 2)
    done = train_detector(tmp_path, tmp_path / "run", cfg, sources=sources, spec=spec, test=test, eval_every=2)
    assert [("map50_test" in h) for h in done.history] == [False, True, True]  # epoch 2, then the last
    assert done.top1_test == done.history[-1]["map50_test"]
    cut = train_detector(tmp_path, tmp_path / "cut", cfg, sources=sources, spec=spec, test=test, eval_every=5,
                         time_budget_s=0.0)  # stopped by the budget after epoch 1: scored, so the manifest is its own
    assert len(cut.history) == 1 and "map50_test" in cut.history[0] and not cut.complete


@pytest.mark.parametrize("config,args,named", [
    ("reference-detector", ["--batch-size", "8"], "--batch-size does not apply to --config reference-detector"),
    ("reference-detector", ["--device", "cuda", "--stop-after", "2"], "--stop-after does not apply"),
    ("reference-detector", ["--eval-limit", "50"], "--set eval_pictures=N"),
    ("reference-speech", ["--eval-every", "2"], "--eval-every does not apply to --config reference-speech"),
    ("reference-speech", ["--init", "reference-cifar10"], "--init does not apply"),
])
def test_train_reference_refuses_options_the_trainer_does_not_read(tmp_path, config, args, named):
    from typer.testing import CliRunner

    from mergeseek.cli import app

    res = CliRunner().invoke(app, ["train-reference", "--config", config, "--data", str(tmp_path), "--out",
                                   str(tmp_path / "run"), *args])
    assert res.exit_code != 0 and named in res.output + (res.stderr or ""), res.output
    assert not (tmp_path / "run").exists()  # refused before anything is read or written


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_device_cpu_or_auto_passes_the_option_check(tmp_path, device):
    from mergeseek.eval.train_reference import run

    from mergeseek.errors import InputError

    with pytest.raises(InputError, match="synth-detection needs background photos"):  # past the option check
        run(data=str(tmp_path), out=str(tmp_path / "run"), config="reference-detector", device=device)


@pytest.mark.parametrize("config", ["reference-detector", "reference-speech"])
@pytest.mark.parametrize("device,said", [("cuda", "no CUDA device is present"), ("cuda:1", "no CUDA device is present"),
                                         ("tpu", "is not valid")])
def test_a_device_that_is_not_there_is_refused_before_any_data_is_read(tmp_path, monkeypatch, config, device, said):
    """The detector and speech trainers take --device (CUDA when present); one that is missing or
    misspelt is one line, before the data folder is looked at."""
    import torch
    from typer.testing import CliRunner

    from mergeseek.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    res = CliRunner().invoke(app, ["train-reference", "--config", config, "--data", str(tmp_path / "absent"),
                                   "--out", str(tmp_path / "run"), "--device", device])
    assert res.exit_code != 0 and said in res.output + (res.stderr or ""), res.output
    assert "does not apply" not in res.output and not (tmp_path / "run").exists()


def test_evaluation_rows_of_a_detector(sources):
    from mergeseek.encoders.config import MergeConfig
    from mergeseek.eval.candidates import merged_models
    from mergeseek.eval.detection_eval import evaluate_detection, load_detector_under_test

    mut = load_detector_under_test("reference-detector-tiny", "cpu", "fp32")
    assert not mut.meaningful and mut.kind == "detector"
    merges = mut.adapt_merges([MergeConfig.parse(s) for s in ("none", "r=2", "r=2,method=lsh")])
    assert [str(m) for m in merges] == ["none", "method=bipartite,r=2,unmerge=on", "method=lsh,r=2,unmerge=on"]
    ds = generate(SPEC, sources, "test", 5)
    res = evaluate_detection(mut, merged_models(mut.base, merges), ds, batch_size=2)
    assert res.kind == "detection" and res.primary == "map50" and res.n_images == 5
    assert [r.config for r in res.results] == [str(m) for m in merges]
    for r in res.results:
        assert set(r.metrics) == {"map50", "map", "map50_small", "map50_medium", "map50_large"}
        assert 0.0 <= r.metrics["map50"] <= 1.0


def test_a_spread_patch_kernel_equals_average_pooling_then_the_original():
    """init from a 4 px-patch reference into an 8 px-patch detector: same grid, the kernel spread
    over 2 x 2 blocks computes avg_pool(2) followed by the original patch embedding."""
    import torch
    import torch.nn.functional as F

    from mergeseek.errors import ConfigError
    from mergeseek.eval.detector_train import resample_patch_kernel

    torch.manual_seed(0)
    w = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    for k in (1, 2, 3):
        spread = resample_patch_kernel(w, (6, 3, 4 * k, 4 * k))
        assert spread.shape == (6, 3, 4 * k, 4 * k)
        torch.testing.assert_close(F.conv2d(x[..., : 12 * k, : 12 * k], spread, stride=4 * k),
                                   F.conv2d(F.avg_pool2d(x[..., : 12 * k, : 12 * k], k), w, stride=4))
    with pytest.raises(ConfigError, match="multiple of the reference's"):
        resample_patch_kernel(w, (6, 3, 6, 6))


def test_head_learning_rate_scale_reaches_the_optimizer(sources):
    """Every trainable parameter sits in exactly one AdamW group; after a step the head's groups run
    at head_lr_scale times the backbone's rate, biases and norms without weight decay."""
    import dataclasses

    from mergeseek.eval.detector_reference import DetectorConfig, build_detector
    from mergeseek.eval.detector_train import _train_epoch, detector_param_groups

    cfg = dataclasses.replace(DetectorConfig.parse("reference-detector-tiny"), head_lr_scale=4.0, steps_per_epoch=1,
                              batch_size=2)
    model = build_detector(cfg)
    groups = detector_param_groups(model, cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    import torch

    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    _, lr = _train_epoch(model, opt, cfg, DetectionSpec(size=cfg.picture_size, side=(12, 28)), sources, 0)
    head = {id(p) for n, p in model.named_parameters() if not n.startswith("backbone.")}
    for g in opt.param_groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1
        assert g["lr"] == pytest.approx(lr * (4.0 if in_head.pop() else 1.0))
        assert (g["weight_decay"] == 0.0) == all(p.ndim <= 1 or p.ndim == 3 for p in g["params"])


@pytest.mark.gpu
def test_the_detector_trains_on_cuda_and_resumes_on_the_cpu(tmp_path, sources):
    """An epoch on the GPU, the next on the CPU from the same checkpoint; the GPU's pictures are the
    CPU's (drawn on the CPU), its loss finite, its manifest names the GPU."""
    import math

    import torch

    from mergeseek.eval.detector_reference import DetectorConfig
    from mergeseek.eval.detector_train import train_detector

    cfg = DetectorConfig.parse("reference-detector-tiny")
    spec = DetectionSpec(size=cfg.picture_size, side=(12, 28))
    test = generate(spec, sources, "test", 4)
    out = tmp_path / "run"
    first = train_detector(tmp_path, out, cfg, sources=sources, spec=spec, test=test, time_budget_s=0.0, device="cuda")
    assert first.epochs_done == 1 and math.isfinite(first.history[0]["loss"])
    assert json.loads((out / "manifest.json").read_text())["device"] == torch.cuda.get_device_name(0)
    cpu = train_detector(tmp_path, tmp_path / "cpu", cfg, sources=sources, spec=spec, test=test, time_budget_s=0.0,
                         device="cpu")
    assert abs(cpu.history[0]["loss"] - first.history[0]["loss"]) < 0.05 * abs(cpu.history[0]["loss"])
    done = train_detector(tmp_path, out, cfg, sources=sources, spec=spec, test=test, device="cpu")
    assert done.epochs_done == 2 and done.complete and math.isfinite(done.history[1]["loss"])
