"""Speech (``index --asr``) on videos whose sound is espeak-ng speech of known sentences: word error
rate, spoken-phrase recall, the engine's real-time factor and what ASR adds to an indexing run.

    python bench/speech_channels.py [--sentences 30] [--per-video 3] [--engine pocketsphinx] [--out bench_speech.json]

Each video holds ``--per-video`` English news sentences (``SENTENCES``), spoken by espeak-ng with
one of ``VOICES`` (voice variant and words per minute, taken in turn, so every voice speaks about
as many sentences), each preceded by 1.5 s of silence; the picture is ffmpeg's ``testsrc2`` at
1280x720, 10 fps (what the encoder sees does not matter here). The videos are indexed at one frame
per 2 s (``--every 20``), once without and once with ``--asr`` (random-weight ViT-B-32 on the CPU,
one torch thread: the encoder's weights do not change its cost).

Reported:

* WER per voice: each video transcribed by the engine in this process; the words of the segments
  whose middle lies in a sentence's stretch (its speech +- 0.75 s) are that sentence's hypothesis;
  WER = word edit distance / reference words, over all sentences of that voice.
* Recall of a spoken phrase in the top 10 of ``search --asr``: the share of sentences for which a
  hit of the right video lies within the sentence's speech +- 1 s (the frame window at 1 frame
  per 2 s), for (a) the whole sentence and (b) a 3-word phrase of it (words 2-4). The chance level
  (10 random frames of the index hitting one of the sentence's frames) is given beside it.
* The false-match control: 3-word phrases of sentences never spoken (``UNSPOKEN``); the share whose
  best hit matches at least 2/3 of the phrase (``indexing.text.match_score``). Words of the
  engine's other hypotheses (``also``, PocketSphinx's n-best) raise recall and this share together.
* The real-time factor: engine CPU seconds / seconds of sound (this process, one thread).
* The cost ``--asr`` adds to ``index_paths``: wall (``time.perf_counter``) and CPU time of this
  process and its children (``getrusage``; the speech workers are child processes, counted once
  they exit at the end of the run), with / without.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mergeseek.eval.metrics import edit_distance

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SENTENCES = [
    "the prime minister visited the new bridge in the north",
    "heavy rain caused flooding in the city center this morning",
    "the football team won the final match last night",
    "farmers are harvesting rice before the storm arrives",
    "the government announced a new plan for public schools",
    "thousands of people watched the fireworks over the river",
    "the price of gold rose sharply on monday",
    "a fire broke out at a factory near the airport",
    "doctors say the new hospital will open next year",
    "the president met business leaders to discuss trade",
    "traffic was blocked for hours after the accident on the highway",
    "scientists found a rare turtle on the island",
    "the stock market closed higher after a quiet day",
    "police arrested two men for stealing motorbikes",
    "the festival brings music and food to the old town",
    "electricity prices will increase from the first of july",
    "students took the national exam under hot weather",
    "the national assembly debated the land law today",
    "a strong earthquake shook the mountain villages",
    "fishermen returned to port because of high waves",
    "the new metro line carried its first passengers",
    "tourists crowded the beaches during the long holiday",
    "the central bank kept interest rates unchanged",
    "a young singer won the music contest on saturday",
    "workers repaired the road damaged by the landslide",
    "the museum opened an exhibition of ancient pottery",
    "coffee exports reached a record level this year",
    "the city planted ten thousand trees along the canal",
    "a cargo ship ran aground near the harbor",
    "the team doctor said the captain will miss the game",
]
# Sentences never spoken: their 3-word phrases (words 2-4) must find nothing confidently. The share
# whose best hit matches at least 2/3 of the phrase (``match_score``) is the false-match control.
UNSPOKEN = [
    "the mayor opened a new library downtown", "heavy snow closed the mountain pass", "the army held a parade in the capital",
    "a famous painter sold his last picture", "engineers tested a new electric bus", "the river flooded several rice fields",
    "a local chef won a cooking award", "the company hired more workers this spring", "volunteers cleaned the beach on sunday",
    "the train arrived late because of fog",
]
VOICES = [("en-us+f3", 150), ("en-us+klatt", 160), ("en-us+f2", 160), ("en-us", 175), ("en-us+m3", 140)]
FPS, GAP_S, EVERY = 10, 1.5, 20


def _run(*cmd) -> None:
    subprocess.run([str(c) for c in cmd], check=True, timeout=300, capture_output=True)


def make_videos(folder: Path, sentences: list, per_video: int) -> list[dict]:
    """Write the videos; returns one dict per sentence (video id, text, voice, speed, start, end in s)."""
    import wave

    folder.mkdir(parents=True, exist_ok=True)
    plan: list[dict] = []
    for v, first in enumerate(range(0, len(sentences), per_video)):
        vid = f"speech{v:02d}"
        parts, t = [], 0.0
        for j, text in enumerate(sentences[first : first + per_video]):
            voice, speed = VOICES[(first + j) % len(VOICES)]
            wav = folder / f"{vid}_{j}.wav"
            _run("espeak-ng", "-v", voice, "-s", speed, "-w", wav, text)
            with wave.open(str(wav)) as w:
                dur = w.getnframes() / w.getframerate()
            plan.append({"video_id": vid, "text": text, "voice": voice, "speed": speed, "start": t + GAP_S,
                         "end": t + GAP_S + dur})
            parts.append(wav)
            t += GAP_S + dur
        total = t + GAP_S
        inputs = [a for p in parts for a in ("-i", p)]
        chain = "".join(f"[{i + 1}:a]aresample=16000,adelay={int(GAP_S * 1000)}:all=1[a{i}];" for i in range(len(parts)))
        chain += "".join(f"[a{i}]" for i in range(len(parts))) + f"concat=n={len(parts)}:v=0:a=1,apad=pad_dur={GAP_S}[a]"
        _run("ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate={FPS}", *inputs,
             "-filter_complex", chain, "-map", "0:v", "-map", "[a]", "-t", f"{total:.2f}", "-c:v", "libx264",
             "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", folder / f"{vid}.mp4")
        for p in parts:
            p.unlink()
    return plan


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def transcribe_all(folder: Path, plan: list, engine_spec: str) -> dict:
    """WER per voice and the real-time factor (engine CPU time over sound duration, this process)."""
    from mergeseek.indexing.asr import get_engine
    from mergeseek.indexing.audio import SAMPLE_RATE, read_audio

    engine = get_engine(engine_spec)
    engine.transcribe(np.zeros(SAMPLE_RATE, np.float32))  # loads the model outside the timed part
    cpu = sound = 0.0
    by_voice: dict = {}
    for vid in sorted({p["video_id"] for p in plan}):
        samples = read_audio(folder / f"{vid}.mp4")
        t0 = time.process_time()
        segments = engine.transcribe(samples)
        cpu += time.process_time() - t0
        sound += len(samples) / SAMPLE_RATE
        for p in (p for p in plan if p["video_id"] == vid):
            mine = [s for s in segments if p["start"] - 0.75 <= (s.start_s + s.end_s) / 2 <= p["end"] + 0.75]
            hyp = " ".join(s.text for s in mine)
            p["heard"] = hyp
            p["also_heard"] = " ".join(s.also for s in mine if s.also)
            ref = _words(p["text"])
            v = by_voice.setdefault(f"{p['voice']} {p['speed']} wpm", [0, 0])
            v[0] += edit_distance(ref, _words(hyp))
            v[1] += len(ref)
    wer = {k: round(e / n, 3) for k, (e, n) in by_voice.items()}
    total = sum(e for e, _ in by_voice.values()) / sum(n for _, n in by_voice.values())
    return {"wer_by_voice": wer, "wer": round(total, 3), "rtf_cpu": round(cpu / sound, 4), "sound_s": round(sound, 1)}


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _index(folder: Path, root: Path, encoder, asr) -> tuple[float, float, dict]:
    from mergeseek.indexing import Dedup, IndexOptions, Sampling, index_paths

    shutil.rmtree(root, ignore_errors=True)
    t0, c0 = time.perf_counter(), _cpu()
    report = index_paths([folder], root, encoder, IndexOptions(sampling=Sampling("every", EVERY), dedup=Dedup(enabled=False),
                                                              asr=asr))
    return time.perf_counter() - t0, _cpu() - c0, report.text.get("asr", {})


def recall(root: Path, plan: list) -> dict:
    from mergeseek.retrieval.hybrid import search_hybrid
    from mergeseek.retrieval.search import Searcher

    s = Searcher(root)
    n_frames = s.size
    found = {"sentence": 0, "phrase3": 0}
    chance = []
    for p in plan:
        def near(h) -> bool:
            return h.video_id == p["video_id"] and p["start"] - 1.0 < h.pts_time < p["end"] + 1.0

        words = p["text"].split()
        for kind, query in (("sentence", p["text"]), ("phrase3", " ".join(words[1:4]))):
            p[f"query_{kind}"] = query
            hits = search_hybrid(s, asr=query, k=10)
            ok = any(near(h) for h in hits)
            p[f"found_{kind}"] = ok
            p[f"rank_{kind}"] = next((r for r, h in enumerate(hits, 1) if near(h)), None)
            found[kind] += ok
        step = EVERY / FPS  # kept frames at 0, 2, 4... s
        good = sum(1 for k in range(int(p["end"] // step) + 2) if p["start"] - 1.0 < k * step < p["end"] + 1.0)
        chance.append(min(1.0, 1 - np.prod([(n_frames - good - i) / (n_frames - i) for i in range(10)])))
    from mergeseek.indexing.text import open_text_index

    ix = open_text_index(root, s.store.shard_names())
    false = []
    for text in UNSPOKEN:
        phrase = " ".join(text.split()[1:4])
        top = ix.search(phrase, "asr", 1)
        false.append({"phrase": phrase, "best": top[0].text if top else "", "score": top[0].score if top else 0.0})
    mrr = {kind: round(float(np.mean([1.0 / p[f"rank_{kind}"] if p[f"rank_{kind}"] else 0.0 for p in plan])), 3)
           for kind in ("sentence", "phrase3")}
    return {"recall_top10_sentence": round(found["sentence"] / len(plan), 3),
            "recall_top10_phrase3": round(found["phrase3"] / len(plan), 3), "mrr_top10": mrr,
            "chance_top10": round(float(np.mean(chance)), 3), "frames_in_index": n_frames,
            "unspoken_phrase_confident_match": round(float(np.mean([f["score"] >= 2 / 3 for f in false])), 3),
            "unspoken": false}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=30, help="Sentences spoken (at most len(SENTENCES)).")
    ap.add_argument("--per-video", type=int, default=3, help="Sentences per video.")
    ap.add_argument("--engine", default="pocketsphinx", help="--asr engine.")
    ap.add_argument("--out", type=Path, default=None, help="Write the JSON report here.")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool}: apt-get install {tool}")
    import torch

    torch.set_num_threads(1)
    from mergeseek.encoders import Encoder

    with tempfile.TemporaryDirectory(prefix="mergeseek-speech-bench-") as tmp:
        tmp = Path(tmp)
        plan = make_videos(tmp / "videos", SENTENCES[: args.sentences], args.per_video)
        heard = transcribe_all(tmp / "videos", plan, args.engine)
        encoder = Encoder(model_name="ViT-B-32", pretrained=None, device="cpu", batch_size=16)
        wall0, cpu0, _ = _index(tmp / "videos", tmp / "plain", encoder, None)
        wall1, cpu1, stats = _index(tmp / "videos", tmp / "asr", encoder, args.engine)
        found = recall(tmp / "asr", plan)
    report = {
        "engine": args.engine, "sentences": len(plan), "videos": len({p["video_id"] for p in plan}), **heard, **found,
        "index_wall_s": {"plain": round(wall0, 2), "asr": round(wall1, 2)},
        "index_cpu_s": {"plain": round(cpu0, 2), "asr": round(cpu1, 2)},
        "cost_ratio_wall": round(wall1 / wall0, 2), "cost_ratio_cpu": round(cpu1 / cpu0, 2),
        "asr_busy_s": stats.get("busy_s"), "threads": 1,
        "clock": "rtf: time.process_time of the engine in this process; index wall: time.perf_counter; index cpu: "
                 "getrusage self + children (speech workers are child processes)",
        "load_avg": os.getloadavg()[0], "per_sentence": plan,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "per_sentence"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
