"""End to end: ``evaluate`` on a tiny keyframe set and a tiny image set writes a report whose
numbers agree with an independent recomputation; plots are valid PNGs; the CLI passes its
options through."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

MERGES = ("r=8", "r=8,method=lsh")
BATCH = 4


# One intra-op thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def clip_b32():
    """Random-weight ViT-B-32, loaded once; the evaluator only ever merges copies of it."""
    from mergeseek.eval.models import load_model

    return load_model("ViT-B-32", None, "cpu")


@pytest.fixture()
def tiny_sets(tmp_path, photos):
    """A keyframe set (AI Challenge layout, 2 videos) and an ImageFolder set (3 classes)."""
    crops = []
    for p in photos:  # 4 real photos -> 2 crops each, small so preprocessing is cheap
        h, w = p.shape[:2]
        crops += [p[: h // 2, : w // 2], p[h // 2 :, w // 2 :]]
    crops = [np.asarray(Image.fromarray(c).resize((64, 64))) for c in crops]
    kf = tmp_path / "aic"
    (kf / "map-keyframes").mkdir(parents=True)
    videos = {"L01_V001": [0, 40, 80], "L01_V002": [12, 60, 99]}
    k = 0
    for v, frames in videos.items():
        with open(kf / "map-keyframes" / f"{v}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["n", "pts_time", "fps", "frame_idx"])
            for n, f in enumerate(frames, start=1):
                w.writerow([n, f / 25, 25, f])
                (kf / "keyframes" / v).mkdir(parents=True, exist_ok=True)
                Image.fromarray(crops[k]).save(kf / "keyframes" / v / f"{n:03d}.jpg")
                k += 1
    queries = [
        {"id": "q1", "query": "an astronaut", "video_id": "L01_V001", "frame_idx": 40},
        {"id": "q2", "query": "a cat", "video_id": "L01_V002", "frame_start": 50, "frame_end": 100},
        {"id": "q3", "query": "a cup of coffee", "video_id": "L01_V002", "frame_idx": 13},
    ]
    (kf / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    folder = tmp_path / "classes"
    for ci, cls in enumerate(("astronaut", "cat", "coffee_cup")):
        (folder / cls).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(crops[2 * ci + j]).save(folder / cls / f"{j}.png")
    return f"keyframes:{kf}", f"imagefolder:{folder}"


def _is_png(path) -> bool:
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        return im.size[0] > 100 and im.size[1] > 100


def test_end_to_end_report_agrees_with_recomputation(tmp_path, tiny_sets, clip_b32, monkeypatch):
    import mergeseek.eval.runner
    from mergeseek import eval
    from mergeseek.encoders import Encoder
    from mergeseek.eval import EvalConfig, evaluate
    from mergeseek.eval.candidates import merged_encoders
    from mergeseek.eval.datasets import load_dataset
    from mergeseek.eval.timing import flop_ratio

    monkeypatch.setattr(eval.runner, "load_model", lambda *a, **k: clip_b32)
    kf_spec, img_spec = tiny_sets
    cfg = EvalConfig(models=("ViT-B-32",), pretrained=None, datasets=(kf_spec, img_spec), merges=MERGES,
                     batch_size=BATCH, warmup=0, iters=2, topk=3, device="cpu")
    out = evaluate(cfg, tmp_path / "out")
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    md = (tmp_path / "out" / "report.md").read_text()

    # --- the run is described and flagged as random weights
    assert rep["config"]["merge_configs"] == ["none", "method=bipartite,r=8", "method=lsh,r=8"]
    assert "random weights" in " ".join(rep["notes"]) and "meaningless" in md
    assert rep["environment"]["torch"] and rep["environment"]["cpu_count"]
    (model,) = rep["models"]
    assert model["model"]["model"] == "ViT-B-32" and model["model"]["weights_meaningful"] is False

    # --- independent recomputation through encoders.Encoder (model.encode_image, not visual())
    base = Encoder(model_name="ViT-B-32", pretrained=None, device="cpu", merge="none", batch_size=BATCH,
                   model=clip_b32.clip, preprocess=clip_b32.preprocess, tokenizer=clip_b32.tokenizer)
    encoders = {"none": base, **merged_encoders(base, MERGES)}
    kf = load_dataset(kf_spec)
    imgs = load_dataset(img_spec)
    by_name = {d["dataset"]: d for d in model["datasets"]}

    def load_all(ds):
        return [ds.images.load(i) for i in range(len(ds.images))]

    kf_images, cls_images = load_all(kf), load_all(imgs)
    q = base.encode_texts([x.text for x in kf.queries])
    w = base.encode_texts([f"a photo of a {c}." for c in imgs.classes])
    emb_kf = {n: e.encode_images(kf_images) for n, e in encoders.items()}
    emb_cls = {n: e.encode_images(cls_images) for n, e in encoders.items()}
    for name in encoders:
        kres = next(r for r in by_name["keyframes"]["results"] if r["config"] == name)
        scores = q @ emb_kf[name].T
        ranks, vranks = [], []
        for qi, query in enumerate(kf.queries):
            order = sorted(range(scores.shape[1]), key=lambda j: -scores[qi, j])
            ranks.append(1 + min(order.index(j) for j in query.relevant))
            vbest = {}
            for j in order:  # videos in order of their best frame
                vbest.setdefault(kf.video_ids[j], len(vbest))
            vranks.append(1 + vbest[query.video_id])
        for k in (1, 5, 10):
            assert kres["metrics"][f"R@{k}"] == pytest.approx(np.mean([r <= k for r in ranks]))
            assert kres["metrics"][f"video_R@{k}"] == pytest.approx(np.mean([r <= k for r in vranks]))
        assert kres["metrics"]["MRR"] == pytest.approx(np.mean([1 / r for r in ranks]))
        cos = np.sum(emb_kf[name] * emb_kf["none"], axis=1)
        assert kres["agreement"]["cos_mean"] == pytest.approx(cos.mean(), abs=1e-4)

        cres = next(r for r in by_name["imagefolder"]["results"] if r["config"] == name)
        pred = np.argmax(emb_cls[name] @ w.T, axis=1)
        assert cres["metrics"]["top1"] == pytest.approx(np.mean(pred == imgs.labels))
        assert cres["agreement"]["pred_agree"] == pytest.approx(np.mean(pred == np.argmax(emb_cls["none"] @ w.T, axis=1)))
    # merging changes the embedding but keeps it close
    assert 0.5 < by_name["imagefolder"]["results"][1]["agreement"]["cos_mean"] < 1.0 - 1e-6

    # --- timing, token counts and FLOP ratios
    for name, t in model["timing"].items():
        assert t["batches"] == 2 and t["batch_size"] == BATCH and len(t["times_ms"]) == 2
        assert t["images_per_s"] == pytest.approx(BATCH / (np.median(t["times_ms"]) / 1000))
        assert model["speedup"][name] == pytest.approx(t["images_per_s"] / model["timing"]["none"]["images_per_s"])
    assert model["tokens"]["none"] == [50] * 12
    for name in ("method=bipartite,r=8", "method=lsh,r=8"):
        toks = model["tokens"][name]
        assert toks == model["merge_stats"][name]["tokens"]  # the patch's own record of the timed forward
        assert toks[0] == 50 - 8 and all(a >= b for a, b in zip(toks, toks[1:])) and len(toks) == 12
        assert model["flop_ratio"][name] == pytest.approx(flop_ratio(model["tokens"][name], [50] * 12, 768))
        assert model["flop_ratio"][name] > 1.5

    # --- markdown and plots
    for name in rep["config"]["merge_configs"]:
        assert f"`{name}`" in md
    pngs = [p for p in out.paths if p.suffix == ".png"]
    assert {p.name for p in pngs} == {"speed_ViT-B-32.png", "tradeoff_ViT-B-32_keyframes.png",
                                      "tradeoff_ViT-B-32_imagefolder.png"}
    assert all(_is_png(p) for p in pngs)
    assert "| `none` |" in "\n".join(out.summary_lines())


def test_reference_classifier_scored_with_its_own_head(tmp_path, monkeypatch):
    """The CIFAR-10 reference (tiny config, random weights) on a CIFAR-10 pack: top-1 equals
    eval.reference.evaluate_reference on the same images, merged and unmerged agree on timing keys."""
    import torch

    import mergeseek.eval.runner

    from mergeseek import eval
    from mergeseek.eval import EvalConfig, evaluate
    from mergeseek.eval.models import load_model
    from mergeseek.eval.reference import evaluate_reference, load_cifar10_npz

    blobs, labels = [], []
    rng = np.random.default_rng(0)
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        labels.append(i % 10)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(tmp_path / "test_jpeg.npz", jpeg=np.concatenate(blobs), offsets=offsets, labels=np.asarray(labels))

    torch.manual_seed(0)
    mut = load_model("reference-tiny", None, "cpu")
    with torch.no_grad():  # a random head that is not ~constant, so the check is not trivial
        mut.base.head.weight.normal_(0, 1.0)
    monkeypatch.setattr(eval.runner, "load_model", lambda *a, **k: mut)
    cfg = EvalConfig(models=("reference-tiny",), pretrained=None, datasets=(f"cifar10:{tmp_path}",),
                     merges=("r=2", "r=2,method=lsh"), batch_size=5, warmup=0, iters=1, plots=False)
    rep = evaluate(cfg, tmp_path / "out").report
    ds = rep.models[0].datasets[0]
    assert ds.protocol == "own 10-way head"
    split = load_cifar10_npz(tmp_path, "test")
    expect = evaluate_reference(mut.base, split.images, split.labels)
    assert ds.result("none").metrics["top1"] == pytest.approx(expect)
    assert not (tmp_path / "out" / "tradeoff_reference-tiny_cifar10.png").exists()


def test_cli_eval_passes_options(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import mergeseek.eval as eval_pkg
    from mergeseek.cli import app

    seen = {}

    class Outcome:
        def summary_lines(self):
            return ["TABLE"]

        def to_dict(self):
            return {"table": "TABLE"}

    def fake(cfg, out_dir, progress=False):
        seen.update(cfg=cfg, out=out_dir)
        return Outcome()

    monkeypatch.setattr(eval_pkg, "evaluate", fake)
    args = ["eval", "--model", "ViT-B-32", "--model", "ViT-B-16", "--pretrained", "none", "--dataset", "coco",
            "--merge", "r=8,method=lsh", "--sweep", "r=0:16:8", "--limit", "5", "--out", str(tmp_path), "--iters", "3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "TABLE" in res.output
    cfg = seen["cfg"]
    assert cfg.models == ("ViT-B-32", "ViT-B-16") and cfg.pretrained is None and cfg.datasets == ("coco",)
    assert [str(c) for c in cfg.merge_configs()] == ["none", "method=lsh,r=8", "method=lsh,r=0", "method=lsh,r=16"]
    assert cfg.limit == 5 and cfg.iters == 3 and seen["out"] == tmp_path

    res = CliRunner().invoke(app, ["eval", "--merge", "r=8,method=nope"])
    assert res.exit_code == 2 and "method='nope' is not valid" in res.output
