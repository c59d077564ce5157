"""Run one evaluation: every model × dataset × merge config, timed by the alternating protocol.

For each model the unmerged base and one weight-sharing merged copy per config are built once
(:mod:`eval.candidates`). Each dataset is streamed in batches: a batch is decoded and
preprocessed once and then run through every candidate, so images are never held in memory
and all candidates see identical pixels. Timing runs once per model on a batch of real images
from the first dataset (the input size is fixed by the model, so throughput does not depend on
which set the batch came from).
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Optional

import numpy as np

from mergeseek.eval.config import BASELINE, EvalConfig
from mergeseek.eval.datasets import ClassificationSet, DatasetSpec, EvalSet, RetrievalSet, load_dataset
from mergeseek.eval.metrics import (
    cosine_agreement,
    first_relevant_rank,
    group_max,
    ranking,
    retrieval_metrics,
    topk_accuracy,
    topk_overlap,
)
from mergeseek.eval.models import ModelUnderTest, load_model
from mergeseek.eval.results import CandidateResult, DatasetResult, EvalReport, ModelResult
from mergeseek.eval.timing import flop_ratio, time_alternating
from mergeseek.eval.zeroshot import choose_templates, describe_prompts

log = logging.getLogger(__name__)


def run_eval(cfg: EvalConfig, progress: bool = False) -> EvalReport:
    """Evaluate ``cfg`` and return the report (written to disk by :func:`eval.report.write_report`)."""
    import torch

    from mergeseek.eval.results import environment

    if cfg.threads is not None or cfg.cpu_time:
        torch.set_num_threads(1 if cfg.cpu_time else cfg.threads)
    merges = cfg.merge_configs()
    from mergeseek.eval.datasets.video import is_video_spec, load_video_set

    channels = cfg.text_channels()
    sets = [with_text(load_with_templates(DatasetSpec.parse(s), cfg, channels), cfg)
            for s in cfg.datasets if not is_video_spec(s)]
    videos = [load_video_set(s, cfg.data_root, cfg.limit, cfg.seed) for s in cfg.datasets if is_video_spec(s)]
    models = []
    for spec in cfg.models:
        mut = load_model(spec, cfg.pretrained, cfg.device, cfg.precision)
        models.append(evaluate_model(mut, merges, sets, cfg, progress, videos))
        del mut
        gc.collect()
    return EvalReport(config=cfg, models=tuple(models), environment=environment(cfg.device))


def evaluate_model(mut: ModelUnderTest, merges, sets: list[EvalSet], cfg: EvalConfig, progress: bool = False,
                   videos: tuple = ()) -> ModelResult:
    """All datasets and the timing for one model (``videos``: video sets, reuse vs per-frame)."""
    from mergeseek.encoders import merge_stats, token_counts
    from mergeseek.eval.candidates import merged_models

    if mut.kind == "clip" and sets and hasattr(mut.tokenizer, "load"):
        mut.tokenizer.load()  # every non-video set reads text: a missing tokenizer fails before the images are encoded
    if hasattr(mut, "adapt_merges"):  # a detector's backbone runs every config with unmerge=true
        merges = mut.adapt_merges(merges)
    cands = merged_models(mut.base, merges)
    log.info("%s: %d candidates (%s)", mut.name, len(cands), ", ".join(cands))
    results = []
    for ds in sets:
        if mut.kind == "classifier" and isinstance(ds, RetrievalSet):
            log.warning("%s is a classifier: skipping text-query set %s", mut.name, ds.name)
            results.append(DatasetResult.skipped(ds, f"{mut.name} has no text tower; text→image retrieval needs a CLIP model"))
            continue
        results.append(evaluate_dataset(mut, cands, ds, cfg.batch_size, cfg.topk, progress))
    if videos:
        from mergeseek.eval.datasets.video import evaluate_video_set, timing_pixels

        by_name = {str(m): m for m in merges}
        for vs in videos:
            results.append(evaluate_video_set(mut, cands, by_name, vs, cfg.reuse_configs(), cfg.batch_size, cfg.topk,
                                              cfg.cpu_time))

    pixels = timing_batch(mut, sets[0], cfg.batch_size) if sets else timing_pixels(mut, videos[0], cfg.batch_size)
    calls = {name: _forward_call(mut, _compiled(m, cfg, mut.device, pixels, mut), pixels) for name, m in cands.items()}
    timing = time_alternating(calls, cfg.batch_size, cfg.warmup, cfg.iters, mut.device, progress,
                              clock="cpu" if cfg.cpu_time else "wall")
    base_counts = mut.base_token_counts()
    tokens, flops, stats = {}, {}, {}
    for name, m in cands.items():
        counts = token_counts(m) or base_counts
        tokens[name] = counts
        flops[name] = flop_ratio(counts, base_counts, mut.width, mut.mlp_ratio)
        stats[name] = merge_stats(m)
    return ModelResult(
        model=mut.describe(), timing=timing, tokens=tokens, flop_ratio=flops, merge_stats=stats, datasets=tuple(results)
    )


def _compiled(module: Any, cfg: EvalConfig, device: str, pixels, mut: ModelUnderTest) -> Any:
    """``module`` or, with ``cfg.compile``, its compiled tower after the (untimed) compiling call."""
    if not cfg.compile:
        return module
    import torch

    from mergeseek.encoders.compile import CompiledTower, compile_scope

    tower = CompiledTower(module, int(pixels.shape[0]), device, scope=compile_scope(cfg.compile))
    with torch.inference_mode(), mut.autocast():
        tower(pixels)
    log.warning("compiled %s in %.1f s (not timed)", getattr(module, "_merge_cfg", "none"), tower.compile_s)
    return tower


def _forward_call(mut: ModelUnderTest, module: Any, pixels):
    def call():
        with mut.autocast():
            return module(pixels)

    return call


def timing_batch(mut: ModelUnderTest, ds: EvalSet, batch_size: int):
    """``batch_size`` preprocessed images of ``ds`` on the model's device (cycled if the set is smaller)."""
    import torch

    idx = [i % len(ds.images) for i in range(batch_size)]
    return torch.stack([mut.preprocess(ds.images.load(i)) for i in idx]).to(mut.device)


