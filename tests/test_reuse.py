"""Reuse across frames (encoders/reuse/): exactness where nothing is reused, full reuse of
identical frames, cuts and refresh, per-video caches, merging on top, the index pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeseek.encoders.reuse import ReuseConfig, ReuseStream
from mergeseek.errors import ConfigError
from mergeseek.eval.datasets.video import static_clip

MERGES = ["none", "r=8", "r=8,method=lsh"]


@pytest.fixture(scope="module")
def encoders_by_merge(one_torch_thread):
    """Random-weight ViT-B-32 (50 tokens, seeded), once per merge config."""
    from mergeseek.encoders import Encoder

    return {m: Encoder(model_name="ViT-B-32", pretrained=None, device="cpu", merge=m, batch_size=8) for m in MERGES}


@pytest.fixture(scope="module")
def clip_frames(encoders_by_merge):
    """Preprocessed frames: a static scene with a moving object (6), then another photo (4)."""
    from skimage import data

    enc = encoders_by_merge["none"]
    scene = static_clip(data.coffee(), 6, fps=5.0, size=224, noise=1.0).frames
    other = static_clip(data.astronaut(), 4, fps=5.0, size=224, noise=1.0, seed=3).frames
    return enc.preprocess_images(list(scene)), enc.preprocess_images(list(other))


@pytest.fixture(scope="module")
def reference_vit(one_torch_thread):
    """The trained CIFAR-10 reference ViT (timm, 145 tokens) when its weights are in the repo, else
    the same architecture with random weights."""
    from mergeseek.eval import reference as ref

    if ref.reference_available():
        model, info = ref.load_reference()
    else:
        torch.manual_seed(0)
        model = ref.build_model(ref.get_config("reference-cifar10")).eval()
        info = ref.preprocess_info_of(model)
    return model, info


def per_frame(enc, pixels):
    return enc.encode_image_tensor(pixels)


# ---------------------------------------------------------------------------- config
def test_config_round_trips_and_bad_keys_list_the_valid_ones():
    cfg = ReuseConfig.parse("threshold=0.1,refresh=8,cut=0.4,attn=0.02")
    assert (cfg.threshold, cfg.refresh, cfg.cut, cfg.attn) == (0.1, 8, 0.4, 0.02)
    assert ReuseConfig.parse(str(cfg)) == cfg and ReuseConfig.parse("threshold=0.1").attn == 0.0
    assert str(ReuseConfig.parse("none")) == "none" and not ReuseConfig.parse(None).enabled
    assert not ReuseConfig.parse("threshold=0").enabled and not ReuseConfig.parse("refresh=1").enabled
    with pytest.raises(ConfigError, match="valid keys: threshold, refresh, cut, attn, bits, seed, max_videos, audit"):
        ReuseConfig.parse("treshold=0.1")
    for bad, words in (("refresh=0", ">= 1"), ("threshold=-1", ">= 0"), ("cut=2", "(0, 1]"), ("refresh=x", "integer"),
                       ("attn=-0.1", ">= 0"), ("attn=nan", ">= 0"),
                       ("threshold", "key=value")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("]", r"\]")):
            ReuseConfig.parse(bad)


def test_index_options_take_the_command_line_spellings_and_check_them_first():
    from mergeseek.indexing import IndexOptions
    from mergeseek.indexing.sampling import Sampling

    assert IndexOptions(sampling="fps=2").sampling == Sampling.parse("fps=2")
    with pytest.raises(ConfigError, match="valid keys"):
        IndexOptions(reuse="treshold=0.1")
    with pytest.raises(ConfigError, match="sampling"):
        IndexOptions(sampling="fps")


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("merge", MERGES)
def test_threshold_zero_equals_per_frame_encoding(encoders_by_merge, clip_frames, merge):
    enc = encoders_by_merge[merge]
    frames = torch.cat(clip_frames)
    stream = enc.stream("threshold=0")
    out = stream.encode_image_tensor(frames, ["v"] * len(frames))
    assert (out - per_frame(enc, frames)).abs().max().item() <= 1e-5
    assert stream.stats.references == len(frames) and stream.stats.reuse_rate == 0.0


@pytest.mark.parametrize("merge", MERGES)
def test_identical_frames_reuse_every_token_after_the_first(encoders_by_merge, clip_frames, merge):
    enc = encoders_by_merge[merge]
    frames = clip_frames[0][:1].repeat(5, 1, 1, 1)
    stream = enc.stream("threshold=0.05,refresh=16")
    out = stream.encode_image_tensor(frames, ["v"] * 5)
    assert torch.equal(out[1:], out[:1].expand(4, -1))
    assert (out[0] - per_frame(enc, frames[:1])[0]).abs().max().item() <= 1e-5
    st = stream.stats
    assert st.references == 1
    first = [[r // 5 for r in rows] for rows in st.rows]  # one frame's rows per block and gate
    assert st.computed == first  # only the first frame computed anything
    assert st.reuse_rate == pytest.approx(0.8)


def test_a_cut_resets_the_cache(encoders_by_merge, clip_frames):
    enc = encoders_by_merge["none"]
    scene, other = clip_frames
    frames = torch.cat([scene, other])
    stream = enc.stream("threshold=0.05,refresh=100,cut=0.5")
    out = stream.encode_image_tensor(frames, ["v"] * len(frames))
    st = stream.stats
    assert st.cuts == 1 and st.references == 2
    # The first frame after the cut is computed in full: it equals per-frame encoding.
    cut_at = len(scene)
    assert (out[cut_at] - per_frame(enc, frames[cut_at : cut_at + 1])[0]).abs().max().item() <= 1e-5
    # Frames of the static scene with a moving object stay close and reuse work.
    base = per_frame(enc, frames)
    assert (out * base).sum(-1).min().item() > 0.99
    assert st.reuse_rate > 0.2


@pytest.mark.parametrize("merge", MERGES)
def test_frames_that_are_all_cuts_equal_per_frame_and_count_every_row(encoders_by_merge, merge):
    """Four cuts in one batch or one frame per call: outputs equal per-frame encoding and every
    row of every gate counts as computed."""
    from skimage import data

    enc = encoders_by_merge[merge]
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    frames = enc.preprocess_images([p[..., :3] for p in photos])  # four unrelated frames: four cuts
    batched = enc.stream("threshold=0.05,audit=0")
    out = batched.encode_image_tensor(frames, ["v"] * 4)
    single = enc.stream("threshold=0.05,audit=0")
    out1 = torch.cat([single.encode_image_tensor(frames[i : i + 1], ["v"]) for i in range(4)])
    assert batched.stats.cuts == single.stats.cuts == 3
    assert (out - per_frame(enc, frames)).abs().max().item() <= 1e-5
    assert (out1 - out).abs().max().item() <= 1e-5
    assert batched.stats.rows == single.stats.rows and batched.stats.computed == batched.stats.rows
    assert batched.stats.reuse_rate == 0.0
    # The last reference keeps its caches: an identical next frame reuses everything.
    again = batched.encode_image_tensor(frames[3:], ["v"])
    assert torch.equal(again, out[3:]) and batched.stats.references == 4


def test_refresh_bounds_how_many_frames_reuse_one_reference(encoders_by_merge, clip_frames):
    enc = encoders_by_merge["none"]
    frames = clip_frames[0][:1].repeat(7, 1, 1, 1)
    stream = enc.stream("threshold=0.05,refresh=3")
    stream.encode_image_tensor(frames, ["v"] * 7)
    assert stream.stats.references == 3 and stream.stats.refreshes == 2  # frames 0, 3, 6


@pytest.mark.parametrize("merge", ["none", "r=8"])
def test_the_audit_measures_the_error_of_exactly_the_frames_that_reused_work(encoders_by_merge, clip_frames, merge):
    enc = encoders_by_merge[merge]
    frames = torch.cat(clip_frames)
    stream = enc.stream("threshold=0.05,refresh=4,audit=1")  # every frame that reused work is audited
    out = torch.cat([stream.encode_image_tensor(frames[s : s + 3], ["v"] * len(frames[s : s + 3]))
                     for s in range(0, len(frames), 3)])
    st = stream.finish()
    reused = st.frames - st.references
    assert reused > 0 and st.audited == reused
    # Against an independent per-frame pass over all frames: the frames computed in full agree to
    # float precision, so the audit's minimum is the minimum over all frames.
    cos = (out * per_frame(enc, frames)).sum(-1).double()
    assert st.audit_cos_min == pytest.approx(float(cos.min()), abs=1e-6)
    assert st.audit_cos_sum / st.audited <= 1.0 + 1e-9
    a = st.summary()["audit"]
    assert a["frames"] == reused and a["gain"] > 0 and a["per_frame_s"] > 0 and a["reuse_s"] > 0
    # audit=3 audits every third frame that reused work; audit=0 none (and no audit key).
    every3 = enc.stream("threshold=0.05,refresh=4,audit=3")
    every3.encode_image_tensor(frames, ["v"] * len(frames))
    assert every3.finish().audited == reused // 3
    off = enc.stream("threshold=0.05,refresh=4,audit=0")
    off.encode_image_tensor(frames, ["v"] * len(frames))
    assert off.finish().audited == 0 and "audit" not in off.stats.summary()


def test_the_audit_is_reported_per_video_with_each_videos_own_cosines(encoders_by_merge, clip_frames):
    enc = encoders_by_merge["none"]
    scene, other = clip_frames
    frames = torch.cat([scene[:4], other[:4]])
    ids = ["a"] * 4 + ["b"] * 4
    stream = enc.stream("threshold=0.05,refresh=4,cut=1,audit=1")
    out = stream.encode_image_tensor(frames, ids)
    st = stream.finish()
    cos = (out * per_frame(enc, frames)).sum(-1).double().tolist()
    reused = stream.stream.last_reused
    videos = st.summary()["audit"]["videos"]
    assert sorted(videos) == ["a", "b"]
    for vid in "ab":
        mine = [c for c, v, r in zip(cos, ids, reused) if v == vid and r]
        assert videos[vid]["frames"] == len(mine) == 3
        assert videos[vid]["cos_min"] == pytest.approx(min(mine), abs=1e-6)
        assert videos[vid]["cos_mean"] == pytest.approx(sum(mine) / len(mine), abs=1e-6)
    merged = type(st)()
    merged.merge(st)
    merged.merge(st)
    assert merged.audit_videos["a"][0] == 6 and merged.audit_videos["a"][2] == st.audit_videos["a"][2]


def test_attn_gate_trades_out_projection_work_for_error(encoders_by_merge, clip_frames):
    """attn=0 (default) recomputes every out-projection row of a moved frame; a positive attn
    reuses some of them and is never more accurate on this clip."""
    enc = encoders_by_merge["none"]
    frames = clip_frames[0]
    base = per_frame(enc, frames)
    errs, proj = {}, {}
    for spec in ("threshold=0.05", "threshold=0.05,attn=0.05"):
        stream = enc.stream(spec + ",audit=0")
        out = stream.encode_image_tensor(frames, ["v"] * len(frames))
        errs[spec] = float((1 - (out * base).sum(-1)).max())
        proj[spec] = stream.stats.gate_reuse()["proj"]
    assert proj["threshold=0.05"] == 0.0 and proj["threshold=0.05,attn=0.05"] > 0.0
    assert errs["threshold=0.05"] <= errs["threshold=0.05,attn=0.05"] + 1e-7


@pytest.mark.parametrize("merge", ["none", "r=8"])
def test_videos_in_one_batch_never_share_a_cache_and_batching_does_not_matter(encoders_by_merge, clip_frames, merge):
    enc = encoders_by_merge[merge]
    a, b = clip_frames[0], clip_frames[1]
    alone_a = enc.stream("threshold=0.05").encode_image_tensor(a, ["a"] * len(a))
    alone_b = enc.stream("threshold=0.05").encode_image_tensor(b, ["b"] * len(b))
    # Interleaved in one batch: a0 b0 a1 b1 ... then the rest of a.
    order = []
    for i in range(max(len(a), len(b))):
        if i < len(a):
            order.append(("a", i))
        if i < len(b):
            order.append(("b", i))
    pixels = torch.stack([(a if v == "a" else b)[i] for v, i in order])
    ids = [v for v, _ in order]
    for chunk in (len(order), 3, 1):
        stream = enc.stream("threshold=0.05")
        out = torch.cat([stream.encode_image_tensor(pixels[s : s + chunk], ids[s : s + chunk])
                         for s in range(0, len(order), chunk)])
        want = torch.stack([(alone_a if v == "a" else alone_b)[i] for v, i in order])
        assert (out - want).abs().max().item() <= 1e-5, chunk


def test_the_cache_is_a_hash_of_patches_not_a_pixel_compare(encoders_by_merge, clip_frames):
    """A change in one patch marks that patch only; the hash has ``bits`` bits per patch."""
    enc = encoders_by_merge["none"]
    stream = ReuseStream(enc.model, "threshold=0.05,bits=32", enc.merge)
    frame = clip_frames[0][:1]
    moved = frame.clone()
    moved[..., 32:64, 64:96] = -moved[..., 32:64, 64:96]  # exactly patch (1, 2) of the 7x7 grid
    with torch.inference_mode():
        stream.encode(torch.cat([frame, moved]), ["v", "v"])
        patches = stream.fam.patches(torch.cat([frame, moved]))
        codes = ((patches @ stream.planes) > 0).numpy()
    assert codes.shape == (2, 49, 32)
    changed = stream._changed(codes[1:], codes[0])[0]
    assert np.flatnonzero(changed).tolist() == [1 * 7 + 2]


@pytest.mark.parametrize("merge", MERGES)
def test_a_batch_reads_the_device_a_fixed_number_of_times(encoders_by_merge, clip_frames, merge):
    """The CPU-visible proxy of the CUDA path: a batch reads device values back once for planning
    (the hash codes) and once per gate (the rows it recomputes: 2 per block, block 0's q/k/v gate
    is known on the host), whatever the number of frames, videos and references in it, and runs
    no op that waits for the device (nonzero, .item(), boolean-mask indexing)."""
    from test_compile import AtenRecorder, PyRecorder, SYNC_ATEN, SYNC_PY

    enc = encoders_by_merge[merge]
    scene, other = clip_frames
    blocks = len(enc.model.visual.transformer.resblocks)
    # only dependants of a kept reference; then dependants, a new video's reference and its own
    for batch, ids, refs in ((scene[2:4], ["a", "a"], 1), (torch.cat([scene[2:], other]), ["a"] * 4 + ["b"] * 4, 2)):
        stream = enc.stream("threshold=0.05,refresh=16,audit=0")
        stream.encode_image_tensor(scene[:2], ["a", "a"])  # a kept reference for the measured batch
        aten, py = AtenRecorder(), PyRecorder()
        with torch.inference_mode(), py, aten:
            stream.encode_image_tensor(batch, ids)
        assert sum(stream.stream.last_reused) == len(ids) - (refs - 1) and stream.stats.references == refs
        assert [o for o in aten.ops if o in SYNC_ATEN] == []
        assert {c: k for c, k in py.calls.items() if c in SYNC_PY} == {"cpu": 1, "numpy": 1, "tolist": 2 * blocks - 1}


def test_an_attention_pooler_tower_reuses_too(clip_frames, one_torch_thread):
    """CoCa's image tower pools with attention poolers (one for the tokens, one contrastive): the
    stream pools through the same size-aware poolers as the merged forward, with and without r=8."""
    from mergeseek.encoders import Encoder, apply_merging, remove_merging

    enc = Encoder(model_name="coca_ViT-B-32", pretrained=None, device="cpu", merge="none", batch_size=8)
    assert enc.model.visual.attn_pool is not None
    frames = clip_frames[0]
    try:
        for merge in ("none", "r=8"):
            apply_merging(enc.model, merge)
            with torch.inference_mode():
                per = torch.nn.functional.normalize(enc.model.encode_image(frames).float(), dim=-1)
                exact = ReuseStream(enc.model, "threshold=0", merge).encode(frames, ["v"] * len(frames))
                stream = ReuseStream(enc.model, "threshold=0.05,audit=0", merge)
                out = stream.encode(frames, ["v"] * len(frames))
            exact, out = (torch.nn.functional.normalize(t.float(), dim=-1) for t in (exact, out))
            assert (exact - per).abs().max().item() <= 1e-5, merge
            assert stream.stats.reuse_rate > 0.3 and (out * per).sum(-1).min().item() > 0.99, merge
    finally:
        remove_merging(enc.model)


@pytest.mark.parametrize("name,kwargs", [("deit_tiny_distilled_patch16_224", {}),
                                         ("vit_tiny_patch16_224", {"global_pool": "max"})])
def test_timm_heads_are_the_merged_forwards_heads(name, kwargs, one_torch_thread):
    """The stream ends in the same head as the merged forward: DeiT's class + distillation head,
    size-aware max pooling; threshold=0 equals the model's own forward exactly."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=64, **kwargs).eval()
    x = torch.randn(4, 3, 64, 64)
    near = x[:1].repeat(4, 1, 1, 1) + torch.cat([torch.zeros(1, 3, 64, 64), 0.01 * torch.randn(3, 3, 64, 64)])
    with torch.inference_mode():
        assert torch.equal(ReuseStream(model, "threshold=0", "none").encode(x, ["v"] * 4), model(x))
        stream = ReuseStream(model, "threshold=0.05", "none")
        out = stream.encode(near, ["w"] * 4)
        assert stream.stats.reuse_rate > 0.5
        assert torch.nn.functional.cosine_similarity(out, model(near)).min().item() > 0.999


