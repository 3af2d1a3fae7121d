"""Flags that several commands share, written once."""

from __future__ import annotations

import argparse
import sys


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