def embed_all(mut: ModelUnderTest, cands: dict[str, Any], ds: EvalSet, batch_size: int, progress: bool = False):
    """Embeddings (and logits) of every image of ``ds`` under every candidate.

    Returns ({name: float32 [N, D]}, {name: float32 [N, C] or None}).
    """
    import torch

    n = len(ds.images)
    embs: dict[str, list] = {k: [] for k in cands}
    logits: dict[str, list] = {k: [] for k in cands}
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"{mut.name} {ds.name}", unit="batch")
    for s in starts:
        pixels = torch.stack([mut.preprocess(ds.images.load(i)) for i in range(s, min(s + batch_size, n))]).to(mut.device)
        for name, m in cands.items():
            e, lg = mut.forward(m, pixels)
            embs[name].append(e.cpu().numpy())
            if lg is not None:
                logits[name].append(lg.cpu().numpy())
    return (
        {k: np.concatenate(v) for k, v in embs.items()},
        {k: (np.concatenate(v) if v else None) for k, v in logits.items()},
    )


def load_with_templates(spec: DatasetSpec, cfg: EvalConfig, channels: frozenset = frozenset()) -> EvalSet:
    """One set with ``cfg.templates`` applied to classification sets (its own ``templates=`` option
    wins); ``channels``: the text channels the run has for keyframe queries (``eval.channels``)."""
    ds = load_dataset(spec, cfg.data_root, cfg.limit, cfg.seed, channels=channels)
    if isinstance(ds, ClassificationSet) and spec.option("templates") is None:
        ds = choose_templates(ds, cfg.templates)
    return ds


def with_text(ds: EvalSet, cfg: EvalConfig) -> EvalSet:
    """A keyframe set whose queries have ``ocr:`` / ``asr:`` parts, with its frames' text attached
    (read once, before any model loads; ``eval.channels.read_set_text``)."""
    if not isinstance(ds, RetrievalSet):
        return ds
    from dataclasses import replace

    from mergeseek.eval.channels import query_channels, read_set_text

    texts = [x.text for x in ds.queries] + [e for x in ds.queries if x.aic is not None for e in (x.aic.events or ())]
    need = {c for x in ds.queries for c, _ in x.channels} | {c for t in texts for c in query_channels(t)[1]}
    if not need:
        return ds
    return replace(ds, text=read_set_text(ds, need, ocr=cfg.ocr, asr=cfg.asr, text_from=cfg.text_from,
                                          release_parts={"videos": cfg.videos} if cfg.videos else None))


