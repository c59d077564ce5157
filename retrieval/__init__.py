"""Query an index: text, image and event ("A then B then C", each within W s) queries, relevance
feedback, one video, fused models; tables, JSON, CSV.

Public API::

    from mergeseek.retrieval import Searcher, Hit
    searcher = Searcher.open("my_index")          # builds the encoder the index was made with
    hits = searcher.search_text("a man riding a bike", k=20)
"""

from mergeseek.retrieval.events import EventChain, chain_events
from mergeseek.retrieval.format import format_timestamp, hits_json, hits_table, write_submission_csv
from mergeseek.retrieval.search import Hit, Searcher, TemporalHit, best_per_video, pair_events, run_search

__all__ = [
    "EventChain",
    "Hit",
    "Searcher",
    "TemporalHit",
    "best_per_video",
    "chain_events",
    "format_timestamp",
    "hits_json",
    "hits_table",
    "pair_events",
    "run_search",
    "write_submission_csv",
]
