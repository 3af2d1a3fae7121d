"""`nanoseek bench constrained`: what grammar-constrained decoding costs, constrained vs free rows of one batch.

    nanoseek bench constrained --preset tiny --batch 16 --threads 1      # random weights, a tokenizer made here
    nanoseek bench constrained --model runs/zero/model --mtp             # a checkpoint and its own tokenizer

One engine decodes `--batch` sequences sampled at temperature 1 (seeded), in three kinds of batch: all free
(EOS ignored, so every row makes `--tokens` tokens), all constrained by a realistic JSON schema (a list of person
records: strings with bounds and a pattern, an integer range, an enum, a nested object, arrays; at least
`MIN_RECORDS` of them, so no row can finish early and the batch stays full), and half and half. Reported, as
medians over `--rounds` interleaved rounds (each starting with the next kind): decode tokens/s (the steps
after the prefill, all rows together) and the constrained/free ratio, the time the engine spent on the grammar
per constrained token (the sampler's `token_masks`: the matchers' masks, unpacking, MTP's draft checks; and
advancing the matchers) and its share of the decode time, with MTP the tokens each row gains per step, the
grammar's compile time, and the 1-minute load average before and after (the machine is shared, and free and
constrained rows write different tokens, which route to different experts: the ratios move by 10-15% from
run to run; the grammar's own share is the steadier figure).

A preset's checkpoint has random weights and a byte-level BPE tokenizer trained here on synthetic JSON and
made-up words to the preset's vocabulary size (the tokenizer's merges, not its quality, set the mask's cost).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from nanoseek.checkpoint.hf import from_pretrained
from nanoseek.checkpoint.tokenizer import Tokenizer, train_tokenizer
from nanoseek.engine import constrain, sampling
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.model.presets import get_preset
from nanoseek.model.transformer import Transformer

MIN_RECORDS = 64
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["name", "age", "role", "active", "address"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": PERSON, "minItems": MIN_RECORDS}},
    "required": ["people"],
    "additionalProperties": False,
}
WORDS = "the of and to in is was for on that with as by at from city name user admin guest street square".split()


@dataclass
class ConstrainedBenchConfig:
    model: str | None = None
    preset: str | None = None
    seed: int = 0
    batch: int = 16
    tokens: int = 64
    rounds: int = 3
    threads: int | None = None
    mtp: bool = False
    prompt: str = "A JSON list of people:"
    kinds: list[str] = field(default_factory=lambda: ["free", "constrained", "mixed"])


def synthetic_corpus(seed: int, n: int = 6000) -> list[str]:
    """JSON records and sentences over a Zipf-distributed lexicon of made-up words: text with the merges a
    JSON-writing tokenizer has, rich enough for a vocabulary of 8K tokens."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    lexicon = WORDS + ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(6000)]
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(lexicon))))
    word = lambda: rng.choices(lexicon, cum_weights=cum)[0]  # noqa: E731
    out = []
    for i in range(n):
        rec = {
            "name": f"{word().title()} {word().title()}",
            "age": rng.randint(0, 99),
            "email": f"{word()}{i}@{word()}.com",
            "role": rng.choice(["admin", "user", "guest"]),
            "active": rng.random() < 0.5,
            "tags": [word() for _ in range(rng.randint(0, 3))],
            "address": {"street": f"{rng.randint(1, 99)} {word().title()} St", "city": word().title(), "zip": "12345"},
            "scores": [round(rng.random() * 10, 2)],
        }
        out.append(json.dumps(rec))
        out.append(" ".join(word() for _ in range(12)) + ".")
    return out


def load(cfg: ConstrainedBenchConfig) -> tuple[Transformer, Tokenizer, str]:
    if bool(cfg.model) == bool(cfg.preset):
        raise NanoseekError("give exactly one of --model and --preset")
    if cfg.model:
        tok = Tokenizer.from_pretrained(cfg.model)
        return from_pretrained(cfg.model), tok, cfg.model
    mc = get_preset(cfg.preset)
    tok = train_tokenizer(synthetic_corpus(cfg.seed), vocab_size=mc.vocab_size)
    mc = mc.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(cfg.seed)
    return Transformer(mc), tok, f"preset {cfg.preset} (random weights, seed {cfg.seed}, {tok.vocab_size} tokens)"


class _MaskClock:
    """Times the grammar's whole share of a step while installed: the sampler's `token_masks` (the matchers'
    masks, unpacking them, MTP's draft checks) and `Matcher.advance` (each appended token)."""

    def __init__(self):
        self.seconds = 0.0
        self.saved = sampling.token_masks, constrain.Matcher.advance

    def __enter__(self):
        def timed(f):
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return f(*a, **kw)
                finally:
                    self.seconds += time.perf_counter() - t0

            return wrapper

        sampling.token_masks, constrain.Matcher.advance = map(timed, self.saved)
        return self

    def __exit__(self, *exc):
        sampling.token_masks, constrain.Matcher.advance = self.saved