def evaluate_dataset(mut: ModelUnderTest, cands: dict[str, Any], ds: EvalSet, batch_size: int, topk: int = 10,
                     progress: bool = False) -> DatasetResult:
    if ds.kind == "detection":  # boxes, not embeddings (eval/detection_eval.py)
        from mergeseek.eval.detection_eval import evaluate_detection

        return evaluate_detection(mut, cands, ds, batch_size, progress)
    embs, logits = embed_all(mut, cands, ds, batch_size, progress)
    if isinstance(ds, ClassificationSet):
        return _classification(mut, ds, embs, logits)
    return _retrieval(mut, ds, embs, topk)


# ---------------------------------------------------------------------------- classification
def zeroshot_weights(mut: ModelUnderTest, classes: tuple[str, ...], templates: tuple[str, ...]) -> np.ndarray:
    """[C, D] class embeddings: each class's template embeddings averaged, then re-normalised."""
    texts = [t.format(c) for c in classes for t in templates]
    emb = mut.encode_texts(texts).reshape(len(classes), len(templates), -1).mean(axis=1)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _classification(mut: ModelUnderTest, ds: ClassificationSet, embs, logits) -> DatasetResult:
    notes = []
    if mut.kind == "clip":
        weights = zeroshot_weights(mut, ds.classes, ds.templates)
        scores = {k: e @ weights.T for k, e in embs.items()}
        protocol = f"zero-shot, {describe_prompts(ds.classes, ds.templates, ds.label_space)}"
    elif (mut.label_space and mut.label_space == ds.label_space) or (
        not mut.label_space and mut.num_classes == len(ds.classes)
    ):
        scores = logits
        protocol = f"own {mut.num_classes}-way head"
        if not mut.label_space:
            notes.append(f"assumed the model's {mut.num_classes} outputs are this set's classes in order")
    else:
        scores = None
        protocol = "agreement only"
        notes.append(
            f"{mut.name}'s head predicts {mut.label_space or str(mut.num_classes) + ' classes'}, not {ds.name}'s "
            f"{len(ds.classes)} classes: accuracy not measured"
        )
    ks = tuple(k for k in (1, 5) if k <= len(ds.classes))
    base_scores = scores[BASELINE] if scores is not None else None
    rows = []
    for name in embs:
        metrics = topk_accuracy(scores[name], ds.labels, ks) if scores is not None else {}
        agree = cosine_agreement(embs[name], embs[BASELINE])
        if scores is not None:
            o, ob = ranking(scores[name]), ranking(base_scores)
            agree["pred_agree"] = float(np.mean(o[:, 0] == ob[:, 0]))
            agree[f"top{ks[-1]}_overlap"] = topk_overlap(o, ob, ks[-1])
        rows.append(CandidateResult(config=name, metrics=metrics, agreement=agree))
    return DatasetResult(
        dataset=ds.name, kind="classification", source=ds.source, n_images=len(ds), n_queries=0,
        n_classes=len(ds.classes), protocol=protocol, primary="top1" if scores is not None else "",
        notes=tuple(notes), results=tuple(rows),
    )


