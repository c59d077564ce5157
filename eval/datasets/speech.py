"""``speech-words``: spoken words synthesised offline with espeak-ng, as log-mel spectrograms.

No audio data set can be downloaded here, so the audio reference (``reference-speech``) learns
from sound this machine makes. How one clip is made (all randomness from
``numpy.random.default_rng([seed, split, clip])``, ``test-xK`` below per render, so the set is a pure
function of its spec):

1. espeak-ng says one of :data:`WORDS` (Speech Commands' 20 core words) with one base voice
   (accent) and one variant (``-v en-us+f3``), at a random speed (``-s``, words per minute)
   and pitch (``-p``); the wav is read back through :func:`indexing.audio.read_audio` (the one
   audio reader) at 16 kHz mono.
2. Augmentation: the word is placed at a random offset in a ``clip_s`` window (time shift;
   the rest is silence), a random gain is applied, and noise is added at a random SNR: white
   noise, or a stationary hum (a few harmonics of a random fundamental) with white noise.
3. Features: a log-mel spectrogram (Hann window 25 ms, hop 10 ms, ``n_mels`` HTK mel bands
   20 Hz-8 kHz, ``log(mel + 1e-6)``), cut to ``frames`` frames, stored as float16.

The two splits never share a base voice or a variant: training uses :data:`TRAIN_VOICES` x
:data:`TRAIN_VARIANTS`, the test split :data:`TEST_VOICES` x :data:`TEST_VARIANTS`. Each
(word, voice, variant) is rendered ``renders`` times (speed and pitch drawn anew) and each render
augmented ``copies`` times.

A larger held-out split, ``test-xK`` (``--dataset speech-words,split=test-x20``), hears the same
unseen voices and variants as ``test`` with ``K`` times its renders per (word, voice, variant),
each with its own speed, pitch and augmentation: independent draws (none is a clip of ``test``),
seeded per (word, voice, variant, render) so every clip of ``test-x10`` is also one of
``test-x20``. It exists to measure small accuracy differences (a 1-point goal needs
more than ``test``'s 480 clips); ``test`` stays the default and unchanged.

The set is cached as ``<data-root>/speech_words/<key>/<split>.npz`` where ``key`` hashes the
spec and the espeak-ng version; a second call reads the cache. Same spec, same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence, Tuple, Union

import numpy as np

from mergeseek.errors import ConfigError, InputError, MissingDependencyError
from mergeseek.eval.datasets.base import ClassificationSet, ImageSource

log = logging.getLogger(__name__)

ESPEAK = "espeak-ng"
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
         "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
TEST_VOICES = ("en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3")
TEST_VARIANTS = ("m5", "m6", "f4", "f5")
SPLITS = ("train", "test")  # the spec's (train, test) pairs are indexed by this order
LARGE_TEST = re.compile(r"test-x([1-9][0-9]{0,2})")  # test-xK: K times the test split's renders, K in 1..999
LABEL_SPACE = "speech-words"
FORMAT = "mergeseek-speech-words/1"


@dataclass(frozen=True)
class SpeechWordsSpec:
    """Everything that decides the bytes of the set.

    Args:
        words: the classes, in label order.
        train_voices / test_voices, train_variants / test_variants: espeak-ng voices and
            variants of each split (disjoint: the test split hears unseen speakers).
        renders: renders per (word, voice, variant) in each split, as ``(train, test)``.
        copies: augmented copies per render, as ``(train, test)``.
        speed: espeak-ng words-per-minute range; pitch: espeak-ng pitch range (0-99).
        gain_db: gain range; snr_db: noise SNR range (signal = the word's own power).
        sample_rate, clip_s: the clip (16 kHz, 1.28 s -> 128 frames at hop 10 ms).
        n_mels, frames: feature size; n_fft, win, hop: the STFT (samples).
        seed: seeds every draw.
    """

    words: Tuple[str, ...] = WORDS
    train_voices: Tuple[str, ...] = TRAIN_VOICES
    test_voices: Tuple[str, ...] = TEST_VOICES
    train_variants: Tuple[str, ...] = TRAIN_VARIANTS
    test_variants: Tuple[str, ...] = TEST_VARIANTS
    renders: Tuple[int, int] = (2, 2)
    copies: Tuple[int, int] = (2, 1)
    speed: Tuple[int, int] = (120, 220)
    pitch: Tuple[int, int] = (20, 80)
    gain_db: Tuple[float, float] = (-18.0, 0.0)
    snr_db: Tuple[float, float] = (5.0, 30.0)
    sample_rate: int = 16000
    clip_s: float = 1.28
    n_mels: int = 64
    frames: int = 128
    n_fft: int = 512
    win: int = 400
    hop: int = 160
    seed: int = 0

    def __post_init__(self) -> None:
        if set(self.train_voices) & set(self.test_voices) or set(self.train_variants) & set(self.test_variants):
            raise ConfigError("speech-words train and test splits must not share a voice or a variant; "
                              f"shared: {sorted((set(self.train_voices) & set(self.test_voices)) | (set(self.train_variants) & set(self.test_variants)))}")
        if len(self.words) < 2:
            raise ConfigError(f"speech-words needs at least 2 words, got {self.words}")
        if int(self.clip_s * self.sample_rate) // self.hop + 1 < self.frames:
            raise ConfigError(f"clip_s={self.clip_s} gives fewer than frames={self.frames} frames at hop {self.hop}")

    def combos(self, split: str) -> list:
        """(label, voice, variant, render) of every render of ``split``, in a fixed order."""
        voices, variants = (self.train_voices, self.train_variants) if split == "train" else (
            self.test_voices, self.test_variants)
        k = large_test_multiple(check_split(split))
        n = self.renders[1] * k if k else self.renders[SPLITS.index(split)]
        return [(c, v, var, k) for c in range(len(self.words)) for v in voices for var in variants for k in range(n)]

    def copies_of(self, split: str) -> int:
        """Augmented copies per render in ``split`` (``test-xK`` takes the test split's)."""
        return self.copies[1] if large_test_multiple(split) else self.copies[SPLITS.index(check_split(split))]

    def render_rng(self, split: str, index: int, combo: tuple) -> np.random.Generator:
        """The generator of one render: ``[seed, split, index]`` for train and test (their bytes
        predate ``test-xK``), ``[seed, 2, word, voice, variant, render]`` for ``test-xK`` so that a
        render's draws do not depend on ``K`` (every clip of ``test-x10`` is also one of ``test-x20``)."""
        if large_test_multiple(split):
            label, voice, variant, k = combo
            return np.random.default_rng([self.seed, 2, label, self.test_voices.index(voice),
                                          self.test_variants.index(variant), k])
        return np.random.default_rng([self.seed, SPLITS.index(split), index])

    def key(self) -> str:
        blob = json.dumps({"spec": dataclasses.asdict(self), "espeak": espeak_version(), "format": FORMAT},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def large_test_multiple(split: str) -> int:
    """``K`` of a ``test-xK`` split name; 0 for any other name."""
    m = LARGE_TEST.fullmatch(str(split))
    return int(m.group(1)) if m else 0


def check_split(split: str) -> str:
    """``split`` when it names a split of the set; else one line listing the valid names."""
    if split not in SPLITS and not large_test_multiple(split):
        raise ConfigError(f"speech-words split={split!r} is not valid; choose train, test or test-xK "
                          f"(K = 1..999 times the test split's renders, e.g. test-x20)")
    return split


class SpeechSplit(NamedTuple):
    features: np.ndarray  # float16 [N, n_mels, frames]
    labels: np.ndarray  # int64 [N]
    voices: Tuple[str, ...]  # "voice+variant" per clip


# ------------------------------------------------------------------------------ espeak-ng
def espeak_binary() -> str:
    """The espeak-ng executable; refuses in one line when it is missing."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise MissingDependencyError("espeak-ng is not installed; install the Debian package: apt-get install espeak-ng")
    return path


def espeak_version() -> str:
    out = subprocess.run([espeak_binary(), "--version"], capture_output=True, text=True, check=False).stdout
    return out.split("Data at")[0].strip()


def speak(word: str, voice: str, variant: str, speed: int, pitch: int, sample_rate: int, tmp: Path) -> np.ndarray:
    """espeak-ng saying ``word`` -> float32 mono samples at ``sample_rate`` (via ``read_audio``)."""
    from mergeseek.indexing.audio import read_audio

    wav = tmp / "word.wav"
    cmd = [espeak_binary(), "-v", f"{voice}+{variant}", "-s", str(speed), "-p", str(pitch), "-w", str(wav), word]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not wav.is_file():
        raise InputError(f"espeak-ng failed for voice {voice}+{variant}: {done.stderr.strip()[:200]}; "
                         f"check `espeak-ng --voices` lists it")
    return read_audio(wav, sample_rate)


# ------------------------------------------------------------------------------ augmentation
def augment(word: np.ndarray, spec: SpeechWordsSpec, rng: np.random.Generator) -> np.ndarray:
    """One clip of ``spec.clip_s``: the word time-shifted into silence, gained, with noise."""
    n = int(round(spec.clip_s * spec.sample_rate))
    word = np.trim_zeros(np.asarray(word, np.float32)) if np.any(word) else np.zeros(1, np.float32)
    if len(word) > n:  # a slow render: keep a random window of it
        start = int(rng.integers(0, len(word) - n + 1))
        word = word[start:start + n]
    clip = np.zeros(n, np.float32)
    offset = int(rng.integers(0, n - len(word) + 1))
    clip[offset:offset + len(word)] = word
    clip *= np.float32(10 ** (rng.uniform(*spec.gain_db) / 20))
    power = float(np.mean(clip[offset:offset + len(word)] ** 2)) + 1e-12
    noise_power = power / 10 ** (rng.uniform(*spec.snr_db) / 10)
    noise = rng.standard_normal(n).astype(np.float32)
    if rng.random() < 0.5:  # a stationary hum: harmonics of a random fundamental, plus some hiss
        t = np.arange(n, dtype=np.float32) / spec.sample_rate
        f0 = rng.uniform(60.0, 400.0)
        hum = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 5))
        noise = hum.astype(np.float32) + 0.3 * noise
    noise *= np.float32(np.sqrt(noise_power / (float(np.mean(noise ** 2)) + 1e-12)))
    return np.clip(clip + noise, -1.0, 1.0).astype(np.float32)


def voiced_syllables(n: int, spec: SpeechWordsSpec = SpeechWordsSpec(), seed: int = 0, per_clip: int = 1) -> np.ndarray:
    """float32 [n, clip samples] of word-like sound made without espeak-ng, for the tests and
    benchmarks that need spectrogram input on any machine: ``per_clip`` voiced syllables
    (harmonics 1-8 of a fundamental gliding within 90-260 Hz under a Hann envelope, 0.15-0.5 s
    each), joined by short pauses and put through :func:`augment` (time shift, gain, white noise
    or hum). Seeded: same arguments, same samples."""
    rng = np.random.default_rng([seed, 1 << 20])
    sr = spec.sample_rate
    clips = []
    for _ in range(n):
        parts = []
        for _ in range(per_clip):
            t = np.arange(int(rng.uniform(0.15, 0.5) * sr))
            f0 = np.linspace(rng.uniform(90.0, 260.0), rng.uniform(90.0, 260.0), len(t))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            parts += [sum(np.sin(h * phase) / h for h in range(1, 9)) * np.hanning(len(t)) * 0.3,
                      np.zeros(int(rng.uniform(0.05, 0.3) * sr))]
        clips.append(augment(np.concatenate(parts).astype(np.float32), spec, rng))
    return np.stack(clips)


# ------------------------------------------------------------------------------ features
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 20.0, f_max: float = 8000.0) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular HTK-mel filters (peak 1)."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = hz(np.linspace(mel(f_min), mel(min(f_max, sample_rate / 2)), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel(clips: np.ndarray, spec: SpeechWordsSpec) -> np.ndarray:
    """float32 [N, samples] -> float32 [N, n_mels, frames] log-mel (torch.stft, one thread's result)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(clips, np.float32))
    window = torch.hann_window(spec.win)
    stft = torch.stft(x, n_fft=spec.n_fft, hop_length=spec.hop, win_length=spec.win, window=window,
                      center=True, return_complex=True)
    power = stft.abs().pow(2)  # [N, n_fft//2+1, T]
    fb = torch.from_numpy(mel_filterbank(spec.n_fft, spec.n_mels, spec.sample_rate))
    mels = torch.einsum("mf,nft->nmt", fb, power)
    return torch.log(mels + 1e-6)[..., : spec.frames].numpy()


# ------------------------------------------------------------------------------ generation
def generate_split(spec: SpeechWordsSpec, split: str) -> SpeechSplit:
    """Render, augment and featurise every clip of ``split`` (deterministic in ``spec``)."""
    copies = spec.copies_of(check_split(split))
    feats, labels, names = [], [], []
    with tempfile.TemporaryDirectory(prefix="speech-words-") as tmp:
        for i, combo in enumerate(spec.combos(split)):
            label, voice, variant, _ = combo
            rng = spec.render_rng(split, i, combo)
            speed, pitch = int(rng.integers(spec.speed[0], spec.speed[1] + 1)), int(rng.integers(*spec.pitch))
            word = speak(spec.words[label], voice, variant, speed, pitch, spec.sample_rate, Path(tmp))
            clips = np.stack([augment(word, spec, rng) for _ in range(copies)])
            feats.append(log_mel(clips, spec).astype(np.float16))
            labels += [label] * copies
            names += [f"{voice}+{variant}"] * copies
    return SpeechSplit(np.concatenate(feats), np.asarray(labels, np.int64), tuple(names))


def split_path(root: Union[str, Path], spec: SpeechWordsSpec, split: str) -> Path:
    return Path(root) / spec.key() / f"{split}.npz"


def load_split(root: Union[str, Path], split: str = "test", spec: SpeechWordsSpec = SpeechWordsSpec()) -> SpeechSplit:
    """``split`` from the cache under ``root`` (the ``speech_words`` folder), generated on first use."""
    from mergeseek.runtime import atomic_write

    path = split_path(root, spec, check_split(split))
    if not path.is_file():
        log.warning("generating speech-words %s split into %s (espeak-ng, once)", split, path)
        data = generate_split(spec, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")

        def save(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, features=data.features, labels=data.labels, voices=np.asarray(data.voices))
        atomic_write(path, save)
    with np.load(path) as z:
        return SpeechSplit(z["features"], z["labels"], tuple(str(v) for v in z["voices"]))


# ------------------------------------------------------------------------------ eval set
@dataclass(frozen=True)
class SpectrogramSource(ImageSource):
    """Log-mel spectrograms as the evaluator's "images": ``load(i)`` is a float32 tensor [1, F, T]
    (what ``reference-speech``'s preprocess expects), not a PIL image."""

    features: np.ndarray
    names: Tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def load(self, i: int):
        import torch

        return torch.from_numpy(self.features[i].astype(np.float32))[None]

    def label(self, i: int) -> str:
        return self.names[i] if self.names else str(i)

    def subset(self, idx: Sequence[int]) -> "SpectrogramSource":
        idx = list(idx)
        return SpectrogramSource(self.features[idx], tuple(self.names[i] for i in idx) if self.names else ())


def load_speech_words(root: Union[str, Path], split: str = "test") -> ClassificationSet:
    """The ``speech-words`` set for ``cli.py eval`` (scored by ``reference-speech``'s own head)."""
    data = load_split(root, split)
    return ClassificationSet(name="speech-words", images=SpectrogramSource(data.features, data.voices),
                             labels=data.labels, classes=WORDS, source=str(Path(root)), label_space=LABEL_SPACE)