# ---------------------------------------------------------------------------- timm (reference ViT)
@pytest.mark.parametrize("merge", ["none", "r=8", "r=8,method=lsh"])
def test_timm_reference_vit(reference_vit, merge):
    from mergeseek.encoders import apply_merging, remove_merging
    from mergeseek.eval.datasets.video import cifar_clips
    from mergeseek.eval.reference import preprocess_uint8
    from skimage import data
    from PIL import Image

    model, info = reference_vit
    photo = np.asarray(Image.fromarray(data.chelsea()).resize((32, 32), Image.BILINEAR))
    clip = cifar_clips(photo[None], [3], frames=6, fps=5.0)[0]
    x = preprocess_uint8(np.stack(clip.frames), info)
    apply_merging(model, merge)
    try:
        with torch.inference_mode():
            base = model(x)
            exact = ReuseStream(model, "threshold=0", merge).encode(x, ["c"] * 6)
            stream = ReuseStream(model, "threshold=0.05,cut=1", merge)
            reused = stream.encode(x, ["c"] * 6)
    finally:
        remove_merging(model)
    tol = 1e-4 * max(1.0, base.abs().max().item())
    assert (exact - base).abs().max().item() <= tol  # references nobody reuses: the plain forward
    assert (reused[0] - base[0]).abs().max().item() <= tol  # the cached full forward of the reference
    assert stream.stats.references == 1 and stream.stats.reuse_rate > 0.0
    cos = torch.nn.functional.cosine_similarity(reused, base)
    assert cos.min().item() > 0.95