# ---------------------------------------------------------------------------- retrieval
def _retrieval(mut: ModelUnderTest, ds: RetrievalSet, embs, topk: int) -> DatasetResult:
    from mergeseek.eval import channels as ch

    q = mut.encode_texts([x.text for x in ds.queries])  # a query with ocr:/asr: parts: its visual part
    # R@K / MRR are frame-level: TRAKE queries (several events) get the official score only
    frame_q = [i for i, x in enumerate(ds.queries) if not (x.aic is not None and x.aic.truth.task == "trake")]
    relevant = [set(ds.queries[i].relevant) for i in frame_q]
    fused_q = [i for i in frame_q if ds.queries[i].channels]  # ranked as `submit` ranks them (eval/channels.py)
    event_q = _event_vectors(mut, ds)
    video_rel: Optional[list] = None
    rows = []
    base_order = None
    for name in [BASELINE] + [k for k in embs if k != BASELINE]:
        scores = q @ embs[name].T
        fused = {i: ch.fused_ranking(scores[i] if ds.queries[i].text.strip() else None, dict(ds.queries[i].channels),
                                     ds.text, ch.submit_k()) for i in fused_q}
        ranked = ch.ranked_scores(scores, fused) if fused else scores
        order = ranking(ranked)
        ranks = first_relevant_rank(order[frame_q], relevant)
        for j, i in enumerate(frame_q):
            if i in fused and ranks[j] > len(fused[i]):
                ranks[j] = np.inf  # not in the fused ranking (what submit writes): a miss
        metrics = retrieval_metrics(ranks)
        if ds.has_videos:
            vscores, vnames = group_max(ranked[frame_q], ds.video_ids)
            if video_rel is None:
                col = {v: i for i, v in enumerate(vnames)}
                video_rel = [{col[ds.queries[i].video_id]} for i in frame_q]
            vranks = first_relevant_rank(ranking(vscores), video_rel)
            for j, i in enumerate(frame_q):
                if i in fused and np.isneginf(vscores[j, next(iter(video_rel[j]))]):
                    vranks[j] = np.inf  # no frame of the video in the fused ranking
            metrics.update(retrieval_metrics(vranks, prefix="video_"))
        if any(x.aic is not None for x in ds.queries):  # the HCMC AI Challenge score (eval/aic_score.py)
            metrics.update(ch.aic_scores(ds.queries, scores, {k: v @ embs[name].T for k, v in event_q.items()}, ds, fused,
                                         ds.text))
        if base_order is None:
            base_order = order
        agree = cosine_agreement(embs[name], embs[BASELINE])
        agree[f"top{topk}_overlap"] = topk_overlap(order, base_order, topk)
        rows.append(CandidateResult(config=name, metrics=metrics, agreement=agree))
    order_of = {k: i for i, k in enumerate(embs)}
    rows.sort(key=lambda r: order_of[r.config])
    notes = tuple(ds.notes) + _aic_notes(ds)
    said = sum(1 for x in ds.queries if x.channels or (x.aic is not None and any(ch.query_channels(e)[1] for e in x.aic.events)))
    if ds.text is not None and said:
        notes += tuple(ch.describe(ds.text, len(ds.queries), said))
    channels = f" + {' + '.join(ds.text.channels)} (fused)" if ds.text is not None and said else ""
    return DatasetResult(
        dataset=ds.name, kind="retrieval", source=ds.source, n_images=len(ds), n_queries=len(ds.queries),
        n_classes=0, protocol="text→image" + channels + (", frame and video level" if ds.has_videos else ""),
        primary="R@1", notes=notes, results=tuple(rows),
    )


def _event_vectors(mut: ModelUnderTest, ds: RetrievalSet) -> dict:
    """{qid: [E, D] text vectors of the TRAKE query's events}."""
    trake = [x for x in ds.queries if x.aic is not None and x.aic.truth.task == "trake"]
    if not trake:
        return {}
    from mergeseek.eval.channels import query_channels

    texts = [(query_channels(e)[0] or "") if query_channels(e)[1] else e for x in trake for e in x.aic.events]
    vecs = mut.encode_texts(texts)  # an event with ocr:/asr: parts: its visual part
    out, i = {}, 0
    for x in trake:
        out[x.qid] = vecs[i : i + len(x.aic.events)]
        i += len(x.aic.events)
    return out


def _aic_notes(ds: RetrievalSet) -> tuple:
    aic = [x for x in ds.queries if x.aic is not None]
    if not aic:
        return ()
    tasks = sorted({x.aic.truth.task for x in aic})
    notes = [f"AIC = the HCMC AI Challenge score of {len(aic)} queries ({', '.join(tasks)}): mean over k in "
             "1,5,20,50,100 of the best row within the top k, on the raw ground-truth frame ranges (no snapping)"]
    if "qa" in tasks:
        notes.append("QA rows are scored with the true answer filled in (the model finds frames, it does not answer)")
    if "trake" in tasks:
        notes.append("TRAKE queries are left out of R@K / MRR (they have several events) and scored by AIC only")
    return tuple(notes)
