"""`cli.py index`, `search` and `demo`: options reach the library, bad input gives one line and an exit code.

The model is the session's random-weight ViT-B-32: ``encoders.Encoder`` is replaced by a recorder
that returns it, so each test also checks which model options the command asked for.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import build_encoder, write_video
from typer.testing import CliRunner

from mergeseek import encoders
from mergeseek.cli import app
from mergeseek.errors import WeightsUnavailableError


@pytest.fixture
def model_calls(monkeypatch):
    """Replace encoders.Encoder: record the keyword arguments, return the shared random-weight model."""
    calls = []
    model = build_encoder()  # built for real before the class is replaced

    def fake_encoder(**kwargs):
        calls.append(kwargs)
        if kwargs.get("pretrained") not in (None, "none"):
            raise WeightsUnavailableError(f"weights {kwargs['model_name']}/{kwargs['pretrained']} cannot be downloaded here")
        return model

    monkeypatch.setattr(encoders, "Encoder", fake_encoder)
    return calls


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_index_then_search_by_image_json_and_csv(tmp_path, model_calls):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip.mp4", [("red", 10), ("blue", 10)])
    code, out, err = run("index", videos, "--index", tmp_path / "ix", "--pretrained", "none", "--no-progress", "--batch-size", "4")
    assert code == 0, err
    assert "1 source(s) indexed" in out and "2 vectors in the index" in out
    assert model_calls[-1] == {"model_name": "ViT-B-32", "pretrained": "none", "device": "auto", "precision": "fp32",
                               "merge": "none", "batch_size": 4}

    import decord
    from PIL import Image

    Image.fromarray(decord.VideoReader(str(videos / "clip.mp4"))[10].asnumpy()).save(tmp_path / "q.png")
    code, out, err = run("search", "--image", tmp_path / "q.png", "--index", tmp_path / "ix", "-k", "2", "--json",
                         "--csv", tmp_path / "sub.csv")
    assert code == 0, err
    hits = json.loads(out)
    assert [(h["video_id"], h["frame_idx"], h["timestamp"]) for h in hits] == [("clip", 10, "00:00:01.000"), ("clip", 0, "00:00:00.000")]
    assert list(csv.reader(open(tmp_path / "sub.csv"))) == [["clip", "10"], ["clip", "0"]]
    # search takes the model and weights from the index's manifest
    assert (model_calls[-1]["model_name"], model_calls[-1]["pretrained"], model_calls[-1]["merge"]) == ("ViT-B-32", "none", "none")

    code, out, err = run("search", "something red", "--then", "something blue", "--within", "5", "--index", tmp_path / "ix")
    assert code == 0, err
    assert out.splitlines()[0].split()[:6] == ["score", "video_id", "frame_idx", "timestamp", "then_frame", "then_time"]
    assert "00:00:01.000" in out.splitlines()[2]


def test_index_options_reach_the_library(tmp_path, monkeypatch):
    from mergeseek import indexing
    seen = {}

    def fake_index_paths(paths, index_dir, encoder, options):
        seen.update(paths=paths, index_dir=index_dir, options=options)
        return indexing.IndexReport(str(index_dir))

    monkeypatch.setattr(indexing, "index_paths", fake_index_paths)
    code, out, err = run("index", "a", "b", "--index", tmp_path, "--every", "5", "--no-dedup", "--index-type", "HNSW32",
                         "--force", "--shard-size", "64", "--json")
    assert code == 0, err
    o = seen["options"]
    assert seen["paths"] == [Path("a"), Path("b")] and seen["index_dir"] == tmp_path
    assert (str(o.sampling), o.dedup.enabled, o.index_type, o.force, o.shard_size, o.progress) == ("every=5", False, "HNSW32", True, 64, False)
    assert json.loads(out)["index_dir"] == str(tmp_path)
    code, _, _ = run("index", "a", "--scene", "0.2", "--index", tmp_path, "--json")
    assert code == 0 and str(seen["options"].sampling) == "scene=0.2"
    code, _, _ = run("index", "a", "--scenes", "--index", tmp_path, "--json")
    assert code == 0 and str(seen["options"].sampling) == "scene=0.15"


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["index", "{tmp}/missing", "--index", "{tmp}/ix"], 3, "does not exist"),
        (["index", "{tmp}/empty", "--index", "{tmp}/ix"], 3, "no videos"),
        (["index", "{tmp}/bad", "--index", "{tmp}/ix", "--pretrained", "none", "--no-progress"], 3, "nothing could be indexed"),
        (["index", "{tmp}/empty", "--fps", "2", "--every", "3"], 2, "choose one sampling option"),
        (["search", "", "--index", "{tmp}/ix"], 3, "empty query"),
        (["search", "a bike", "--index", "{tmp}/missing"], 3, "does not exist"),
        (["search", "--image", "{tmp}/nope.jpg", "--index", "{tmp}/ix"], 3, "does not exist"),
        (["search", "--image", "{tmp}/empty", "--index", "{tmp}/ix"], 3, "empty is a folder, not a file"),
        (["search", "--image", "{tmp}/dangling.jpg", "--index", "{tmp}/ix"], 3, "dangling.jpg is a broken link"),
        (["search", "a bike", "--index", "{tmp}/bad/zero.mp4"], 3, "zero.mp4 is a file, not a folder"),
        (["repair", "--index", "{tmp}/bad/zero.mp4"], 3, "zero.mp4 is a file, not a folder"),
        (["compact", "--index", "{tmp}/bad/zero.mp4"], 3, "zero.mp4 is a file, not a folder"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(tmp_path, model_calls, args, code, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zero.mp4").write_bytes(b"")
    (tmp_path / "bad" / "junk.mkv").write_text("junk")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    got, out, err = run(*(a.format(tmp=tmp_path) for a in args))
    assert got == code
    assert words in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_search_with_another_model_is_refused(tmp_path, model_calls):
    from mergeseek.indexing.store import EncodedSource, IndexStore

    identity = {"model": "ViT-B-32", "pretrained": "none", "merge": "none", "precision": "fp32", "dim": 512}
    with IndexStore.open_for_write(tmp_path, identity) as store:
        store.commit([EncodedSource("/v/a.mp4", "a", "video", "f", "fps=1", np.zeros(1, np.int64), np.zeros(1),
                                    ["/v/a.mp4"], np.zeros(1, np.int64), np.eye(1, 512, dtype=np.float32))])
    code, _, err = run("search", "a bike", "--index", tmp_path, "--model", "ViT-L-14")
    assert code == 4 and "ViT-L-14" in err and "--model ViT-B-32" in err
    assert model_calls == []  # refused before loading anything


def test_demo_falls_back_to_random_weights_loudly(tmp_path, model_calls, monkeypatch):
    import mergeseek.retrieval.demo
    from mergeseek import retrieval
    clip = write_video(tmp_path / "bikes.mp4", [("red", 10), ("green", 10)])
    monkeypatch.setattr(retrieval.demo, "sample_videos", lambda: [clip])
    code, out, err = run("demo", "--index", tmp_path / "demo_index", "-k", "2")
    assert code == 0, err
    assert [c["pretrained"] for c in model_calls] == ["openai", None]
    assert "RANDOM weights" in err and "NOT meaningful" in err
    lines = out.splitlines()
    assert "query: 'a man riding a bike'" in out and lines[-4].split()[0] == "score"
    assert {line.split()[1] for line in lines[-2:]} == {"bikes"}
    assert np.isfinite(float(lines[-1].split()[0]))


def test_a_quoted_tilde_in_path_options_means_home(tmp_path, model_calls, monkeypatch):
    """`--index "~/ix"` (quoted, so the shell leaves it) is the home folder's ix, for every path
    option and argument, not a folder named "~" in the working directory."""
    home, work = tmp_path / "home", tmp_path / "work"
    (home / "videos").mkdir(parents=True)
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    write_video(home / "videos" / "clip.mp4", [("red", 10), ("blue", 10)])
    code, out, err = run("index", "~/videos", "--index", "~/ix", "--pretrained", "none", "--no-progress")
    assert code == 0, err
    assert (home / "ix" / "manifest.json").is_file() and not (work / "~").exists()
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(home / "q.png")
    code, out, err = run("search", "--image", "~/q.png", "--index", "~/ix", "-k", "1", "--json", "--csv", "~/sub.csv")
    assert code == 0, err
    assert len(json.loads(out)) == 1 and (home / "sub.csv").is_file() and not (work / "~").exists()


def test_video_names_match_whatever_unicode_composition_was_typed(tmp_path, model_calls):
    """A file named on macOS is stored decomposed (NFD: "o" + hook + dot below); a user types the
    composed form (NFC). --video finds it either way; a name that differs otherwise does not."""
    import unicodedata

    from mergeseek.retrieval.scope import match_video

    composed = "Phở_Hà_Nội"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert match_video(composed, {decomposed}) == decomposed and match_video(decomposed + " ", {composed}) == composed
    assert match_video(composed, {composed, decomposed}) == composed  # two files, two videos: exact wins
    assert match_video("Pho_Ha_Noi", {decomposed}) is None and match_video("phở_hà_nội", {composed}) is None

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / f"{decomposed}.mp4", [("red", 10), ("blue", 10)])
    code, out, err = run("index", videos, "--index", tmp_path / "ix", "--pretrained", "none", "--no-progress")
    assert code == 0, err
    code, out, err = run("search", "red", "--video", composed, "--index", tmp_path / "ix", "-k", "5", "--json")
    assert code == 0, err
    assert {h["video_id"] for h in json.loads(out)} == {decomposed}
    code, out, err = run("search", "red", "--video", "Pho_Ha_Noi", "--index", tmp_path / "ix", "--json")
    assert code != 0 and "no video 'Pho_Ha_Noi'" in err


def test_a_quoted_tilde_in_pretrained_is_the_home_folder(tmp_path, monkeypatch):
    from mergeseek.encoders.encoder import normalize_pretrained

    monkeypatch.setenv("HOME", str(tmp_path))
    assert normalize_pretrained("~/ckpt/open_clip.pt") == str(tmp_path / "ckpt" / "open_clip.pt")
    assert normalize_pretrained("laion2b_s34b_b79k") == "laion2b_s34b_b79k"
    assert normalize_pretrained(" none ") is None and normalize_pretrained("/abs/x.pt") == "/abs/x.pt"