# ---------------------------------------------------------------------------- the index pipeline
def _write_frames(path, frames, fps=10.0):
    import cv2

    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(np.ascontiguousarray(f[..., ::-1]))
    writer.release()
    return path


def test_index_with_reuse_reports_the_reuse_and_its_audited_error(tmp_path, encoders_by_merge):
    from skimage import data

    from mergeseek.indexing import IndexOptions, index_paths
    from mergeseek.indexing.dedup import Dedup
    from test_indexing_support import index_contents

    videos = tmp_path / "videos"
    videos.mkdir()
    _write_frames(videos / "static.mp4", static_clip(data.coffee(), 12, fps=10.0, size=224, noise=1.0).frames)
    enc = encoders_by_merge["none"]
    every = dict(sampling="all", dedup=Dedup(enabled=False))
    plain = index_paths([videos], tmp_path / "plain", enc, IndexOptions(**every))
    report = index_paths([videos], tmp_path / "ix", enc, IndexOptions(reuse="threshold=0.05,refresh=4", **every))
    assert report.frames_encoded == plain.frames_encoded == 12 and report.reuse["frames"] == 12
    assert report.reuse["references"] == 3 and 0.2 < report.reuse["reuse_rate"] < 1.0  # frames 0, 4, 8
    lines = report.summary_lines()
    assert any(line.startswith("reuse threshold=0.05,refresh=4:") for line in lines)
    (per_block,) = [line for line in lines if line.startswith("reuse per block")]
    shown = per_block.split(": ", 1)[1].split(" (")[0].split()
    assert shown == [f"{v:.0%}" for v in report.reuse["block_reuse"]] and len(shown) == 12  # one per block of ViT-B-32
    assert f"MLP {report.reuse['gate_reuse']['mlp']:.0%}" in per_block
    assert report.reuse["audit_every"] == 32 and "audit" not in report.reuse  # 9 reused frames < 32
    assert any(line.startswith("reuse vs per-frame: no frame audited") for line in lines)
    # The audit only measures: another audit setting is the same recipe (nothing re-indexed).
    again = index_paths([videos], tmp_path / "ix", enc, IndexOptions(reuse="threshold=0.05,refresh=4,audit=1", **every))
    assert not again.indexed and again.up_to_date == 1
    # audit=1 audits every frame that reused work; its minimum cosine is the one between the two
    # indexes' stored vectors (per-frame vs reuse), computed here independently.
    fresh = index_paths([videos], tmp_path / "ix1", enc, IndexOptions(reuse="threshold=0.05,refresh=4,audit=1", **every))
    a = fresh.reuse["audit"]
    assert a["frames"] == 9
    rows_p, vec_p = index_contents(tmp_path / "plain")
    rows_r, vec_r = index_contents(tmp_path / "ix1")
    assert [r[2] for r in rows_p] == [r[2] for r in rows_r]  # same frames (frame_idx), same order
    cos = (vec_p * vec_r).sum(axis=1)
    assert a["cos_min"] == pytest.approx(float(cos.min()), abs=1e-5) and a["cos_min"] > 0.99
    assert any("9 audited frame(s)" in line and "cosine min" in line for line in fresh.summary_lines())
    # A different reuse setting is a different recipe: the source is indexed again.
    plain_again = index_paths([videos], tmp_path / "ix", enc, IndexOptions(**every))
    assert plain_again.indexed and plain_again.reuse == {}