def _round(engine: Engine, prompt: list[int], kind: str, cfg: ConstrainedBenchConfig, c, r: int) -> dict:
    """One batch of `kind`; decode tokens/s after the prefill step, and mask seconds per constrained token."""
    for i in range(cfg.batch):
        grammar = kind == "constrained" or (kind == "mixed" and i % 2 == 0)
        seed = r * 1000 + i
        engine.add_request(
            prompt, SamplingParams(max_tokens=cfg.tokens, seed=seed, ignore_eos=True, constraint=c if grammar else None)
        )
    engine.step()  # prefill and first tokens
    before, steps = engine.stats.generated_tokens, engine.stats.decode_steps
    with _MaskClock() as clock:
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        dt = time.perf_counter() - t0
    n = engine.stats.generated_tokens - before
    n_constrained = n if kind == "constrained" else n // 2 if kind == "mixed" else 0
    for rid in list(engine.requests):
        outs = engine.pop_output(rid).outputs
        if any(o.finish_reason != "length" for o in outs):
            raise NanoseekError(f"a row finished early ({outs[0].finish_reason}): the batch was not full")
    share, per_step = clock.seconds / dt, n / max(engine.stats.decode_steps - steps, 1) / cfg.batch
    mask_us = clock.seconds / n_constrained * 1e6 if n_constrained else 0.0
    return {"tok_s": n / dt, "mask_us": mask_us, "share": share, "tokens_per_step": per_step}


def run(cfg: ConstrainedBenchConfig) -> dict[str, float]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok, name = load(cfg)
    load_before = os.getloadavg()[0]
    vocab = model.config.vocab_size
    t0 = time.perf_counter()
    grammars = constrain.Grammars(tok, vocab)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = grammars.json(SCHEMA)
    t_compile = time.perf_counter() - t0
    engine = Engine(model, tok, max_batch_size=cfg.batch, use_mtp=cfg.mtp)
    prompt = tok.encode(cfg.prompt)
    _round(engine, prompt, "constrained", ConstrainedBenchConfig(batch=cfg.batch, tokens=8), c, -1)  # warm-up
    results: dict[str, list[dict]] = {k: [] for k in cfg.kinds}
    for r in range(cfg.rounds):
        for j in range(len(cfg.kinds)):  # each round starts with the next kind: none always runs first or last
            kind = cfg.kinds[(r + j) % len(cfg.kinds)]
            results[kind].append(_round(engine, prompt, kind, cfg, c, r))
    out = {"vocab": float(vocab), "tokenizer_s": t_tok, "compile_s": t_compile}
    for kind, rows in results.items():
        out[f"{kind}/tok_s"] = statistics.median(x["tok_s"] for x in rows)
        out[f"{kind}/tokens_per_row_step"] = statistics.median(x["tokens_per_step"] for x in rows)
        if kind != "free":
            out[f"{kind}/mask_us_per_token"] = statistics.median(x["mask_us"] for x in rows)
            out[f"{kind}/mask_share"] = statistics.median(x["share"] for x in rows)
    for kind in cfg.kinds:
        if kind != "free" and "free" in cfg.kinds:
            out[f"{kind}/vs_free"] = out[f"{kind}/tok_s"] / out["free/tok_s"]
    out["load_before"], out["load_after"] = load_before, os.getloadavg()[0]
    print(f"{name}: batch {cfg.batch}, {cfg.tokens} tokens, {cfg.rounds} rounds, MTP {'on' if cfg.mtp else 'off'}")
    print(f"  tokenizer trie {t_tok * 1e3:.1f} ms, schema compiled in {t_compile * 1e3:.1f} ms")
    for kind in cfg.kinds:
        line = f"  {kind:12s} {out[f'{kind}/tok_s']:8.1f} tok/s"
        if cfg.mtp:
            line += f" ({out[f'{kind}/tokens_per_row_step']:.2f} tokens per row per step)"
        if kind != "free":
            line += f"  ({out.get(f'{kind}/vs_free', float('nan')):.2f}x free, "
            line += f"grammar {out[f'{kind}/mask_us_per_token']:.1f} us per constrained token, "
            line += f"{out[f'{kind}/mask_share']:.1%} of the decode time)"
        print(line)
    print(f"  load average (1 min): {load_before:.2f} before, {out['load_after']:.2f} after")
    return out
