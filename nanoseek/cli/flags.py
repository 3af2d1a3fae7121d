"""Flags that several commands share, written once."""

from __future__ import annotations

import argparse
import sys

from nanoseek.model.quant import WEIGHT_FORMATS

WEIGHTS_HELP = (
    "how the engine stores the linear and expert weights in memory: fp32 as trained; bf16 (half the bytes); "
    "int8, weight-only, one scale per output channel (about a quarter); int4, weight-only, a scale and zero per "
    "group of 64 input columns (about an eighth). The embedding, routers and norms stay fp32. Converted at "
    "load: the checkpoint on disk is unchanged"
)
COMPILE_HELP = (
    "torch.compile the engine's decode step (about a minute the first time, less from torch's on-disk cache); "
    "--compile or --no-compile forces it"
)


def add_allow_nonfinite_weights(parser: argparse.ArgumentParser) -> None:
    """`--allow-nonfinite-weights`: every command that loads a checkpoint refuses NaN/Inf weights without it."""
    parser.add_argument(
        "--allow-nonfinite-weights",
        action="store_true",
        help="load a checkpoint whose weights hold NaN or Inf (refused by default, naming the tensor: such a model "
        "generates garbage)",
    )


def add_progress(parser: argparse.ArgumentParser, text: str = "progress bars (default when a terminal)") -> None:
    """`--progress/--no-progress`: tqdm bars, on by default only when stderr is a terminal."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(), help=text)


def add_engine_weights(parser: argparse.ArgumentParser, several: bool = False, long_running: bool = True) -> None:
    """`--weights FORMAT` and `--compile/--no-compile`: every command that builds an engine passes them to
    `Engine(weights=..., compile=...)`. With `several` (a benchmark comparing formats), --weights takes a list.
    A `long_running` command (a server, a benchmark) lets the engine decide whether to compile; the others
    default to eager, since compiling costs more time than one generation or chat turn saves."""
    if several:
        parser.add_argument(
            "--weights",
            nargs="+",
            choices=WEIGHT_FORMATS,
            default=["fp32"],
            metavar="FORMAT",
            help=f"weight formats to measure, each in its own engine ({', '.join(WEIGHT_FORMATS)}; default fp32): "
            + WEIGHTS_HELP,
        )
    else:
        parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="fp32", help=WEIGHTS_HELP + " (default fp32)")
    default = "the engine decides: on where it is faster than eager" if long_running else "off"
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None if long_running else False,
        help=f"{COMPILE_HELP} (default: {default})",
    )