def test_cli_rejects_a_bad_reuse_key(tmp_path):
    from typer.testing import CliRunner

    from mergeseek.cli import app

    result = CliRunner().invoke(app, ["index", str(tmp_path), "--reuse", "refesh=4", "--pretrained", "none"])
    assert result.exit_code != 0
    assert "valid keys: threshold, refresh" in (result.stdout + result.stderr)


@pytest.mark.parametrize("merge", ["none", "r=8"])
def test_half_precision_autocast_runs_the_gated_path(clip_frames, merge, one_torch_thread):
    """bf16 autocast on CPU mixes dtypes in the cached rows, the gathers and the residual
    correction, as fp16 does on CUDA; the stream stays close to per-frame bf16 encoding."""
    from mergeseek.encoders import Encoder

    enc = Encoder(model_name="ViT-B-32", pretrained=None, device="cpu", merge=merge, batch_size=8, precision="bf16")
    frames = torch.cat(clip_frames)
    stream = enc.stream("threshold=0.05,refresh=16,audit=0")
    out = stream.encode_image_tensor(frames, ["v"] * len(frames))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert stream.stats.reuse_rate > 0.1
    assert (out * enc.encode_image_tensor(frames)).sum(-1).min().item() > 0.98


# ---------------------------------------------------------------------------- device
@pytest.mark.gpu
def test_cuda_matches_cpu(encoders_by_merge, clip_frames):
    from mergeseek.encoders import Encoder

    frames = torch.cat(clip_frames)
    cpu = encoders_by_merge["none"].stream("threshold=0.05").encode_image_tensor(frames, ["v"] * len(frames))
    gpu_enc = Encoder(model_name="ViT-B-32", pretrained=None, device="cuda", merge="none")
    gpu = gpu_enc.stream("threshold=0.05").encode_image_tensor(frames, ["v"] * len(frames)).cpu()
    assert (gpu * cpu).sum(-1).min().item() > 0.999


