"""`nanoseek init` and `nanoseek info`: write a random checkpoint with a tokenizer; count parameters and cache bytes."""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import torch

from nanoseek.checkpoint.hf import load_config, save_pretrained
from nanoseek.checkpoint.tokenizer import train_tokenizer
from nanoseek.model.config import ConfigError, ModelConfig
from nanoseek.model.presets import PRESETS, get_preset
from nanoseek.model.stats import format_stats, model_stats
from nanoseek.model.transformer import Transformer


def _resolve_config(name_or_dir: str) -> tuple[str, ModelConfig]:
    if Path(name_or_dir).is_dir():
        return name_or_dir, load_config(name_or_dir)
    if name_or_dir in PRESETS:
        return name_or_dir, get_preset(name_or_dir)
    raise ConfigError(f"{name_or_dir!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")


def cmd_info(args: argparse.Namespace) -> None:
    name, cfg = _resolve_config(args.model)
    print(format_stats(name, cfg, model_stats(cfg, cache_dtype_bytes=args.cache_bytes)))


def _default_corpus() -> list[str]:
    """Text for a tokenizer when no corpus is given: the R1-Zero template, arithmetic and prose."""
    rng = random.Random(0)
    lines = [
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
        "</answer> tags, respectively."
    ] * 20
    for _ in range(4000):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"What is {a} {op} {b}? <think> {a} {op} {b} = {value} </think> <answer>{value}</answer>")
    return lines


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def cmd_init(args: argparse.Namespace) -> None:
    cfg = get_preset(args.preset)
    stats = model_stats(cfg)
    need = (stats.total + stats.mtp) * 4
    if need > 0.8 * _physical_memory():
        raise ConfigError(
            f"preset {args.preset} needs {need / 2**30:.0f} GiB for fp32 weights; this machine has "
            f"{_physical_memory() / 2**30:.0f} GiB. Use `nanoseek info {args.preset}` to inspect it instead."
        )
    texts = Path(args.corpus).read_text(encoding="utf-8").splitlines() if args.corpus else _default_corpus()
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    cfg = cfg.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(args.seed)
    model = Transformer(cfg)  # initialized from the seeded generator
    out = Path(args.out)
    save_pretrained(model, out)
    tokenizer.save_pretrained(out)
    print(f"wrote {args.preset} ({stats.total:,} parameters, {tokenizer.vocab_size} tokens, seed {args.seed}) to {out}")


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="parameter counts and KV-cache sizes of a checkpoint or preset")
    info.add_argument("model", help="checkpoint directory or preset name")
    info.add_argument("--cache-bytes", type=int, default=2, help="bytes per cached value (2 = bf16)")
    info.set_defaults(func=cmd_info)

    init = sub.add_parser("init", help="write a randomly initialized checkpoint with a tokenizer")
    init.add_argument("--preset", required=True, choices=sorted(PRESETS))
    init.add_argument("--out", required=True, help="output directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--corpus", help="text file to train the tokenizer on (default: built-in sample)")
    init.set_defaults(func=cmd_init)
