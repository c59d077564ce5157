"""The speech channel (issue #28): the one audio reader, engines and their missing-package lines,
segments -> frames against a naive loop, search-box prefixes, and ``index --asr`` / ``search --asr``
end to end on videos whose sound is espeak-ng speech (kill before the text and resume included).
The end-to-end cases need ``espeak-ng`` and ``ffmpeg`` (``.ci/run`` installs them) and the
``pocketsphinx`` package (the dev extra)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from mergeseek.errors import ConfigError, InputError, MissingDependencyError
from mergeseek.indexing.asr import Segment, frame_windows, group_words, segments_to_frames

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed (apt-get install ffmpeg)")
needs_speech = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None,
                                  reason="espeak-ng or ffmpeg is not installed (apt-get install espeak-ng ffmpeg)")


def _pocketsphinx() -> None:
    pytest.importorskip("pocketsphinx", reason="pocketsphinx is not installed (pip install pocketsphinx)")


def _ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", *map(str, args)], check=True, timeout=60)


def _tone(path: Path, seconds: float = 1.5, rate: int = 22050, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * hz * t)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return x


# ---------------------------------------------------------------------------- the audio reader
@needs_ffmpeg
def test_one_reader_gives_16khz_mono_of_files_and_a_video_s_track(tmp_path):
    from mergeseek.indexing.audio import read_audio

    _tone(tmp_path / "a.wav", seconds=1.5)
    _ffmpeg("-i", tmp_path / "a.wav", tmp_path / "a.flac")
    _ffmpeg("-i", tmp_path / "a.wav", "-ac", "2", tmp_path / "a.mp3")  # stereo in, mono out
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=5", "-i", tmp_path / "a.wav", "-shortest", "-c:v", "libx264",
            "-c:a", "aac", tmp_path / "v.mp4")
    for name in ("a.wav", "a.flac", "a.mp3", "v.mp4"):
        x = read_audio(tmp_path / name)
        assert x.dtype == np.float32 and x.ndim == 1, name
        assert abs(len(x) / 16000 - 1.5) < 0.1, (name, len(x))  # resampled from 22.05 kHz to 16 kHz
        # the 440 Hz tone survives: the spectrum's peak is there (not a silent or garbled track)
        part = x[2000:18000]
        assert abs(np.argmax(np.abs(np.fft.rfft(part))) * 16000 / len(part) - 440) < 5, name


@needs_ffmpeg
def test_a_silent_video_has_no_sound_and_bad_files_are_one_input_error(tmp_path):
    from mergeseek.indexing.audio import read_audio

    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=5", "-t", "1", "-c:v", "libx264", tmp_path / "silent.mp4")
    assert read_audio(tmp_path / "silent.mp4").shape == (0,)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a sound\n")
    for name, says in (("empty.wav", "empty (0 bytes)"), ("notes.txt", "not an audio or video file"),
                       ("missing.mp3", "no such audio or video file")):
        with pytest.raises(InputError, match=re_escape(says)) as err:
            read_audio(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


# ---------------------------------------------------------------------------- segments -> frames
def _naive(segments, times) -> list:
    """The documented rule, frame by frame: the window of a frame runs from the midpoint to the previous
    kept frame (in time) to the midpoint to the next (infinite at the ends); a segment [s, e) (e at
    least s + 1 ms) is taken when s < window end and e > window start."""
    out = []
    valid = sorted((t, i) for i, t in enumerate(times) if not math.isnan(t))
    rank = {i: r for r, (_, i) in enumerate(valid)}
    for i, t in enumerate(times):
        if math.isnan(t):
            out.append([])
            continue
        r = rank[i]
        lo = -math.inf if r == 0 else (valid[r - 1][0] + t) / 2
        hi = math.inf if r == len(valid) - 1 else (t + valid[r + 1][0]) / 2
        out.append([s.text for s in sorted(segments, key=lambda s: (s.start_s, s.end_s))
                    if s.start_s < hi and max(s.end_s, s.start_s + 1e-3) > lo])
    return out


def test_segments_map_to_the_frames_they_overlap_as_a_naive_loop_says():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 12))
        times = sorted(np.round(rng.uniform(0, 20, n), 1).tolist())
        if trial % 3 == 0:
            times = [times[i] for i in rng.permutation(n)]  # any order
        if trial % 5 == 0:
            times[int(rng.integers(n))] = float("nan")  # a frame without a time
        segs = []
        for j in range(int(rng.integers(0, 6))):
            s = float(np.round(rng.uniform(-1, 21), 1))
            segs.append(Segment(s, s + float(np.round(rng.choice([0.0, rng.uniform(0, 6)]), 1)), f"w{j}", 50.0))
        got = [[w.text for w in f.words] for f in segments_to_frames(segs, times)]
        assert got == _naive(segs, times), (times, segs)
        if segs and any(not math.isnan(t) for t in times):  # windows tile the time line: no segment is lost
            assert {t for f in got for t in f} == {s.text for s in segs}


def test_the_rule_at_its_edges_by_hand():
    times = [0.0, 2.0, 4.0]  # windows (-inf, 1), [1, 3), [3, inf)
    assert frame_windows(times)[0].tolist() == [-math.inf, 1.0, 3.0]
    at = lambda s, e: [bool(f.words) for f in segments_to_frames([Segment(s, e, "x")], times)]  # noqa: E731
    assert at(0.5, 1.0) == [True, False, False]  # ends where frame 1's window starts: not frame 1's
    assert at(0.5, 1.01) == [True, True, False]
    assert at(3.0, 3.0) == [False, False, True]  # zero length, on a boundary: the later window
    assert at(-5.0, -4.0) == [True, False, False] and at(50.0, 60.0) == [False, False, True]
    f = segments_to_frames([Segment(1.5, 2.25, "ha noi", 80.0), Segment(2.5, 2.6, "hue", 40.0)], times)[1]
    assert f.text == "ha noi hue" and f.words[0].box == (1500, 0, 750, 0) and f.conf == pytest.approx(60.0)
    assert segments_to_frames([Segment(1, 2, "x")], []) == []


def test_words_group_into_segments_no_longer_than_the_limit():
    words = [(0.0, 0.4, "the", 0.5), (0.4, 1.0, "prime", 0.9), (1.0, 2.1, "minister", 0.7), (2.1, 2.5, "said", 0.3),
             (9.0, 16.0, "aaaah", 1.0)]
    got = group_words(words, 2.0)
    assert [(s.start_s, s.end_s, s.text) for s in got] == [(0.0, 1.0, "the prime"), (1.0, 2.5, "minister said"),
                                                            (9.0, 16.0, "aaaah")]
    assert got[0].conf == pytest.approx(70.0) and group_words([], 2.0) == []


# ---------------------------------------------------------------------------- engines and options
def test_each_missing_engine_is_one_line_naming_the_package(monkeypatch):
    from mergeseek.indexing import asr

    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "faster_whisper", None)
    with pytest.raises(MissingDependencyError, match="pip install pocketsphinx") as err:
        asr.get_engine("pocketsphinx")
    assert "\n" not in str(err.value)
    with pytest.raises(MissingDependencyError, match="pip install faster-whisper"):
        asr.get_engine("whisper:/models/small,lang=vi")
    assert asr.get_engine(None) is None and asr.get_engine("none") is None
    with pytest.raises(ConfigError, match="unknown engine"):
        asr.get_engine("vosk")


def test_engine_specs_take_options_and_round_trip(monkeypatch, tmp_path):
    from mergeseek.indexing import asr

    pytest.importorskip("pocketsphinx")
    assert str(asr.get_engine("pocketsphinx")) == "pocketsphinx"
    e = asr.get_engine("pocketsphinx,max_segment_s=8")
    assert e.max_segment_s == 8.0 and str(asr.get_engine(str(e))) == str(e)
    for bad, says in (("pocketsphinx,beam=3", "unknown asr option 'beam'"), ("pocketsphinx,max_segment_s=x", "not a number"),
                      ("pocketsphinx,max_segment_s=0", "positive"), ("pocketsphinx:en", "no ':' argument")):
        with pytest.raises(ConfigError, match=re_escape(says)):
            asr.get_engine(bad)
    monkeypatch.setitem(sys.modules, "faster_whisper", type(sys)("faster_whisper"))  # installed, but no model folder
    with pytest.raises(InputError, match="nothing is downloaded"):
        asr.get_engine(f"whisper:{tmp_path / 'nope'}")
    w = asr.get_engine(f"whisper:{tmp_path},lang=vi,threads=2")
    assert str(w) == f"whisper:{tmp_path},lang=vi,threads=2" and str(asr.get_engine(str(w))) == str(w)
    (tmp_path / "models" / "fw-small").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path))  # whisper:~/x is left alone by the shell
    assert str(asr.get_engine("whisper:~/models/fw-small")) == f"whisper:{tmp_path / 'models' / 'fw-small'}"


def test_whisper_segments_come_through_with_their_confidence(monkeypatch, tmp_path):
    """faster-whisper is not installed here: a stand-in module checks what the engine asks of it
    (local files only, the language, 16 kHz float samples) and what it makes of the segments."""
    from types import SimpleNamespace

    from mergeseek.indexing import asr

    asked = {}

    class WhisperModel:
        def __init__(self, path, **kw):
            asked.update(path=path, **kw)

        def transcribe(self, audio, language=None):
            asked.update(language=language, dtype=audio.dtype, n=len(audio))
            return iter([SimpleNamespace(start=0.5, end=2.0, text=" Thủ tướng phát biểu ", avg_logprob=-0.2),
                         SimpleNamespace(start=2.0, end=2.5, text="  ", avg_logprob=-3.0)]), None

    fake = type(sys)("faster_whisper")
    fake.WhisperModel = WhisperModel
    monkeypatch.setitem(sys.modules, "faster_whisper", fake)
    engine = asr.get_engine(f"whisper:{tmp_path},lang=vi")
    got = engine.transcribe(np.zeros(16000, np.float32))
    assert got == [Segment(0.5, 2.0, "Thủ tướng phát biểu", round(100 * math.exp(-0.2), 1))]  # blank text dropped
    assert asked["local_files_only"] is True and asked["language"] == "vi" and asked["path"] == str(tmp_path)
    assert asked["dtype"] == np.float32 and asked["n"] == 16000 and engine.transcribe(np.zeros(0, np.float32)) == []


def test_a_search_box_takes_both_prefixes():
    from mergeseek.retrieval.hybrid import split_channels

    assert split_channels("a crowd ocr: HÀ NỘI asr: thủ tướng") == ("a crowd", {"ocr": "HÀ NỘI", "asr": "thủ tướng"})
    assert split_channels("ASR: prime minister") == (None, {"asr": "prime minister"})
    assert split_channels("asr: rain OCR: Huế") == (None, {"asr": "rain", "ocr": "Huế"})
    assert split_channels("asr: a asr: b") == (None, {"asr": "a b"})
    assert split_channels("laser: beam") == ("laser: beam", {})  # only where a word starts


def test_asking_for_speech_without_its_engine_stops_before_any_work(tmp_path, monkeypatch, encoder):
    """--asr given and its engine missing: one line, nothing indexed; not asked: indexing goes on."""
    from mergeseek.indexing import IndexOptions, index_paths

    monkeypatch.setitem(sys.modules, "pocketsphinx", None)
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.png")

    def no_model():
        raise AssertionError("the model must not load")

    with pytest.raises(MissingDependencyError, match="pocketsphinx"):
        index_paths([folder], tmp_path / "ix", no_model, IndexOptions(asr="pocketsphinx"))
    assert not (tmp_path / "ix").exists()
    report = index_paths([folder], tmp_path / "ix", encoder, IndexOptions())  # not asked for: it goes on
    assert report.vectors_total == 1 and report.text == {}


def test_the_speech_channel_is_searched_apart_from_on_screen_text(tmp_path):
    from mergeseek.indexing.ocr import FrameText, Word
    from mergeseek.indexing.text import TextIndex, write_text

    write_text(tmp_path, "part-00000", "ocr", np.asarray([1, 2]), [FrameText((Word("rain", 90.0, (0, 0, 1, 1)),)), FrameText()])
    write_text(tmp_path, "part-00000", "asr", np.asarray([1, 2]), [FrameText(), FrameText((Word("heavy rain", 60.0, (1500, 0, 900, 0)),))])
    ix = TextIndex(tmp_path)
    assert ix.sync(["part-00000"])["frames_added"] == 2
    assert [m.id for m in ix.search("rain", "asr")] == [2] and [m.id for m in ix.search("rain", "ocr")] == [1]


# ---------------------------------------------------------------------------- end to end
SAID = {"football": "the football team won the final match last night",
        "rain": "heavy rain caused flooding in the city center this morning"}
VOICE = ("-v", "en-us+f3", "-s", "150")  # a voice PocketSphinx hears well enough to find these phrases


def _speaking_video(folder: Path, name: str, sentence: str, pad_s: float = 1.0) -> Path:
    """A video of ``pad_s`` silence, ``sentence`` spoken, ``pad_s`` silence (a test pattern to look at)."""
    folder.mkdir(parents=True, exist_ok=True)
    speech = folder / f"{name}.speech.wav"
    subprocess.run(["espeak-ng", *VOICE, "-w", str(speech), sentence], check=True, timeout=60)
    out = folder / f"{name}.mp4"
    _ffmpeg("-f", "lavfi", "-i", f"testsrc=size=64x48:rate=5", "-i", speech,
            "-filter_complex", f"[1:a]adelay={int(pad_s * 1000)}:all=1,apad=pad_dur={pad_s}[a]", "-map", "0:v", "-map", "[a]",
            "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", out)
    speech.unlink()
    return out


@pytest.fixture(scope="module")
def encoder():
    from test_indexing_support import build_encoder

    return build_encoder()


def _text_ids(root: Path, channel: str = "asr") -> list:
    import pyarrow.parquet as pq

    return sorted(i for p in sorted((root / "text").glob(f"*.{channel}.parquet")) for i in pq.read_table(p).column("id").to_pylist())


@needs_speech
@pytest.mark.slow
def test_index_asr_then_search_asr_finds_the_spoken_phrase_and_a_kill_resumes(tmp_path, encoder, monkeypatch):
    _pocketsphinx()
    from typer.testing import CliRunner

    from mergeseek.cli import app
    from mergeseek.indexing import IndexOptions, index_paths
    from mergeseek.indexing import text as text_mod
    from mergeseek.indexing.store import IndexStore
    from mergeseek.retrieval.hybrid import search_hybrid
    from mergeseek.retrieval.search import Searcher

    def hits_frame(root_: Path) -> int:
        return search_hybrid(Searcher(root_), asr="final match last night", k=1)[0].frame_idx

    videos = tmp_path / "videos"
    for name, sentence in SAID.items():
        _speaking_video(videos, name, sentence)
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=5", "-t", "2", "-c:v", "libx264", videos / "silent.mp4")
    root = tmp_path / "ix"
    opts = IndexOptions(sampling="fps=1", asr="pocketsphinx")
    real = text_mod.write_text

    def killed(*a, **k):  # the shard is committed, then the process dies before its text is written
        raise KeyboardInterrupt

    monkeypatch.setattr(text_mod, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        index_paths([videos], root, encoder, opts)
    monkeypatch.setattr(text_mod, "write_text", real)
    committed = sorted(IndexStore.open_for_read(root).read_vectors()[0].tolist())
    assert committed and _text_ids(root) == []
    report = index_paths([videos], root, encoder, opts)  # resume: nothing to encode, the speech is read
    assert report.frames_encoded == 0 and report.text["asr"]["read_again"] == len(committed)
    assert _text_ids(root) == committed  # the same frames, once each

    # a fresh index through the CLI, the speech read beside the encoder
    from mergeseek import encoders

    monkeypatch.setattr(encoders, "Encoder", lambda **kw: encoder)
    fresh = tmp_path / "ix2"
    res = CliRunner().invoke(app, ["index", str(videos), "--index", str(fresh), "--pretrained", "none", "--no-progress",
                                   "--fps", "1", "--asr", "pocketsphinx", "--json"])
    assert res.exit_code == 0, res.output
    assert _text_ids(fresh) == sorted(IndexStore.open_for_read(fresh).read_vectors()[0].tolist())
    for root_ in (root, fresh):
        res = CliRunner().invoke(app, ["search", "--index", str(root_), "--asr", "final match last night", "--json", "-k", "3"])
        assert res.exit_code == 0, res.output
        import json

        hits = json.loads(res.stdout)
        hits = hits["hits"] if isinstance(hits, dict) else hits
        assert hits and hits[0]["video_id"] == "football", hits
        assert "[" in hits[0]["channels"]["asr"]["text"]
        # the hit's time lies within the speech (1 s of silence, then the sentence)
        assert 0.5 <= hits[0]["pts_time"] <= 5.0
    res = CliRunner().invoke(app, ["search", "--index", str(root), "--asr", "  "])
    assert res.exit_code == 3 and "empty --asr query" in res.output

    # submit takes the same prefix in a KIS query: the spoken phrase's frames come first.
    from mergeseek.retrieval.submission import run_submit

    (tmp_path / "queries.tsv").write_text("q1\tkis\tasr: final match last night\n", encoding="utf-8")
    done = run_submit(tmp_path / "queries.tsv", root, tmp_path / "sub", searcher=Searcher(root))
    first = Path(done.files[0][3]).read_text(encoding="utf-8").splitlines()[0].split(",")
    assert first[0] == "football" and first[1] == str(hits_frame(root))

    # The web app takes the channel as an "asr:" prefix, alone or fused with a description.
    from fastapi.testclient import TestClient

    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    client = TestClient(create_app(Engine(CachedSearcher(root, encoder))))
    web = client.get("/api/search", params={"q": "asr: final match"}).json()["hits"]
    want = search_hybrid(Searcher(root), asr="final match", k=20)
    assert [h["id"] for h in web] == [h.id for h in want] and "[" in web[0]["channels"]["asr"]["text"]
    fused = client.get("/api/search", params={"q": "a test pattern ASR: final match"}).json()["hits"]
    assert set(fused[0]["channels"]) == {"image", "asr"} and fused[0]["id"] in {h.id for h in want}

    # merge-index and export carry the speech, transcribe nothing again
    import pyarrow.parquet as pq

    from mergeseek.indexing.export import META_FILE, export_index
    from mergeseek.indexing.merge import merge_indexes

    merge_indexes([root], tmp_path / "merged")
    assert len(_text_ids(tmp_path / "merged")) == len(committed) and hits_frame(tmp_path / "merged") == hits_frame(root)
    export_index(root, tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / META_FILE)
    said = [t for v, t in zip(table.column("video_id").to_pylist(), table.column("asr_text").to_pylist()) if v == "football"]
    assert any("match" in t for t in said) and not any(table.column("ocr_text").to_pylist() if "ocr_text" in table.column_names else [])


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_indexing_support import build_encoder
from mergeseek.indexing import IndexOptions, index_paths

def workers():
    me, out = str(os.getpid()), []
    for d in Path("/proc").iterdir():
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        if d.name.isdigit() and f"PPid:\\t{{me}}\\n" in status and b"spawn_main" in (d / "cmdline").read_bytes():
            out.append(d.name)
    return out

def die(keys):
    print("WORKERS", " ".join(workers()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

index_paths([{videos!r}], {root!r}, build_encoder(), IndexOptions(sampling="fps=1", asr="pocketsphinx", shard_size=1),
            on_commit=die)
"""