# ---------------------------------------------------------------------------- cli.py eval: video sets
def test_video_set_specs():
    from mergeseek.eval.datasets.video import is_video_spec, load_video_set

    assert is_video_spec("video,fps=2") and is_video_spec("cifar10-video:/x") and not is_video_spec("cifar10")
    vs = load_video_set("video,sets=synthetic,fps=2,seconds=1.5", "/nonexistent")
    assert vs.name == "video@2fps" and len(vs.clips) == 5 and all(len(c) == 3 for c in vs.clips)
    kinds = {c.kind for c in vs.clips}
    assert kinds == {"pan", "zoom", "static", "cut"}
    with pytest.raises(ConfigError, match="valid keys: fps, sets, kinds"):
        load_video_set("video,speed=3", "/nonexistent")
    static = load_video_set("video,sets=synthetic,kinds=static+cut,fps=2,seconds=1.5", "/nonexistent")
    assert static.name == "video@2fps[static+cut]" and sorted(c.kind for c in static.clips) == ["cut", "static", "static"]
    for mine, full in zip([c for c in static.clips if c.kind == "static"], [c for c in vs.clips if c.kind == "static"]):
        assert mine.name == full.name and np.array_equal(np.stack(mine.frames), np.stack(full.frames))
    with pytest.raises(ConfigError, match="kinds='walk' is not valid; use any of pan, zoom, static, cut, sample"):
        load_video_set("video,kinds=walk", "/nonexistent")
    with pytest.raises(ConfigError, match="no clip of kinds sample"):
        load_video_set("video,sets=synthetic,kinds=sample", "/nonexistent")
    with pytest.raises(ConfigError, match="synthetic, sample"):
        load_video_set("video,sets=youtube", "/nonexistent")


