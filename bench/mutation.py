"""A mutation pass over the documented rules (issue #23): does the suite catch one-line bugs?

    python bench/mutation.py                      # every mutant, the area's tests plus tests/test_rules_*.py
    python bench/mutation.py --tests old          # the tests that existed before the rule tests
    python bench/mutation.py --only score --out mutation.json
    python bench/mutation.py --list               # the mutants, nothing run

Each mutant is one realistic one-line change (an inverted comparison, a dropped guard, a wrong
default, a swapped argument) to a rule that a doc states. The working tree is never touched (other
people run tests in it): the repository is copied once into a temporary folder (the files
``git ls-files`` lists, plus untracked ones that git does not ignore, as they are now; or a commit
with ``--ref``), ``import mergeseek`` is pointed at the copy (``PYTHONPATH`` holds a folder with a
``mergeseek`` symlink to it, checked before anything runs), and each mutant is applied there, one
at a time, and undone after its run. A mutant is killed when its tests fail, error or time out; the
unmutated copy must pass them first. One pytest process at a time (``-x``, no cache, no bytecode
written, so an undone mutant never leaves a stale ``.pyc`` behind).

A mutant marked ``equivalent`` cannot change behaviour (the reason is given); it is run and
reported but left out of the kill rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Area:
    """Code under one group of rules and the test files that cover it."""

    name: str
    old: tuple[str, ...]  # the suite's tests of this area before the rule tests
    rules: tuple[str, ...]  # the rule tests written against these mutants (run first: they are fast)


AREAS = {
    a.name: a
    for a in (
        Area("score", ("tests/test_aic_score.py", "tests/test_one_home.py"), ("tests/test_rules_submission.py",)),
        Area("submission", ("tests/test_aic_submit.py", "tests/test_records.py", "tests/test_aic_score.py",
                            "tests/test_one_home.py", "tests/test_bad_inputs.py"), ("tests/test_rules_submission.py",)),
        Area("store", ("tests/test_indexing_store.py", "tests/test_index_safety.py", "tests/test_serve_api.py"),
             ("tests/test_rules_store.py",)),
        Area("serve", ("tests/test_serve_api.py",), ("tests/test_rules_serve.py",)),
        Area("time", ("tests/test_decoders.py", "tests/test_indexing_sources.py", "tests/test_retrieval_search.py"),
             ("tests/test_rules_time.py",)),
        Area("reuse", ("tests/test_reuse.py",), ("tests/test_rules_reuse.py", "tests/test_reuse_roll.py",
                                                  "tests/test_reuse_query.py")),
    )
}


@dataclass(frozen=True)
class Mutant:
    area: str
    name: str
    file: str
    original: str  # must occur exactly once in the file
    mutated: str
    equivalent: str = ""  # why it cannot change behaviour (left out of the rate)


M = Mutant
MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ the official score (eval/aic_score.py)
    M("score", "span-start-exclusive", "eval/aic_score.py",
      "self.start - tolerance <= frame <= self.end + tolerance", "self.start - tolerance < frame <= self.end + tolerance"),
    M("score", "span-end-exclusive", "eval/aic_score.py",
      "self.start - tolerance <= frame <= self.end + tolerance", "self.start - tolerance <= frame < self.end + tolerance"),
    M("score", "tolerance-one-side", "eval/aic_score.py",
      "self.start - tolerance <= frame <= self.end + tolerance", "self.start - tolerance <= frame <= self.end"),
    M("score", "trake-frames-off-by-one", "eval/aic_score.py",
      "row[1 : 1 + len(truth.spans)]", "row[1 : len(truth.spans)]"),
    M("score", "qa-empty-answer-scores", "eval/aic_score.py",
      "normalize_answer(truth.answer) and normalize_answer(given) else 0.0",
      "normalize_answer(truth.answer) else 0.0"),
    M("score", "answer-case-kept", "eval/aic_score.py",
      'unicodedata.normalize("NFC", str(text)).casefold()', 'unicodedata.normalize("NFC", str(text))'),
    M("score", "rank-cutoff-exclusive", "eval/aic_score.py",
      "sum(1 for k in ks if rank <= k)", "sum(1 for k in ks if rank < k)"),
    M("score", "ks-wrong-cutoff", "eval/aic_score.py",
      "KS = (1, 5, 20, 50, MAX_ROWS)", "KS = (1, 5, 10, 50, MAX_ROWS)"),
    M("score", "rows-past-100-counted", "eval/aic_score.py",
      "scores = list(scores)[:MAX_ROWS]", "scores = list(scores)"),
    M("score", "file-reads-99-rows", "eval/aic_score.py",
      "read_rows(f, limit=MAX_ROWS)", "read_rows(f, limit=MAX_ROWS - 1)"),
    M("score", "tolerance-zero-override-ignored", "eval/aic_score.py",
      "a.tolerance if tolerance is None else tolerance", "tolerance or a.tolerance"),
    M("score", "within-default-30", "eval/aic_score.py",
      'float(row.get("within") or 60.0)', 'float(row.get("within") or 30.0)'),
    M("score", "tolerance-default-1", "eval/aic_score.py",
      '_frame(row.get("tolerance") or 0)', '_frame(row.get("tolerance") or 1)'),
    M("score", "max-frame-exclusive", "eval/aic_score.py",
      "f < 0 or f > MAX_FRAME or f != int(f)", "f < 0 or f >= MAX_FRAME or f != int(f)"),
    M("score", "negative-frame-accepted", "eval/aic_score.py",
      "f < 0 or f > MAX_FRAME or f != int(f)", "f > MAX_FRAME or f != int(f)"),
    M("score", "one-frame-span-refused", "eval/aic_score.py",
      "    if hi < lo:\n", "    if hi <= lo:\n"),
    M("score", "overflow-row-raises", "eval/aic_score.py",
      "except (TypeError, ValueError, OverflowError):\n        return 0.0",
      "except (TypeError, ValueError):\n        return 0.0"),
    # ------------------------------------------------------------------ the submission format (retrieval/)
    M("submission", "dedup-101-rows", "retrieval/submission.py", "if len(out) >= limit:", "if len(out) > limit:"),
    M("submission", "dedup-keeps-repeats", "retrieval/submission.py",
      "            seen.add(r)\n", "            pass\n"),
    M("submission", "max-rows-99", "retrieval/submission.py", "MAX_ROWS = 100", "MAX_ROWS = 99"),
    M("submission", "task-case-sensitive", "retrieval/submission.py",
      "_ALIASES.get(str(text).strip().lower())", "_ALIASES.get(str(text).strip())"),
    M("submission", "query-id-leading-dot", "retrieval/submission.py",
      'r"^[A-Za-z0-9][A-Za-z0-9._-]*$"', 'r"^[A-Za-z0-9._-]+$"'),
    M("submission", "query-id-unanchored", "retrieval/submission.py",
      'r"^[A-Za-z0-9][A-Za-z0-9._-]*$"', 'r"^[A-Za-z0-9][A-Za-z0-9._-]*"'),
    M("submission", "rows-bom-kept", "retrieval/records.py",
      'open(path, newline="", encoding="utf-8-sig")', 'open(path, newline="", encoding="utf-8")'),
    M("submission", "rows-limit-off-by-one", "retrieval/records.py",
      "if limit is not None and n >= limit:", "if limit is not None and n > limit:"),
    M("submission", "blank-rows-counted", "retrieval/records.py", "        if row:\n", "        if True:\n"),
    M("submission", "comment-lines-read", "retrieval/records.py",
      'if not stripped or stripped.startswith("#"):', "if not stripped:"),
    M("submission", "duplicate-query-id-accepted", "retrieval/submission.py",
      "        seen.add(q.qid)\n", "        pass\n"),
    M("submission", "query-text-limit-exclusive", "retrieval/submission.py",
      "if len(text) > MAX_QUERY_TEXT:", "if len(text) >= MAX_QUERY_TEXT:"),
    M("submission", "within-zero-accepted", "retrieval/submission.py",
      "if not within_s > 0:", "if within_s < 0:"),
    M("submission", "unmapped-kept-by-default", "retrieval/submission.py",
      "allow_unmapped: bool = False, **open_kwargs", "allow_unmapped: bool = True, **open_kwargs"),
    M("submission", "search-deeper-never-ends", "retrieval/submission.py",
      "or depth >= searcher.size:", "or depth > searcher.size:"),
    M("submission", "record-files-bom-kept", "runtime.py",
      'return path.read_text(encoding="utf-8-sig")', 'return path.read_text(encoding="utf-8")'),
    M("submission", "search-depth-100", "retrieval/submission.py",
      "depth = min(searcher.size, 2 * MAX_ROWS)", "depth = min(searcher.size, MAX_ROWS)"),
    # ------------------------------------------------------------------ the index store (indexing/)
    M("store", "journal-dotdot-followed", "indexing/journal.py",
      'if ".." in Path(name).parts or Path(name).is_absolute():', "if Path(name).is_absolute():"),
    M("store", "journal-absolute-followed", "indexing/journal.py",
      'if ".." in Path(name).parts or Path(name).is_absolute():', 'if ".." in Path(name).parts:'),
    M("store", "journal-no-manifest-inverted", "indexing/journal.py",
      "if on_disk is None and not name.endswith(TMP_TAG):", "if on_disk is None and name.endswith(TMP_TAG):"),
    M("store", "journal-faiss-not-kept", "indexing/journal.py",
      "keep = {MANIFEST, FAISS_FILE}", "keep = {MANIFEST}"),
    M("store", "journal-kept-after-recovery", "indexing/journal.py",
      "if on_disk is not None or not pending:", "if on_disk is not None and not pending:"),
    M("store", "journal-unlinks-folders", "indexing/journal.py", "            if p.is_file():\n", "            if p.exists():\n"),
    M("store", "rebuild-oldest-identity-wins", "indexing/layout.py",
      "newest = described[-1][2]", "newest = described[0][2]"),
    M("store", "rebuild-keeps-partial-identity", "indexing/layout.py",
      "if any(d.get(k) != identity[k] for k in IDENTITY_KEYS):", "if all(d.get(k) != identity[k] for k in IDENTITY_KEYS):"),
    M("store", "rebuild-next-id-reused", "indexing/layout.py",
      "int(ids.max()) + 1 if len(ids) else 0", "int(ids.max()) if len(ids) else 0"),
    M("store", "rebuild-next-shard-reused", "indexing/layout.py",
      "m.next_shard = max(m.next_shard, number + 1)", "m.next_shard = max(m.next_shard, number)"),
    M("store", "rebuild-shard-name-unanchored", "indexing/layout.py",
      '_SHARD_NAME = re.compile(r"^part-\\d{5,}$")', '_SHARD_NAME = re.compile(r"^part-\\d{5,}")'),
    M("store", "folder-journal-path-by-name", "indexing/layout.py",
      'if f"{p.name}/{q.name}" not in journaled', "if q.name not in journaled"),
    M("store", "thumbs-force-deletes-active-packs", "indexing/thumbs.py",
      "keep = set(m.shards) | set(active.shards if active is not None else ())", "keep = set(m.shards)"),
    M("store", "thumbs-pack-name-unanchored", "indexing/thumbs.py",
      '_PACK_NAME = re.compile(r"^(part-\\d{5,})\\.thumbs(\\.tmp)?$")',
      '_PACK_NAME = re.compile(r"^(part-\\d{5,})\\.thumbs(\\.tmp)?")'),
    M("store", "thumbs-kept-tmp-survives", "indexing/thumbs.py",
      "if mine and (mine.group(2) or mine.group(1) not in keep):", "if mine and mine.group(1) not in keep:"),
    M("store", "thumbs-force-ignored", "indexing/thumbs.py",
      "if not force and _pack_is_current(path, rows):", "if _pack_is_current(path, rows):"),
    # ------------------------------------------------------------------ the web app (serve/)
    M("serve", "bearer-case-sensitive", "serve/app.py",
      'auth[:7].lower() == "bearer "', 'auth[:7] == "Bearer "'),
    M("serve", "token-default-none", "serve/app.py",
      'request.query_params.get("token", "")', 'request.query_params.get("token")'),
    M("serve", "host-port-unchecked", "serve/app.py",
      "        if not port.isdigit():\n            return \"\"\n", "        if not port:\n            return \"\"\n"),
    M("serve", "host-bare-ipv6-accepted", "serve/app.py",
      "        return \"\"  # an IPv6 address must be bracketed", "        return h  # an IPv6 address must be bracketed"),
    M("serve", "host-any-ip-v4-only", "serve/app.py",
      'bool({"0.0.0.0", "::"} & allowed)', '"0.0.0.0" in allowed'),
    M("serve", "host-any-name-on-wildcard", "serve/app.py",
      "        except ValueError:\n            return False\n    return False",
      "        except ValueError:\n            return True\n    return False"),
    M("serve", "upload-png-limit-exclusive", "serve/app.py",
      'fmt != "JPEG" and w * h > MAX_DECODED_PIXELS', 'fmt != "JPEG" and w * h >= MAX_DECODED_PIXELS'),
    M("serve", "upload-png-limit-is-jpeg-limit", "serve/app.py",
      'if w * h > MAX_PIXELS or (fmt != "JPEG" and w * h > MAX_DECODED_PIXELS):', "if w * h > MAX_PIXELS:"),
    M("serve", "frame-id-unanchored", "serve/app.py", '_ID = re.compile(r"^[0-9]{1,18}\\Z")', '_ID = re.compile(r"^[0-9]{1,18}")'),
    M("serve", "frame-id-dollar", "serve/app.py", '_ID = re.compile(r"^[0-9]{1,18}\\Z")', '_ID = re.compile(r"^[0-9]{1,18}$")'),
    M("serve", "video-type-case-sensitive", "serve/engine.py",
      'VIDEO_TYPES.get(p.suffix.lower(), "application/octet-stream")', 'VIDEO_TYPES.get(p.suffix, "application/octet-stream")'),
    M("serve", "release-video-any-type", "serve/engine.py",
      "                if p.suffix.lower() in VIDEO_TYPES:\n", "                if p.suffix:\n"),
    M("serve", "video-without-signature-served", "serve/engine.py",
      "        if v.sig is None:\n", "        if v.sig is None and False:\n"),
    M("serve", "k-limit-exclusive", "serve/engine.py", "if not 1 <= int(k) <= MAX_K:", "if not 1 <= int(k) < MAX_K:"),
    # ------------------------------------------------------------------ timestamps and sampling
    M("time", "fill-negative-kept", "indexing/decoders.py",
      "bad = ~np.isfinite(ts) | (ts < 0)", "bad = ~np.isfinite(ts)"),
    M("time", "fill-without-rate", "indexing/decoders.py", "if bad.any() and fps > 0:", "if bad.any() and fps >= 0:"),
    M("time", "fill-rate-swapped", "indexing/decoders.py",
      "ts[bad] = np.flatnonzero(bad) / fps", "ts[bad] = np.flatnonzero(bad) * fps"),
    M("time", "finite-negative-rate", "indexing/decoders.py",
      "return v if math.isfinite(v) and v > 0 else 0.0", "return v if math.isfinite(v) else 0.0"),
    M("time", "timestamp-truncated", "retrieval/format.py", "ms = int(round(seconds * 1000))", "ms = int(seconds * 1000)"),
    M("time", "timestamp-inf-crashes", "retrieval/format.py",
      "if seconds is None or not math.isfinite(seconds):", "if seconds is None or math.isnan(seconds):"),
    M("time", "uniform-from-frame-0", "indexing/sampling.py",
      "np.floor((np.arange(k) + 0.5) * n_frames / k)", "np.floor(np.arange(k) * n_frames / k)"),
    M("time", "uniform-k-equals-n", "indexing/sampling.py", "if k >= n_frames:", "if k > n_frames:",
      equivalent="with k == n the middles floor((i + 0.5) * n / n) are exactly 0..n-1, the same frames"),
    M("time", "fps-nearest-is-floor", "indexing/sampling.py",
      "idx = np.rint(np.arange(count) * (video_fps / fps))", "idx = np.floor(np.arange(count) * (video_fps / fps))"),
    M("time", "fps-count-without-epsilon", "indexing/sampling.py",
      "count = max(1, math.ceil(duration * fps - 1e-9))", "count = max(1, math.ceil(duration * fps))"),
    M("time", "by-time-tie-to-later", "indexing/sampling.py",
      "np.abs(targets - ts[left]) <= np.abs(ts[right] - targets) + 1e-9",
      "np.abs(targets - ts[left]) < np.abs(ts[right] - targets)"),
    M("time", "by-time-end-without-last-frame", "indexing/sampling.py",
      "end = float(ts[0]), float(ts[-1]) + max(gap, 0.0)", "end = float(ts[0]), float(ts[-1])"),
    M("time", "every-zero-accepted", "indexing/sampling.py",
      'if self.mode in ("every", "uniform") and (self.value < 1 or', 'if self.mode in ("every", "uniform") and (self.value < 0 or'),
    M("time", "select-out-of-order-ignored", "indexing/sampling.py",
      "if not np.all(np.isfinite(ts)) or np.any(np.diff(ts) < 0):", "if not np.all(np.isfinite(ts)):"),
    # ------------------------------------------------------------------ reuse across frames (encoders/reuse/)
    M("reuse", "refresh-one-late", "encoders/reuse/stream.py",
      "if not new_ref and st.since + 1 >= cfg.refresh:", "if not new_ref and st.since >= cfg.refresh:"),
    M("reuse", "cut-inclusive", "encoders/reuse/stream.py",
      ".mean()) > cfg.cut:", ".mean()) >= cfg.cut:"),
    M("reuse", "cut-never", "encoders/reuse/stream.py",
      ".mean()) > cfg.cut:", ".mean()) > 1.0:"),
    M("reuse", "patch-gate-exclusive", "encoders/reuse/stream.py",
      "return hamming * (math.pi / self.cfg.bits) >= self.cfg.threshold",
      "return hamming * (math.pi / self.cfg.bits) > self.cfg.threshold"),
    M("reuse", "patch-angle-halved", "encoders/reuse/stream.py",
      "return hamming * (math.pi / self.cfg.bits) >= self.cfg.threshold",
      "return hamming * (math.pi / 2 / self.cfg.bits) >= self.cfg.threshold"),
    M("reuse", "evict-newest", "encoders/reuse/stream.py",
      "self.streams.popitem(last=False)", "self.streams.popitem(last=True)"),
    M("reuse", "evict-one-late", "encoders/reuse/stream.py",
      "while len(self.streams) > self.cfg.max_videos:", "while len(self.streams) > self.cfg.max_videos + 1:"),
    M("reuse", "lru-is-fifo", "encoders/reuse/stream.py",
      "            self.streams.move_to_end(vid)\n", ""),
    M("reuse", "since-not-reset", "encoders/reuse/stream.py",
      "                st.since = 0\n", ""),
    M("reuse", "since-not-advanced", "encoders/reuse/stream.py",
      "                st.since += 1\n", "                pass\n"),
    M("reuse", "reset-drops-all", "encoders/reuse/stream.py",
      "            self.streams.pop(video_id, None)", "            self.streams.clear()"),
    M("reuse", "row-gate-exclusive", "encoders/reuse/forward.py",
      "active = num / den >= (self.cfg.threshold if threshold is None else threshold)",
      "active = num / den > (self.cfg.threshold if threshold is None else threshold)"),
    M("reuse", "row-gate-prefix-ignored", "encoders/reuse/forward.py",
      "            active[:, :pre] |= any_rest\n", ""),
    M("reuse", "attn-zero-gated", "encoders/reuse/forward.py",
      "            if self.cfg.attn > 0:", "            if self.cfg.attn >= 0:"),
    M("reuse", "enabled-without-refresh", "encoders/reuse/config.py",
      "return self.threshold > 0 and self.refresh > 1", "return self.threshold > 0"),
    M("reuse", "cut-zero-accepted", "encoders/reuse/config.py",
      "if not 0.0 < self.cut <= 1.0:", "if not 0.0 <= self.cut <= 1.0:"),
    M("reuse", "refresh-zero-accepted", "encoders/reuse/config.py",
      "if self.refresh < 1:", "if self.refresh < 0:"),
    # rolling caches (roll=k, issue #27)
    M("reuse", "roll-groups-never-advance", "encoders/reuse/stream.py",
      "starts = bool(k) and st.since > 0 and st.since % k == 0", "starts = False"),
    M("reuse", "roll-groups-one-late", "encoders/reuse/stream.py",
      "starts = bool(k) and st.since > 0 and st.since % k == 0", "starts = bool(k) and st.since > 0 and st.since % (k + 1) == 0"),
    M("reuse", "roll-codes-not-rolled", "encoders/reuse/stream.py",
      "state[vid][1] = np.where(changed[:, None], codes[i], cmp)", "state[vid][1] = cmp"),
    M("reuse", "roll-group-in-its-base-pass", "encoders/reuse/stream.py",
      "if starts and vid in in_wave:", "if starts and vid in in_wave and False:"),
    M("reuse", "roll-input-cache-takes-every-row", "encoders/reuse/forward.py",
      'x_buf = self.rolled_rows(self.xr, "x", bi, idx, rows, self.xd)', "x_buf = self.xd"),
    M("reuse", "roll-mlp-input-cache-stale", "encoders/reuse/forward.py",
      'y_buf = self.rolled_rows(y_r, "y", bi, idx, rows, y_d)', 'y_buf = self.own(y_r, "y", bi)[0]'),
    M("reuse", "roll-negative-accepted", "encoders/reuse/config.py",
      "if self.roll < 0:", "if self.roll < -1:"),
    # query gate (query=T, issue #27 second round)
    M("reuse", "query-wide-never", "encoders/reuse/forward.py",
      "if cfg.query < cfg.threshold:", "if False:"),
    M("reuse", "query-wide-inclusive", "encoders/reuse/forward.py",
      "if cfg.query < cfg.threshold:", "if cfg.query <= cfg.threshold:"),
    M("reuse", "query-wide-drops-qkv-rows", "encoders/reuse/forward.py",
      "                    wide |= torch.as_tensor(act", "                    wide &= torch.as_tensor(act"),
    M("reuse", "query-proj-every-row", "encoders/reuse/forward.py",
      "            elif queries is not None:", "            elif False:"),
    M("reuse", "query-rows-of-the-wrong-token", "encoders/reuse/forward.py",
      "        pos = idx % n\n", "        pos = (idx + 1) % n\n"),
    M("reuse", "query-negative-accepted", "encoders/reuse/config.py",
      "if not (self.query >= 0 and", "if not (self.query >= -1 and"),
)


# ---------------------------------------------------------------------------- the copy
def make_copy(dest: Path, ref: Optional[str]) -> Path:
    """The repository's files in ``dest/repo`` (the working tree's, or ``ref``'s) and ``dest/path/mergeseek`` -> it."""
    repo = dest / "repo"
    repo.mkdir()
    if ref:
        archive = dest / "src.tar"
        subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), ref], check=True)
        with tarfile.open(archive) as tf:
            try:
                tf.extractall(repo, filter="data")
            except TypeError:  # a Python without extraction filters (before 3.11.4)
                tf.extractall(repo)
        archive.unlink()
    else:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                check=True, capture_output=True).stdout.decode().split("\0")
        for rel in filter(None, listed):
            src = REPO / rel
            if not src.is_file():  # deleted in the working tree, not yet committed
                continue
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    (dest / "path").mkdir()
    (dest / "path" / "mergeseek").symlink_to(repo)
    return repo


