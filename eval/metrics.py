"""Retrieval, classification and agreement metrics as small functions over numpy arrays.

Conventions: a *rank* is 1-based (the best item is rank 1); a query whose relevant items never
appear gets rank ``inf`` (it counts as a miss at every K and adds 0 to MRR). Ties are broken by
item order (a stable sort), so results are deterministic.
"""

from __future__ import annotations

from typing import Collection, Iterable, Mapping, Sequence

import numpy as np

from mergeseek.errors import InputError

RECALL_KS = (1, 5, 10, 100)


def ranking(scores: np.ndarray) -> np.ndarray:
    """Item indices of each row sorted best first (stable, so ties keep item order)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")


def first_relevant_rank(order: np.ndarray, relevant: Sequence[Collection[int]]) -> np.ndarray:
    """1-based rank of the first relevant item in each row of ``order`` (``inf`` when absent).

    Args:
        order: [Q, N] item indices, best first (from :func:`ranking`, or a search engine's output).
        relevant: for each query, the item indices that count as a hit.
    """
    order = np.asarray(order)
    if order.ndim != 2 or len(order) != len(relevant):
        raise InputError(f"ranking has shape {order.shape} but there are {len(relevant)} queries; give one row per query")
    ranks = np.full(len(order), np.inf)
    for q, rel in enumerate(relevant):
        if not rel:
            continue
        hit = np.flatnonzero(np.isin(order[q], np.fromiter(rel, dtype=np.int64)))
        if hit.size:
            ranks[q] = hit[0] + 1
    return ranks


def recall_at_k(ranks: np.ndarray, ks: Iterable[int] = RECALL_KS) -> dict[int, float]:
    """Fraction of queries with a relevant item in the top K, for each K."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return {int(k): float("nan") for k in ks}
    return {int(k): float(np.mean(ranks <= k)) for k in ks}


def mean_reciprocal_rank(ranks: np.ndarray) -> float:
    """Mean of 1/rank (a miss adds 0)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(1.0 / ranks)) if ranks.size else float("nan")


def retrieval_metrics(ranks: np.ndarray, ks: Iterable[int] = RECALL_KS, prefix: str = "") -> dict[str, float]:
    """``{prefix}R@K`` for each K and ``{prefix}MRR``."""
    out = {f"{prefix}R@{k}": v for k, v in recall_at_k(ranks, ks).items()}
    out[f"{prefix}MRR"] = mean_reciprocal_rank(ranks)
    return out


def group_max(scores: np.ndarray, groups: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Collapse item columns into group columns by their best score (frame -> video level).

    Returns:
        ([Q, G] scores, the G group names in order of first appearance).
    """
    scores = np.asarray(scores)
    names: list[str] = []
    index: dict[str, int] = {}
    col = np.empty(len(groups), dtype=np.int64)
    for i, g in enumerate(groups):
        if g not in index:
            index[g] = len(names)
            names.append(g)
        col[i] = index[g]
    out = np.full((scores.shape[0], len(names)), -np.inf, dtype=np.float64)
    for gi in range(len(names)):
        out[:, gi] = scores[:, col == gi].max(axis=1)
    return out, names


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """``top{K}``: fraction of rows whose label is among the K highest logits (stable ties)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.shape[0] != labels.shape[0]:
        raise InputError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels; they must match")
    order = ranking(logits)
    pos = np.argmax(order == labels[:, None], axis=1)  # position of the true label
    return {f"top{k}": float(np.mean(pos < k)) if len(labels) else float("nan") for k in ks}


# ---------------------------------------------------------------------------- agreement
def cosine_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Row-wise cosine between two embeddings of the same inputs (merged vs unmerged)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"embeddings have shapes {a.shape} and {b.shape}; compare embeddings of the same inputs")
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = num / np.maximum(den, 1e-12)
    return {"cos_mean": float(np.mean(cos)), "cos_p5": float(np.percentile(cos, 5)), "cos_min": float(np.min(cos))}


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences (characters of a string for a character error
    rate, a list of words for a word error rate): insertions, deletions and substitutions, each 1."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def topk_overlap(order_a: np.ndarray, order_b: np.ndarray, k: int) -> float:
    """Mean |top-k(a) ∩ top-k(b)| / k over queries (1 = the same k results, in any order)."""
    order_a = np.asarray(order_a)[:, :k]
    order_b = np.asarray(order_b)[:, :k]
    if order_a.shape != order_b.shape:
        raise InputError(f"rankings have shapes {order_a.shape} and {order_b.shape}; they must match")
    kk = order_a.shape[1]
    if kk == 0:
        return float("nan")
    same = [len(set(x.tolist()) & set(y.tolist())) / kk for x, y in zip(order_a, order_b)]
    return float(np.mean(same)) if same else float("nan")


def summarize(values: Mapping[str, float], keys: Sequence[str]) -> list[float]:
    """Pick ``keys`` from a metric dict in order (missing -> nan), for tables and plots."""
    return [float(values.get(k, float("nan"))) for k in keys]
