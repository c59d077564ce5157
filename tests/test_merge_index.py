"""`merge-index` and sharded search: indexes built apart equal one index of all their sources.

"Equal" for a merge: the same rows (id, video_id, frame_idx, pts_time, path) in id order, the
same vectors and thumbnails, the same sources in the manifest. For sharded search: the same hits
(scores, frames) as searching the merged index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import build_encoder, comparable_contents, index_contents, thumbnails_by_id, write_video
from typer.testing import CliRunner

from mergeseek.cli import app
from mergeseek.errors import IndexMismatchError, InputError
from mergeseek.indexing import IndexOptions, index_paths
from mergeseek.indexing.merge import merge_indexes
from mergeseek.indexing.store import EncodedSource, IndexStore
from mergeseek.retrieval import Searcher
from mergeseek.retrieval.sharded import ShardedSearcher


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    from PIL import Image

    d = tmp_path_factory.mktemp("merge_media")
    write_video(d / "a.mp4", [("red", 10), ("green", 10)])
    write_video(d / "b.mp4", [("yellow", 10), ("white", 10), ("blue", 10)])
    write_video(d / "c.mp4", [("blue", 10), ("black", 10)])
    stills = d / "stills"
    stills.mkdir()
    for i, v in enumerate((40, 200)):
        Image.fromarray(np.full((32, 32, 3), v, np.uint8)).save(stills / f"{i + 1}.png")
    return d


@pytest.fixture(scope="module")
def built(tmp_path_factory, media, one_torch_thread):
    """The whole folder in one index, and the same sources as two halves built apart."""
    enc = build_encoder()
    root = tmp_path_factory.mktemp("merge_built")
    index_paths([media], root / "whole", enc, IndexOptions())
    index_paths([media / "a.mp4", media / "b.mp4"], root / "half1", enc, IndexOptions())
    index_paths([media / "c.mp4", media / "stills"], root / "half2", enc, IndexOptions(shard_size=1))
    return root






def _sources(index_dir: Path) -> dict:
    m = IndexStore.open_for_read(index_dir).manifest
    return {k: (e.video_id, e.kind, e.fingerprint, e.recipe, e.count, e.duplicates) for k, e in m.sources.items()}


def test_merging_two_halves_equals_indexing_the_whole(tmp_path, built):
    into = tmp_path / "merged"
    report = merge_indexes([built / "half1", built / "half2"], into)
    rows, vecs = comparable_contents(into)
    ref_rows, ref_vecs = comparable_contents(built / "whole")
    assert rows == ref_rows and [r[0] for r in rows] == list(range(len(rows)))  # same ids, 0..n-1
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)
    half_vecs = np.concatenate([index_contents(built / h)[1] for h in ("half1", "half2")])
    assert np.array_equal(vecs, half_vecs)  # copied bit for bit
    assert _sources(into) == _sources(built / "whole")
    thumbs = thumbnails_by_id(into)
    assert thumbs == thumbnails_by_id(built / "whole") and all(thumbs.values())
    store = IndexStore.open_for_read(into)
    assert store.faiss_is_current()
    assert report.sources_copied == 4 and report.vectors_copied == report.vectors_total == len(rows)
    # The merged index answers like the whole one.
    q = ref_vecs[[0, 3]]
    got, want = Searcher(into).search_vectors(q, 5), Searcher(built / "whole").search_vectors(q, 5)
    assert [[(h.id, h.video_id, h.frame_idx) for h in hs] for hs in got] == [[(h.id, h.video_id, h.frame_idx) for h in hs] for hs in want]
    # Merging again adds nothing.
    again = merge_indexes([built / "half1", built / "half2"], into)
    assert again.sources_copied == 0 and again.up_to_date == 4
    assert comparable_contents(into)[0] == rows


def test_a_source_in_both_inputs_is_taken_once(tmp_path, built):
    into = tmp_path / "merged"
    report = merge_indexes([built / "half1", built / "whole"], into)
    assert comparable_contents(into)[0] == comparable_contents(built / "whole")[0]  # a, b from half1 (the same rows), c and stills from whole
    assert sorted(_sources(into)) == sorted(_sources(built / "whole"))
    assert len(report.duplicates) == 2 and report.sources_copied == 4
    assert len(index_contents(into)[0]) == len(index_contents(built / "whole")[0])


def _fake_index(root: Path, vectors: np.ndarray, key: str = "/data/x.mp4", fingerprint: str = "1-1", **identity) -> Path:
    ident = {"model": "ViT-B-32", "pretrained": "none", "merge": "none", "precision": "fp32", "dim": vectors.shape[1]}
    ident.update(identity)
    n = len(vectors)
    with IndexStore.open_for_write(root, ident) as store:
        store.commit([EncodedSource(key, Path(key).stem, "video", fingerprint, "fps=1;dedup=off", np.arange(n),
                                    np.arange(n, dtype=np.float64), [key] * n, np.arange(n), vectors)])
    return root


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("key,value", [("model", "ViT-B-16"), ("merge", "r=8"), ("precision", "bf16"), ("dim", 256)])
def test_indexes_of_another_model_merge_config_precision_or_dim_are_refused(tmp_path, key, value):
    a = _fake_index(tmp_path / "a", _unit(4, 512, 0))
    b = _fake_index(tmp_path / "b", _unit(4, value if key == "dim" else 512, 1), key="/data/y.mp4",
                    **({key: value} if key != "dim" else {}))
    with pytest.raises(IndexMismatchError, match=f"cannot merge .* {key}=") as info:
        merge_indexes([a, b], tmp_path / "c")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "c").exists()  # refused before anything was written
    # A target of another model is refused as well.
    _fake_index(tmp_path / "t", _unit(4, 512, 2), key="/data/t.mp4", model="ViT-L-14")
    with pytest.raises(IndexMismatchError, match="model="):
        merge_indexes([a], tmp_path / "t")


def test_one_source_with_different_contents_in_two_inputs_is_refused(tmp_path):
    a = _fake_index(tmp_path / "a", _unit(3, 64, 0))
    b = _fake_index(tmp_path / "b", _unit(3, 64, 1), fingerprint="2-2")
    with pytest.raises(IndexMismatchError, match="/data/x.mp4 is in .* with different contents"):
        merge_indexes([a, b], tmp_path / "c")
    with pytest.raises(InputError, match="both an input and the target"):
        merge_indexes([a, b], a)


def test_cli_merge_index(tmp_path, built):
    result = CliRunner().invoke(app, ["merge-index", str(built / "half1"), str(built / "half2"), "--into",
                                      str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["sources_copied"] == 4 and out["vectors_total"] == len(index_contents(built / "whole")[0])
    a = _fake_index(tmp_path / "a", _unit(4, 512, 0), model="ViT-B-16")
    result = CliRunner().invoke(app, ["merge-index", str(a), str(built / "half1"), "--into", str(tmp_path / "n")])
    assert result.exit_code == IndexMismatchError.exit_code
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot merge" in result.stderr


# ---------------------------------------------------------------------------- sharded search
def test_sharded_search_equals_the_merged_index(tmp_path, built):
    merged = tmp_path / "merged"
    merge_indexes([built / "half1", built / "half2"], merged)
    sharded = ShardedSearcher([built / "half1", built / "half2"])
    one = Searcher(merged)
    q = index_contents(merged)[1]
    for got, want in zip(sharded.search_vectors(q, 6), one.search_vectors(q, 6)):
        assert [(h.video_id, h.frame_idx, h.pts_time if h.pts_time == h.pts_time else None) for h in got] == \
               [(h.video_id, h.frame_idx, h.pts_time if h.pts_time == h.pts_time else None) for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    # global ids map back to (folder, id there)
    n1 = len(index_contents(built / "half1")[0])
    assert sharded.locate(0) == (IndexStore.open_for_read(built / "half1").root, 0)
    assert sharded.locate(n1) == (IndexStore.open_for_read(built / "half2").root, 0)
    assert sharded.size == len(q)


def test_sharded_ivf_is_trained_once_across_shards(tmp_path):
    """IVF-Flat with every list probed is exact: the sharded search must equal brute force."""
    va, vb = _unit(300, 32, 0), _unit(200, 32, 1)
    a = _fake_index(tmp_path / "a", va, key="/data/a.mp4")
    b = _fake_index(tmp_path / "b", vb, key="/data/b.mp4")
    s = ShardedSearcher([a, b], index_type="IVF8,Flat", nprobe=8)
    assert all(p.ntotal == n for p, n in zip(s.parts, (300, 200)))
    q = _unit(5, 32, 2)
    allv = np.concatenate([va, vb])
    want = np.argsort(-(q @ allv.T), axis=1, kind="stable")[:, :10]
    got = [[h.id for h in hs] for hs in s.search_vectors(q, 10)]
    assert got == want.tolist()  # global ids: a's rows 0..299, then b's 300..499
    # Both shards share one trained quantizer: the same centroids.
    import faiss

    cents = [faiss.extract_index_ivf(faiss.downcast_index(p).index).quantizer.reconstruct_n(0, 8) for p in s.parts]
    assert np.array_equal(cents[0], cents[1])


def test_sharded_search_refuses_another_model(tmp_path):
    a = _fake_index(tmp_path / "a", _unit(4, 64, 0))
    b = _fake_index(tmp_path / "b", _unit(4, 64, 1), key="/data/y.mp4", model="ViT-B-16")
    with pytest.raises(IndexMismatchError, match="model"):
        ShardedSearcher([a, b])


def test_cli_search_with_shards_equals_the_merged_index(tmp_path, built, media):
    import decord
    from PIL import Image

    Image.fromarray(decord.VideoReader(str(media / "b.mp4"))[10].asnumpy()).save(tmp_path / "q.png")
    merged = tmp_path / "merged"
    merge_indexes([built / "half1", built / "half2"], merged)

    def search(*index_args):
        result = CliRunner().invoke(app, ["search", "--image", str(tmp_path / "q.png"), "-k", "5", "--json", "--device",
                                          "cpu", *index_args])
        assert result.exit_code == 0, result.stderr
        return [(h["video_id"], h["frame_idx"], round(h["score"], 4)) for h in json.loads(result.stdout)]

    sharded = search("--index", str(built / "half1"), "--shard", str(built / "half2"))
    assert sharded == search("--index", str(merged))
    assert sharded[0][:2] == ("b", 10)  # the query frame itself comes first


def test_a_merge_killed_before_its_thumbnails_resumes_them_from_the_inputs(tmp_path, media, one_torch_thread, monkeypatch):
    """Killed right after a commit, before that shard's thumbnails: the rerun ("run the same
    command again") copies them from the inputs, even with the source media gone."""
    import shutil

    import mergeseek.indexing.merge as merge
    from mergeseek.indexing.thumbs import ThumbCollector

    local = tmp_path / "media"
    shutil.copytree(media, local)
    enc = build_encoder()
    index_paths([local / "a.mp4", local / "b.mp4"], tmp_path / "h1", enc, IndexOptions())
    index_paths([local / "c.mp4", local / "stills"], tmp_path / "h2", enc, IndexOptions())
    index_paths([local], tmp_path / "whole", enc, IndexOptions())
    want = thumbnails_by_id(tmp_path / "whole")

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # the kill, between the commit and its thumbnail pack

    monkeypatch.setattr(ThumbCollector, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        merge.merge_indexes([tmp_path / "h1", tmp_path / "h2"], tmp_path / "m", commit_rows=1)
    monkeypatch.undo()
    assert comparable_contents(tmp_path / "m")[0]  # the first source was committed
    shutil.rmtree(local)  # the videos live elsewhere now: nothing can be decoded again
    report = merge.merge_indexes([tmp_path / "h1", tmp_path / "h2"], tmp_path / "m", commit_rows=1)
    assert report.thumbs_backfilled > 0 and not report.thumbs_missing
    got = thumbnails_by_id(tmp_path / "m")
    assert got == want and all(got.values())
    assert comparable_contents(tmp_path / "m")[0] == comparable_contents(tmp_path / "whole")[0]


def test_two_videos_with_one_name_keep_apart_as_in_one_index_run(tmp_path, one_torch_thread):
    enc = build_encoder()
    for name, colours in (("m1", [("red", 6)]), ("m2", [("blue", 6)])):
        (tmp_path / name).mkdir()
        write_video(tmp_path / name / "clip.mp4", colours)
    index_paths([tmp_path / "m1"], tmp_path / "i1", enc, IndexOptions())
    index_paths([tmp_path / "m2"], tmp_path / "i2", enc, IndexOptions())
    index_paths([tmp_path / "m1", tmp_path / "m2"], tmp_path / "one_run", enc, IndexOptions())
    report = merge_indexes([tmp_path / "i1", tmp_path / "i2"], tmp_path / "merged")
    merged, one_run = _sources(tmp_path / "merged"), _sources(tmp_path / "one_run")
    assert {k: v[0] for k, v in merged.items()} == {k: v[0] for k, v in one_run.items()}
    assert sorted(v[0] for v in merged.values()) == ["m1/clip", "m2/clip"]
    assert comparable_contents(tmp_path / "merged")[0] == comparable_contents(tmp_path / "one_run")[0]
    assert set(report.renamed.values()) == {"m1/clip", "m2/clip"}
    # a third clip.mp4 merged later gets what `index m3/ --index merged` gives it (the plain name is
    # free), and the two already there keep theirs
    import shutil

    (tmp_path / "m3").mkdir()
    write_video(tmp_path / "m3" / "clip.mp4", [("green", 6)])
    index_paths([tmp_path / "m3"], tmp_path / "i3", enc, IndexOptions())
    shutil.copytree(tmp_path / "merged", tmp_path / "incremental")
    merge_indexes([tmp_path / "i3"], tmp_path / "merged")
    index_paths([tmp_path / "m3"], tmp_path / "incremental", enc, IndexOptions())
    assert _sources(tmp_path / "merged") == _sources(tmp_path / "incremental")
    assert sorted(v[0] for v in _sources(tmp_path / "merged").values()) == ["clip", "m1/clip", "m2/clip"]