def _env(dest: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(dest / "path") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def check_import(dest: Path, repo: Path) -> str:
    """Where ``import mergeseek`` resolves in the copy; raises unless it is the copy."""
    out = subprocess.run([sys.executable, "-c", "import mergeseek, os; print(os.path.realpath(mergeseek.__file__))"],
                         cwd=repo, env=_env(dest), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).is_relative_to(repo.resolve()):
        raise SystemExit(f"import mergeseek resolves to {out}, not to the copy {repo}; the mutants would not be tested")
    return out


def run_tests(dest: Path, repo: Path, tests: Sequence[str], timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout', seconds, the last lines of the output) of one pytest run in the copy."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=_env(dest), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the pytest process and any child it started
        proc.communicate()
        return "timeout", time.perf_counter() - t0, ""
    tail = "\n".join(out.strip().splitlines()[-6:])
    return ("pass" if proc.returncode == 0 else "fail"), time.perf_counter() - t0, tail


def tests_for(area: Area, which: str) -> list[str]:
    """``old``: the area's existing tests; ``rules``: the rule tests; ``all``: both, rule tests first."""
    chosen = {"old": area.old, "rules": area.rules, "all": area.rules + area.old}[which]
    return list(dict.fromkeys(chosen))


@dataclass
class Outcome:
    area: str
    name: str
    file: str
    status: str  # killed | survived | equivalent-killed | equivalent-survived
    tests: str
    seconds: float
    equivalent: str = ""
    tail: str = field(default="", repr=False)


def apply(repo: Path, m: Mutant) -> str:
    """Write the mutant into the copy; returns the original text of the file."""
    path = repo / m.file
    text = path.read_text()
    if text.count(m.original) != 1:
        raise SystemExit(f"mutant {m.name}: its original text occurs {text.count(m.original)} times in {m.file}, "
                         "not once; update the mutant to the code as it is now")
    path.write_text(text.replace(m.original, m.mutated))
    return text


def restore(repo: Path, m: Mutant, text: str) -> None:
    path = repo / m.file
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # never the mutant's mtime


def summarize(outcomes: Sequence[Outcome]) -> dict:
    rows = {}
    for o in outcomes:
        r = rows.setdefault(o.area, {"mutants": 0, "killed": 0, "equivalent": 0})
        if o.status.startswith("equivalent"):
            r["equivalent"] += 1
            continue
        r["mutants"] += 1
        r["killed"] += o.status == "killed"
    total = {"mutants": sum(r["mutants"] for r in rows.values()), "killed": sum(r["killed"] for r in rows.values()),
             "equivalent": sum(r["equivalent"] for r in rows.values())}
    for r in list(rows.values()) + [total]:
        r["rate"] = round(r["killed"] / r["mutants"], 3) if r["mutants"] else None
    return {"areas": rows, "overall": total}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=sorted(AREAS), help="run this area only (repeatable)")
    p.add_argument("--name", action="append", help="run this mutant only (repeatable)")
    p.add_argument("--tests", choices=("all", "old", "rules"), default="all",
                   help="old: the tests before the rule tests; rules: the rule tests alone; all: both (default)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run; a mutant that runs longer is killed")
    p.add_argument("--ref", help="copy this commit instead of the working tree")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = p.parse_args(argv)

    mutants = [m for m in MUTANTS if (not a.only or m.area in a.only) and (not a.name or m.name in a.name)]
    if a.list:
        for m in mutants:
            print(f"{m.area:<11} {m.name:<36} {m.file}{'  (equivalent)' if m.equivalent else ''}")
        return {}
    if not mutants:
        raise SystemExit("no mutant matches --only/--name")
    with tempfile.TemporaryDirectory(prefix="mergeseek-mutation-") as tmp:
        dest = Path(tmp)
        repo = make_copy(dest, a.ref)
        print(f"copy: {repo}; import mergeseek -> {check_import(dest, repo)}", flush=True)
        for m in mutants:  # every mutant applies to the code as it is, before anything runs
            restore(repo, m, apply(repo, m))
        baseline = {}
        for area in dict.fromkeys(m.area for m in mutants):
            tests = tests_for(AREAS[area], a.tests)
            status, secs, tail = run_tests(dest, repo, tests, a.timeout)
            print(f"baseline {area}: {status} in {secs:.0f} s ({' '.join(tests)})", flush=True)
            if status != "pass":
                raise SystemExit(f"the unmutated copy does not pass the {area} tests; fix that first:\n{tail}")
            baseline[area] = round(secs, 1)
        outcomes = []
        for i, m in enumerate(mutants, 1):
            tests = tests_for(AREAS[m.area], a.tests)
            text = apply(repo, m)
            try:
                status, secs, tail = run_tests(dest, repo, tests, a.timeout)
            finally:
                restore(repo, m, text)
            verdict = "survived" if status == "pass" else "killed"
            if m.equivalent:
                verdict = "equivalent-" + verdict
            outcomes.append(Outcome(m.area, m.name, m.file, verdict, a.tests, round(secs, 1), m.equivalent,
                                    "" if status == "pass" else tail))
            print(f"[{i}/{len(mutants)}] {m.area:<11} {m.name:<36} {verdict:<20} {status:<8} {secs:5.0f} s", flush=True)
    summary = summarize(outcomes)
    print(f"\n{'area':<11} {'mutants':>7} {'killed':>6} {'rate':>6} {'equivalent':>10}")
    for area, r in list(summary["areas"].items()) + [("overall", summary["overall"])]:
        rate = "-" if r["rate"] is None else f"{100 * r['rate']:.0f}%"
        print(f"{area:<11} {r['mutants']:>7} {r['killed']:>6} {rate:>6} {r['equivalent']:>10}")
    survivors = [o.name for o in outcomes if o.status == "survived"]
    if survivors:
        print("survived: " + ", ".join(survivors))
    report = {"date": time.strftime("%Y-%m-%d"), "tests": a.tests, "ref": a.ref or "working tree",
              "baseline_seconds": baseline, **summary, "mutants": [asdict(o) for o in outcomes]}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
