"""Flags that several commands share, written once."""

from __future__ import annotations

import argparse


def add_allow_nonfinite_weights(parser: argparse.ArgumentParser) -> None:
    """`--allow-nonfinite-weights`: every command that loads a checkpoint refuses NaN/Inf weights without it."""
    parser.add_argument(
        "--allow-nonfinite-weights",
        action="store_true",
        help="load a checkpoint whose weights hold NaN or Inf (refused by default, naming the tensor: such a model "
        "generates garbage)",
    )
