"""The `nanoseek` command line: thin wrappers that map flags onto the library's config dataclasses.

    nanoseek init --preset tiny --out ckpt/ [--seed 0] [--corpus text.txt]
    nanoseek info ckpt/            # or a preset name: deepseek-v3, small, ...

Each area registers its own subcommands from `nanoseek/cli/<area>.py` (`register(sub, bench)`), and its
benchmarks under `nanoseek bench <what>`; `chat.py` is the terminal chat. User errors (`NanoseekError`) are
one line on stderr and exit status 2.

Imports: any nanoseek package (the CLI is the top of the house; nothing imports it).
"""

from __future__ import annotations

import argparse
import sys

from nanoseek.cli import generate, model, plan, rl, serve, train, zero
from nanoseek.errors import NanoseekError

COMMAND_MODULES = (model, serve, rl, train, generate, zero, plan)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 and R1-Zero, small and readable.")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks: nanoseek beside the reference, as ratios")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for module in COMMAND_MODULES:
        module.register(sub, bench_sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (NanoseekError, FileNotFoundError, UnicodeDecodeError) as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanoseek {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