@needs_speech
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_kill_9_after_a_commit_leaves_no_worker_and_the_resumed_run_agrees(tmp_path, encoder):
    _pocketsphinx()
    import time

    from mergeseek.indexing import IndexOptions, index_paths
    from mergeseek.indexing.store import IndexStore

    videos = tmp_path / "videos"
    for name, sentence in SAID.items():
        _speaking_video(videos, name, sentence)
    root = tmp_path / "ix"
    script = _KILLED_RUN.format(tests=str(Path(__file__).parent), videos=str(videos), root=str(root))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    pids = [int(p) for line in done.stdout.splitlines() if line.startswith("WORKERS") for p in line.split()[1:]]
    assert pids, done.stdout  # the speech worker was running when the run died...
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.5)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)  # ...and left with it
    assert len(IndexStore.open_for_read(root).manifest.sources) == 1  # one video committed, one not
    report = index_paths([videos], root, encoder, IndexOptions(sampling="fps=1", asr="pocketsphinx"))
    assert len(report.indexed) == 1
    ids = sorted(IndexStore.open_for_read(root).read_vectors()[0].tolist())
    assert _text_ids(root) == ids  # every row once, its speech read by one of the two runs


@needs_speech
@pytest.mark.slow
def test_a_keyframe_release_takes_its_speech_from_the_release_s_videos(tmp_path, encoder):
    """AI Challenge keyframe folders have no sound: their frames take the speech of the release's
    video of the same id (a Videos_* folder, or --videos DIR), on the map's time line."""
    _pocketsphinx()
    from PIL import Image

    from mergeseek.indexing import Dedup, IndexOptions, index_paths
    from mergeseek.indexing.asr import sound_path
    from mergeseek.retrieval.hybrid import search_hybrid
    from mergeseek.retrieval.search import Searcher

    release, elsewhere = tmp_path / "release", tmp_path / "elsewhere"
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    for vid in ("L01_V001", "L01_V002"):
        kf = release / "keyframes" / vid
        kf.mkdir(parents=True)
        lines = ["n,pts_time,fps,frame_idx"]
        for n, t in enumerate(times, start=1):
            Image.fromarray(np.full((24, 32, 3), 40 * n, np.uint8)).save(kf / f"{n:03d}.jpg")
            lines.append(f"{n},{t},25.0,{int(t * 25)}")
        (release / "map-keyframes").mkdir(exist_ok=True)
        (release / "map-keyframes" / f"{vid}.csv").write_text("\n".join(lines) + "\n")
    _speaking_video(release / "videos", "L01_V001", SAID["football"])  # V001's video in the release
    _speaking_video(elsewhere, "L01_V002", SAID["rain"])  # V002's only through --videos
    assert sound_path("keyframes", release / "keyframes" / "L01_V001", "L01_V001") == str(release / "videos" / "L01_V001.mp4")
    assert sound_path("keyframes", release / "keyframes" / "L01_V002", "L01_V002") is None
    assert sound_path("images", release, "x") is None

    root = tmp_path / "ix"
    report = index_paths([release], root, encoder, IndexOptions(asr="pocketsphinx", dedup=Dedup(enabled=False)))
    assert not [b for b in report.failed if "asr" in b.reason]
    s = Searcher(root)
    hits = search_hybrid(s, asr="football team", k=3)
    assert hits and hits[0].video_id.endswith("L01_V001") and 0.5 <= hits[0].pts_time <= 4.5, hits
    assert not [h for h in search_hybrid(s, asr="flooding city", k=10) if h.video_id.endswith("L01_V002")]

    again = index_paths([release], tmp_path / "ix2", encoder,
                        IndexOptions(asr="pocketsphinx", dedup=Dedup(enabled=False), release_parts={"videos": str(elsewhere)}))
    assert again.text["asr"]["with_text"] > 0
    got = search_hybrid(Searcher(tmp_path / "ix2"), asr="flooding city center", k=3)
    assert got and got[0].video_id.endswith("L01_V002")
