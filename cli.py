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


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
