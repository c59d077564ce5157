"""Issue #26, fourth round: per-block r schedules at equal block FLOPs, and the screening harness.

A constant r is ToMe's way of spending a FLOP budget, not necessarily the best one. This script
builds per-block r lists (``r=[...]``) from a few one-parameter families, each scaled until its
block FLOPs (``eval.timing.encoder_macs``, the counter every report uses) are within 1% of a
constant-r target, and scores merge configs on a fixed half of the CIFAR-10 test set:

- half ``A``: of the 10,000 test images in class-interleaved order (position i has class i % 10),
  the even runs of ten (positions 0-9, 20-29, ...: every class, 500 images each; screening);
- half ``B``: the odd runs of ten (10-19, 30-39, ...; confirmation, never looked at before a
  choice is made).

Predictions are saved per (model, half, config) under ``--out`` so every difference is paired.

    python -m mergeseek.bench.issue26_schedule schedules --r 16
    python -m mergeseek.bench.issue26_schedule score --half A "method=pairs,r=16" "method=pairs,r=[...]"
    python -m mergeseek.bench.issue26_schedule table --half A --ref "method=bipartite,r=16"

Screening only (fp32, one thread, batches of 250); the shipped figures come from ``cli.py eval``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

SLICES = ((0, 2000), (2000, 4000), (4000, 6000), (6000, 8000), (8000, 10000))
CACHE = "runs/i26"  # preprocessed test slices (x, y) written by the earlier rounds' harness
OUT = "runs/i26c"


# ---------------------------------------------------------------------------- schedules
def block_flops(rs: Sequence[int], num_tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    from mergeseek.eval.timing import encoder_macs

    counts, n = [], num_tokens
    for r in rs:
        n -= r
        counts.append(n)
    return encoder_macs(counts, dim, mlp_ratio, num_tokens)


def realise(wanted: Sequence[float], num_tokens: int, protected: int = 1) -> List[int]:
    """Round a real per-block r (carrying the rounding error) and clamp it to half the free tokens."""
    out, n, carry = [], num_tokens, 0.0
    for w in wanted:
        exact = w + carry
        r = int(round(exact))
        carry = exact - r
        r = max(0, min(r, (n - protected) // 2))
        out.append(r)
        n -= r
    return out


def constant(r: int, layers: int, num_tokens: int) -> List[int]:
    return realise([r] * layers, num_tokens)


def family_weights(name: str, a: float, layers: int) -> List[float]:
    """Unscaled per-block weights of a schedule family.

    ``ramp``: 1 + a (2i/(L-1) - 1), a < 0 front-loaded, a > 0 back-loaded; ``delay``: no merge in
    the first ``a`` blocks, equal weights after; ``stop``: equal weights, no merge in the last ``a``
    blocks.
    """
    if name == "ramp":
        return [max(0.0, 1 + a * (2 * i / (layers - 1) - 1)) for i in range(layers)]
    if name == "delay":
        return [0.0 if i < a else 1.0 for i in range(layers)]
    if name == "stop":
        return [0.0 if i >= layers - a else 1.0 for i in range(layers)]
    raise ValueError(f"unknown family {name!r}; choose ramp, delay or stop")


def matched(name: str, a: float, target: float, layers: int, num_tokens: int, dim: int) -> Tuple[List[int], float]:
    """The family member whose block FLOPs are nearest ``target`` (bisection on the scale)."""
    w = family_weights(name, a, layers)
    lo, hi = 0.0, 4.0 * num_tokens
    best, best_err = None, float("inf")
    for _ in range(60):
        mid = (lo + hi) / 2
        rs = realise([mid * x for x in w], num_tokens)
        f = block_flops(rs, num_tokens, dim)
        err = f / target - 1
        if abs(err) < abs(best_err):
            best, best_err = rs, err
        if f > target:
            lo = mid
        else:
            hi = mid
    return best, best_err


def family_schedules(r: int, layers: int, num_tokens: int, dim: int) -> Dict[str, List[int]]:
    """Every family member FLOP-matched (within 1%) to constant r; name -> realised r list."""
    target = block_flops(constant(r, layers, num_tokens), num_tokens, dim)
    out = {}
    members = [("ramp", a) for a in (-0.8, -0.5, -0.25, 0.25, 0.5, 0.8)]
    members += [("delay", k) for k in (1, 2, 3)] + [("stop", k) for k in (1, 2)]
    for name, a in members:
        rs, err = matched(name, a, target, layers, num_tokens, dim)
        if abs(err) <= 0.01 and rs != constant(r, layers, num_tokens):
            out[f"{name}{a:+g}"] = rs
    return out


# ---------------------------------------------------------------------------- scoring
def build_cache(model_name: str, data_root: str, cache: str = CACHE) -> List[str]:
    """Write the preprocessed CIFAR-10 test images every screening harness reads (``load_half``):
    ``{cache}/{model}_{a}_{b}.pt`` = (images as the model takes them, labels) per slice of
    ``SLICES``, in ``load_cifar10_npz``'s class-interleaved order. Slices already there are kept;
    each file is written whole (a temporary file, fsynced and renamed). Returns the paths written."""
    import torch

    from mergeseek.eval.reference import load_cifar10_npz, load_reference, preprocess_info_of, preprocess_uint8
    from mergeseek.runtime import commit_file

    model, _ = load_reference(model_name)
    info = preprocess_info_of(model)
    split = load_cifar10_npz(os.path.join(data_root, "cifar10"), "test")
    if len(split.labels) < SLICES[-1][1]:
        raise SystemExit(f"the CIFAR-10 test pack under {data_root} has {len(split.labels)} images; "
                         f"the screening halves need {SLICES[-1][1]}")
    os.makedirs(cache, exist_ok=True)
    written = []
    for a, b in SLICES:
        path = f"{cache}/{model_name}_{a}_{b}.pt"
        if os.path.exists(path):
            continue
        x = preprocess_uint8(split.images[a:b], info)
        tmp = path + ".tmp"
        torch.save((x, torch.as_tensor(split.labels[a:b])), tmp)
        commit_file(tmp, path)  # fsync, rename, fsync the folder
        written.append(path)
    return written


def load_half(model_name: str, half: str):
    import torch

    xs, ys = [], []
    for a, b in SLICES:
        path = f"{CACHE}/{model_name}_{a}_{b}.pt"
        if not os.path.exists(path):
            break
        x, y = torch.load(path)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    pick = half_index(len(y), half)
    return x[pick].contiguous(), y[pick].contiguous()


def half_index(n: int, half: str) -> np.ndarray:
    """Positions of half A (even runs of ten) or B (odd runs) among the first n test images."""
    return np.flatnonzero((np.arange(n) // 10) % 2 == {"A": 0, "B": 1}[half])


def pred_path(out: str, model_name: str, half: str, cfg: str) -> str:
    tag = cfg if len(cfg) < 120 else cfg[:80] + "-" + hashlib.sha1(cfg.encode()).hexdigest()[:10]
    return f"{out}/pred_{model_name}_{half}_{tag.replace('/', '_')}.npy"


def register_candidates() -> None:
    """Screening-only methods: ``pairs_mix`` at other thresholds (``mix050`` = 0.050)."""
    import functools

    from mergeseek.encoders.merging.mixed import pairs_mix_merging
    from mergeseek.encoders.merging.registry import MatcherSpec, register

    for t in (0.03, 0.05, 0.075, 0.1, 0.15, 0.2):
        register(MatcherSpec(f"mix{int(round(t * 1000)):03d}", functools.partial(pairs_mix_merging, threshold=t)))


def score(model_name: str, half: str, cfgs: Sequence[str], out: str, batch: int = 250) -> None:
    import torch

    register_candidates()
    torch.set_num_threads(1)
    from mergeseek.encoders.patch import apply_merging
    from mergeseek.eval.reference import load_reference

    os.makedirs(out, exist_ok=True)
    model, _ = load_reference(model_name)
    model.eval()
    x, y = load_half(model_name, half)
    for cfg in cfgs:
        path = pred_path(out, model_name, half, cfg)
        if os.path.exists(path):
            continue
        t = time.process_time()
        apply_merging(model, cfg.split("|")[0])  # a "|tag" names a screening variant patched around this call
        with torch.inference_mode():
            p = torch.cat([model(x[s:s + batch]).argmax(-1) for s in range(0, len(y), batch)])
        np.save(path, p.numpy())
        with open(path[:-4] + ".cfg", "w") as f:
            f.write(cfg + "\n")
        print(f"{half} {len(y)} {cfg:70s} top1={100 * float((p == y).float().mean()):6.2f} "
              f"cpu={time.process_time() - t:.0f}s", flush=True)


def table(model_name: str, half: str, ref: str, out: str) -> None:
    _, y = load_half(model_name, half)
    y = y.numpy()
    rows = {}
    for path in sorted(glob.glob(f"{out}/pred_{model_name}_{half}_*.npy")):
        cfg_file = path[:-4] + ".cfg"
        cfg = open(cfg_file).read().strip() if os.path.exists(cfg_file) else path
        rows[cfg] = np.load(path) == y
    base = rows.get(ref)
    for cfg, ok in rows.items():
        line = f"{cfg:75s} n={len(ok)} top1={100 * ok.mean():6.2f}"
        if base is not None and cfg != ref:
            d = ok.astype(float) - base
            line += f"  vs ref {100 * d.mean():+.2f} ± {100 * d.std() / np.sqrt(len(d)):.2f}"
        print(line)


def import_slices(model_name: str, out: str, sources: Sequence[str] = ("runs/i26", "runs/i26b")) -> None:
    """Split the earlier rounds' per-slice predictions (configs with all five slices) into halves
    A and B, where this round has not scored them itself."""
    found: Dict[str, Dict[Tuple[int, int], str]] = {}
    for src in sources:
        for path in glob.glob(f"{src}/pred_{model_name}_*.npy"):
            rest = os.path.basename(path)[len(f"pred_{model_name}_"):-4]
            a, b, cfg = rest.split("_", 2)
            found.setdefault(cfg, {})[(int(a), int(b))] = path
    for cfg, parts in found.items():
        if len(parts) < len(SLICES) and model_name == "reference-cifar10":
            continue
        keys = [s for s in SLICES if s in parts]
        if keys != list(SLICES[: len(keys)]):
            continue
        p = np.concatenate([np.load(parts[s]) for s in keys])
        for half in ("A", "B"):
            path = pred_path(out, model_name, half, cfg)
            part = p[half_index(len(p), half)]
            if not os.path.exists(path):
                np.save(path, part)
                with open(path[:-4] + ".cfg", "w") as f:
                    f.write(cfg + "\n")
            print(f"{half} {cfg}: {len(part)} images from {len(keys)} slices")


def _load_preds(model_name: str, half: str, outs: Sequence[str]) -> Dict[str, np.ndarray]:
    rows = {}
    for out in outs:
        for path in sorted(glob.glob(f"{out}/pred_{model_name}_{half}_*.npy")):
            cfg_file = path[:-4] + ".cfg"
            if os.path.exists(cfg_file):
                rows.setdefault(open(cfg_file).read().strip(), np.load(path))
    return rows


def summary(model_name: str, outs: Sequence[str], alias: Dict[str, str]) -> None:
    """Top-1 per half and over both, and the paired difference to ``bipartite`` at the same r
    (``alias``: config -> the config whose predictions it provably equals, e.g. pairs_mix at r=16
    and pairs)."""
    ys = {h: load_half(model_name, h)[1].numpy() for h in "AB"}
    preds = {h: _load_preds(model_name, h, outs) for h in "AB"}
    for h in "AB":
        for cfg, same in alias.items():
            if same in preds[h] and cfg not in preds[h]:
                preds[h][cfg] = preds[h][same]

    def ref_of(cfg: str) -> str:
        r = cfg.split("r=", 1)[1] if "r=" in cfg else ""
        return f"method=bipartite,r={r}"

    def fmt(d: np.ndarray) -> str:
        return f"{100 * d.mean():+.2f} ± {100 * d.std(ddof=1) / np.sqrt(len(d)):.2f}"

    for cfg in sorted(set(preds["A"]) | set(preds["B"])):
        ok = {h: preds[h][cfg] == ys[h] for h in "AB" if cfg in preds[h]}
        line = f"{cfg:55s} " + " ".join(f"{h}={100 * v.mean():6.2f}" for h, v in ok.items())
        if len(ok) == 2:
            line += f" all={100 * np.concatenate([ok['A'], ok['B']]).mean():6.2f}"
        ref = ref_of(cfg)
        diffs = {h: ok[h].astype(float) - (preds[h][ref] == ys[h]) for h in ok if ref in preds[h] and ref != cfg}
        for h, d in diffs.items():
            line += f" | {h}: {fmt(d)}"
        if len(diffs) == 2:
            line += f" | all: {fmt(np.concatenate([diffs['A'], diffs['B']]))}"
        print(line)


def screening_main(doc: str, variant, variant_help: str, example: str, register=None, argv=None) -> None:
    """The command line every later round's harness shares: ``score`` configs under one screening
    variant (``variant(name)`` patches the forward while it runs; ``register()`` adds screening
    methods), or ``table`` of what is saved, paired with ``--ref``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("what", choices=("score", "table"), help="score configs, or print the table of what is saved")
    p.add_argument("configs", nargs="*", help=f"merge configs (score), e.g. {example}")
    p.add_argument("--variant", default="base", help=variant_help)
    p.add_argument("--half", default="A", choices=("A", "B"), help="half of the test set (A screens, B confirms)")
    p.add_argument("--out", default="runs/i26f", help="where predictions are saved")
    p.add_argument("--ref", default="method=pairs,r=16|base", help="the row the table pairs every other with")
    p.add_argument("--model", default="reference-cifar10",
                   help="reference model (its cached test images in runs/i26), e.g. reference-cifar10-56")
    args = p.parse_intermixed_args(argv)
    if args.what == "score":
        if register is not None:
            register()
        with variant(args.variant):
            score(args.model, args.half, [f"{c}|{args.variant}" for c in args.configs], args.out)
    else:
        table(args.model, args.half, args.ref, args.out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("cache", "schedules", "score", "table", "import", "summary"),
                   help="cache: write the preprocessed test images the harnesses read (runs/i26) from --data-root")
    p.add_argument("configs", nargs="*")
    p.add_argument("--model", default="reference-cifar10")
    p.add_argument("--half", default="A", choices=("A", "B"))
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--ref", default="method=bipartite,r=16")
    p.add_argument("--out", default=OUT)
    p.add_argument("--data-root", default="../shared/data", help="folder holding cifar10/ (cache)")
    args = p.parse_intermixed_args()
    if args.what == "cache":
        for path in build_cache(args.model, args.data_root):
            print(path)
    elif args.what == "schedules":
        layers, tokens = (9, 145) if args.model == "reference-cifar10" else (9, 197)
        base = constant(args.r, layers, tokens)
        print("constant", base, f"{block_flops(base, tokens, 192) / 1e9:.4f} GMAC")
        for name, rs in family_schedules(args.r, layers, tokens, 192).items():
            print(name, rs, f"{block_flops(rs, tokens, 192) / block_flops(base, tokens, 192) - 1:+.4f}")
    elif args.what == "score":
        score(args.model, args.half, args.configs, args.out)
    elif args.what == "summary":
        same = {}
        for r in (8, 12, 16, 20):  # at these r every block of both references is over the threshold
            same[f"method=pairs_mix,r={r}"] = f"method=pairs,r={r}"
            same[f"method=pairs_mix_lsh,r={r}"] = f"method=pairs_lsh,r={r}"
        same["method=pairs_mix,r=4"] = "method=bipartite,r=4"  # and under it at r=4
        same["method=pairs_mix_lsh,r=4"] = "method=lsh,r=4"
        summary(args.model, [args.out, f"{args.out}/imp"], same)
    elif args.what == "import":
        import_slices(args.model, args.out)
    else:
        table(args.model, args.half, args.ref, args.out)


if __name__ == "__main__":
    main()
