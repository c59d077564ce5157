"""Relevance feedback: ``search "a dog" --like 12 --like 40 --unlike 7`` (and the web app's marks).

Rocchio's rule (Rocchio 1971; the weights of Manning, Raghavan & Schütze, *Introduction to
Information Retrieval*, ch. 9) on the stored, L2-normalised frame vectors:

    q' = ALPHA * q + BETA * mean(liked vectors) - GAMMA * mean(unliked vectors),  then L2-normalised

with ``ALPHA = 1``, ``BETA = 0.75``, ``GAMMA = 0.15`` and ``q`` the text query's vector (left out
when there is no text: "more like these"). The new vector is searched like any query; the frames
marked not relevant are left out of the results (they were seen and refused), the liked ones stay.
Marks without any liked frame or text are refused (a query made only of what is not wanted has no
direction). Ids are the index's frame ids (``search --json``, the page); one that the index does
not hold is one ``InputError`` (422 in the API).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mergeseek.errors import InputError

ALPHA, BETA, GAMMA = 1.0, 0.75, 0.15
MAX_MARKS = 200  # liked + unliked frames of one query


def rocchio(query: Optional[np.ndarray], liked: np.ndarray, unliked: np.ndarray, alpha: float = ALPHA,
            beta: float = BETA, gamma: float = GAMMA) -> np.ndarray:
    """float32 [1, dim]: the re-weighted query (see the module docstring); ``query`` may be None."""
    parts = []
    if query is not None:
        parts.append(alpha * np.asarray(query, np.float64).reshape(-1))
    if len(liked):
        parts.append(beta * np.asarray(liked, np.float64).mean(axis=0))
    if not parts:
        raise InputError("feedback needs a text query or at least one liked frame (--like ID)")
    q = np.sum(parts, axis=0)
    if len(unliked):
        q = q - gamma * np.asarray(unliked, np.float64).mean(axis=0)
    norm = float(np.linalg.norm(q))
    if not norm > 1e-12:
        raise InputError("the liked and unliked frames cancel out; mark other frames")
    return (q / norm).astype(np.float32)[None]


def check_marks(like: Sequence[int], unlike: Sequence[int]) -> tuple[list[int], list[int]]:
    """Distinct ids in order; an id both liked and unliked, or too many marks, is one line."""
    like = list(dict.fromkeys(int(i) for i in like))
    unlike = list(dict.fromkeys(int(i) for i in unlike))
    both = sorted(set(like) & set(unlike))
    if both:
        raise InputError(f"frame {both[0]} is marked both relevant and not relevant; keep one mark")
    if len(like) + len(unlike) > MAX_MARKS:
        raise InputError(f"{len(like) + len(unlike)} marked frames; at most {MAX_MARKS}")
    return like, unlike


def feedback_vector(searcher, text: Optional[str], like: Sequence[int], unlike: Sequence[int],
                    base: Optional[np.ndarray] = None) -> np.ndarray:
    """Rocchio's vector for ``text`` (None: no text; ``base``: a query vector given instead, e.g. an
    image's) and the marked frames of ``searcher``'s index."""
    from mergeseek.retrieval.scope import stored_vectors

    like, unlike = check_marks(like, unlike)
    vectors = stored_vectors(searcher)
    liked = vectors.get(like, "liked id") if like else np.zeros((0, searcher.manifest.dim), np.float32)
    unliked = vectors.get(unlike, "unliked id") if unlike else np.zeros((0, searcher.manifest.dim), np.float32)
    query = base if base is not None else searcher.text_vector(text) if text and text.strip() else None
    return rocchio(query, liked, unliked)


def search_feedback(searcher, text: Optional[str], like: Sequence[int], unlike: Sequence[int], k: int = 20,
                    per_video: bool = False, video: Optional[str] = None, base: Optional[np.ndarray] = None) -> list:
    """The best ``k`` frames for Rocchio's vector, without the unliked frames (``video``: inside it)."""
    from mergeseek.retrieval.search import best_per_video

    vec = feedback_vector(searcher, text, like, unlike, base)
    drop = set(check_marks(like, unlike)[1])
    if video is not None:
        from mergeseek.retrieval.scope import search_in_video

        hits = search_in_video(searcher, vec, video, k=None, exclude=sorted(drop))
        return (best_per_video(hits) if per_video else hits)[:k]
    depth = min(searcher.size, max(k + len(drop), 64 if per_video else 0))
    while True:  # deeper until k frames are left (or the whole index was read)
        hits = [h for h in searcher.search_vectors(vec, depth)[0] if h.id not in drop]
        if per_video:
            hits = best_per_video(hits)
        if len(hits) >= k or depth >= searcher.size:
            return hits[:k]
        depth = min(searcher.size, depth * 4)


__all__ = ["ALPHA", "BETA", "GAMMA", "check_marks", "feedback_vector", "rocchio", "search_feedback"]