@pytest.mark.slow  # cli.py eval end to end over a video set
def test_eval_reports_reuse_against_per_frame_on_a_video_set(tmp_path, one_torch_thread):
    import json

    from mergeseek.eval.config import EvalConfig
    from mergeseek.eval.report import write_report
    from mergeseek.eval.runner import run_eval

    cfg = EvalConfig(models=("reference-cifar10",), pretrained=None, datasets=("video,sets=synthetic,seconds=0.6",),
                     merges=("r=8",), reuse=("threshold=0", "threshold=0.05,refresh=4"), batch_size=8, iters=1,
                     warmup=0, plots=False, device="cpu", data_root=str(tmp_path))
    report = run_eval(cfg)
    write_report(report, tmp_path / "out", plots=False)
    d = json.loads((tmp_path / "out" / "report.json").read_text())
    assert d["config"]["reuse"] == ["threshold=0", "threshold=0.05,refresh=4"]  # as given; rows carry str(ReuseConfig)
    video = [ds for ds in d["models"][0]["datasets"] if ds["kind"] == "video"]
    assert len(video) == 1 and video[0]["n_images"] == 15
    rows = {r["config"]: r for r in video[0]["results"]}
    assert set(rows) == {f"{m} + reuse {r}" for m in ("none", "method=bipartite,r=8")
                         for r in ("none", "threshold=0.05,refresh=4")}
    for m in ("none", "method=bipartite,r=8"):
        exact = rows[f"{m} + reuse none"]  # threshold=0: every frame in full, through the stream
        assert exact["metrics"]["reuse_rate"] == 0 and exact["agreement"]["cos_min"] > 0.99999
        assert exact["metrics"]["references"] == 15
        assert rows[f"{m} + reuse threshold=0.05,refresh=4"]["metrics"]["reuse_rate"] > 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "video@5fps" in md and "frames/s reuse" in md
