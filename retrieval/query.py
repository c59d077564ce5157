"""One query of a search session, over an open ``Searcher``: the dispatch the CLI (``run_search``)
and the web app (``serve.engine``) share.

A query is a text or an image, optionally with

* ``thens``: more events after the first (``--then B --then C``, ``retrieval.events``; one
  ``--then`` gives ``TemporalHit`` pairs, more give ``EventChain`` s), ``within`` per gap;
* ``like`` / ``unlike``: relevance feedback by frame id (``retrieval.feedback``; no text needed
  when something is liked);
* ``video``: only frames of that video (``retrieval.scope``, exact but for Unicode composition);
* ``allow``: only these ``(video_id, frame_idx)`` (``--object``).

Combinations that have no meaning (events with feedback, an image with events) are refused by
``check_session`` in one line before anything is encoded.
"""

from __future__ import annotations

from typing import Optional, Sequence

from mergeseek.errors import InputError


def check_session(text: Optional[str], image, thens: Sequence[str], like: Sequence[int], unlike: Sequence[int],
                  video: Optional[str]) -> None:
    """One line for a combination ``run_query`` does not take."""
    if thens and (image is not None or not (text and text.strip())):
        raise InputError("--then needs a text query and a non-empty next event, e.g. \"a man\" --then \"a car\"")
    if thens and (like or unlike):
        raise InputError("--like/--unlike re-rank single frames; drop --then or the marks")
    if (unlike and not like) and image is None and not (text and text.strip()):
        raise InputError("feedback needs a text query or at least one liked frame (--like ID)")
    if video is not None and not str(video).strip():
        raise InputError("--video is empty; give a video id as the results show it")


def run_query(searcher, text: Optional[str] = None, image=None, thens: Sequence[str] = (), within=30.0, k: int = 20,
              per_video: bool = False, like: Sequence[int] = (), unlike: Sequence[int] = (),
              video: Optional[str] = None, allow: Optional[set] = None) -> list:
    """Hits (or pairs / chains) for one query; see the module docstring."""
    thens = list(thens or ())
    check_session(text, image, thens, like, unlike, video)
    if video is not None:  # the index's own spelling from here on (exact compares downstream)
        from mergeseek.retrieval.scope import resolve_video

        video = resolve_video(searcher, video)
    if thens:
        if allow is not None:
            raise InputError("--object filters text and image queries; drop --then or --object")
        if len(thens) == 1:
            where = {} if video is None else {"video": video}
            return searcher.search_temporal(text, thens[0], within_s=within, k=k, per_video=per_video, **where)
        from mergeseek.retrieval.events import search_events

        return search_events(searcher, [text, *thens], within, k=k, per_video=per_video, video=video)
    if like or unlike:
        if allow is not None:
            raise InputError("--object and --like/--unlike do not go together; drop one")
        from mergeseek.retrieval.feedback import search_feedback

        base = searcher.image_vector(image) if image is not None else None
        return search_feedback(searcher, text, like, unlike, k=k, per_video=per_video, video=video, base=base)
    if video is None:  # the plain query (the searcher's own methods: the web app's caches them)
        only = {} if allow is None else {"allow": allow}
        if image is not None:
            return searcher.search_image(image, k=k, per_video=per_video, **only)
        return searcher.search_text(text, k=k, per_video=per_video, **only)
    from mergeseek.retrieval.scope import search_in_video
    from mergeseek.retrieval.search import best_per_video

    vector = searcher.image_vector(image) if image is not None else searcher.text_vector(text)
    hits = search_in_video(searcher, vector, video, k=None if allow is not None or per_video else k)
    if allow is not None:
        hits = [h for h in hits if (h.video_id, h.frame_idx) in allow]
    return (best_per_video(hits) if per_video else hits)[:k]


__all__ = ["check_session", "run_query"]
