"""AI Challenge style keyframe folders for ingest benchmarks, and the JPEG decoders timed side by side.

    python -m bench.keyframes make /tmp/kf --videos 20 --per-video 500      # kf/keyframes/L01_V001/0001.jpg ...
    python -m bench.keyframes decode /tmp/kf --limit 2000 --device cuda     # keyframes/s of each decode path

The frames are real photos (scikit-image) cropped, scaled and tinted differently for every file,
saved as 1280x720 JPEGs (quality 90) like the contest's keyframes, so that near-duplicate skipping
keeps them and decoders see real JPEG content. ``decode`` times, on the same files:
``pil`` (full decode, the pipeline's path before), ``pil-draft`` (PIL's DCT-domain downscale to
the smallest scale still >= the model side) and ``nvjpeg`` (torchvision's batched GPU decode,
CUDA only). Wall clock; threads as given.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path


_PHOTOS: list = []


def _photos():
    """The source photos, loaded once per process."""
    if not _PHOTOS:
        from skimage import data

        _PHOTOS.extend([data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field(),
                        data.immunohistochemistry()])
    return _PHOTOS


def _make_one(args) -> None:
    import numpy as np
    from PIL import Image

    path, seed, size = args
    rng = np.random.default_rng(seed)
    photos = _photos()
    src = photos[seed % len(photos)][..., :3]
    h, w = src.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = src[y:y + ch, x:x + cw].astype(np.float32) * rng.uniform(0.6, 1.2, size=3)
    img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    img.save(path, quality=90)


def make_release(root: Path, videos: int = 20, per_video: int = 500, size=(1280, 720), workers: int = 0) -> list[Path]:
    """Write ``root/keyframes/L01_V{v:03d}/{n:04d}.jpg``; returns the files (existing ones are kept)."""
    jobs = []
    for v in range(videos):
        folder = root / "keyframes" / f"L01_V{v + 1:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_video):
            p = folder / f"{n + 1:04d}.jpg"
            if not p.exists():
                jobs.append((p, v * per_video + n, size))
    if jobs:
        with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
            list(pool.map(_make_one, jobs, chunksize=64))
    return sorted((root / "keyframes").glob("*/*.jpg"))


def _pil_full(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").resize((224, 224), Image.BICUBIC)


def _pil_draft(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (224, 224))
        return im.convert("RGB").resize((224, 224), Image.BICUBIC)


def time_decoders(files: list[Path], device: str = "cpu", threads: int = 0, batch: int = 256) -> dict:
    """Keyframes/s of each decode path on ``files`` (decode + resize to 224, wall clock)."""
    threads = threads or os.cpu_count() or 1
    out = {"files": len(files), "threads": threads}
    for name, fn in (("pil", _pil_full), ("pil-draft", _pil_draft)):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, files))
        out[name] = len(files) / (time.perf_counter() - t0)
    if device.startswith("cuda"):
        import torch
        import torch.nn.functional as F
        from torchvision.io import decode_jpeg, read_file

        def run():
            for i in range(0, len(files), batch):
                datas = [read_file(str(f)) for f in files[i:i + batch]]
                imgs = decode_jpeg(datas, device=device)
                torch.stack([F.interpolate(im[None].float(), size=(224, 224), mode="bilinear", antialias=True)[0] for im in imgs])
            torch.cuda.synchronize()

        run()  # warm-up (nvjpeg handles, kernels)
        t0 = time.perf_counter()
        run()
        out["nvjpeg"] = len(files) / (time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.keyframes", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write an AI Challenge style keyframe folder")
    m.add_argument("root", type=Path)
    m.add_argument("--videos", type=int, default=20, help="keyframe folders (videos)")
    m.add_argument("--per-video", type=int, default=500, help="keyframes per video")
    m.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    d = sub.add_parser("decode", help="keyframes/s of the JPEG decode paths on a folder made by 'make'")
    d.add_argument("root", type=Path)
    d.add_argument("--limit", type=int, default=2000, help="files timed")
    d.add_argument("--device", default="cpu", help="cuda adds torchvision's nvjpeg path")
    d.add_argument("--threads", type=int, default=0, help="decode threads for the PIL paths (0: one per CPU)")
    a = p.parse_args(argv)
    if a.cmd == "make":
        t0 = time.perf_counter()
        files = make_release(a.root, a.videos, a.per_video, workers=a.workers)
        print(json.dumps({"files": len(files), "seconds": round(time.perf_counter() - t0, 1)}))
    else:
        files = sorted((a.root / "keyframes").glob("*/*.jpg"))[: a.limit]
        print(json.dumps(time_decoders(files, a.device, a.threads)))


if __name__ == "__main__":  # pragma: no cover
    main()
