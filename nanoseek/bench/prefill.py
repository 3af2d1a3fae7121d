"""`nanoseek bench prefill`: what chunked prefill buys the streams already running when long prompts arrive.

    nanoseek bench prefill --preset tiny --threads 1                  # random weights, context made to fit
    nanoseek bench prefill --model runs/zero/model --prompt-len 400

One engine per budget (`--budgets`, prompt tokens prefilled per step; 0 = every admitted prompt whole, before
the step's decode): `--running` short requests decode until they are all running, then `--arrivals` prompts
of `--prompt-len` random tokens arrive at once. Measured from their arrival until the last of them has its
first token (the prefill window): the running streams' inter-token gaps (p50, p99, the longest), the
arrivals' time to first token (p50, the longest), and the prefill's share of the window. Medians over
`--rounds` interleaved rounds, each gap and TTFT also as a ratio to whole-prompt prefill. Greedy, prefix
caching off (each arrival's prompt is its own), no MTP, eager.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from nanoseek.checkpoint.hf import from_pretrained
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.model.presets import get_preset
from nanoseek.model.transformer import Transformer


@dataclass
class PrefillBenchConfig:
    model: str | None = None
    preset: str | None = None
    seed: int = 0
    running: int = 16  # requests decoding when the long prompts arrive
    arrivals: int = 8
    prompt_len: int = 1000
    budgets: list[int] = field(default_factory=lambda: [0, 256, 1024, 2048])
    rounds: int = 3
    threads: int | None = None


def measure(engine: Engine, running: list[list[int]], arrivals: list[list[int]]) -> dict[str, float]:
    """One arrival of long prompts beside running streams (see the module docstring); times in ms."""
    rest = SamplingParams(max_tokens=1 << 20, temperature=0, ignore_eos=True)  # never finish in the window
    ids = {engine.add_request(p, rest) for p in running}
    while engine.waiting or engine.prefilling:
        engine.step()
    engine.step()  # every running stream has decoded once: its next gap starts now
    t0 = time.perf_counter()
    last, gaps, ttft = dict.fromkeys(ids, t0), [], {}
    new = {engine.add_request(p, SamplingParams(max_tokens=1, temperature=0)) for p in arrivals}
    while len(ttft) < len(new):
        events = engine.step()
        now = time.perf_counter()
        for e in events:
            if e.request_id in last:
                gaps.append(now - last[e.request_id])
                last[e.request_id] = now
            elif e.request_id in new:
                ttft.setdefault(e.request_id, now - t0)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    gaps.sort()
    ms = 1e3
    return {
        "gap_p50": statistics.median(gaps) * ms,
        "gap_p99": gaps[int(0.99 * (len(gaps) - 1))] * ms,
        "gap_max": gaps[-1] * ms,
        "ttft_p50": statistics.median(ttft.values()) * ms,
        "ttft_max": max(ttft.values()) * ms,
    }


def run(cfg: PrefillBenchConfig, log=print) -> dict:
    if bool(cfg.model) == bool(cfg.preset):
        raise NanoseekError("give either --model DIR or --preset NAME")
    if any(b < 0 for b in cfg.budgets) or cfg.running < 1 or cfg.arrivals < 1 or cfg.prompt_len < 1:
        raise NanoseekError("--budgets must be >= 0 and --running, --arrivals, --prompt-len positive")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    context = cfg.prompt_len + 64
    if cfg.model:
        model, name = from_pretrained(cfg.model), cfg.model
        if model.config.max_position_embeddings < context:
            raise NanoseekError(f"--prompt-len {cfg.prompt_len} does not fit the model's context")
    else:  # random weights: the preset's shape with room for the prompts
        preset = get_preset(cfg.preset)
        torch.manual_seed(cfg.seed)
        model = Transformer(preset.replace(max_position_embeddings=max(context, preset.max_position_embeddings)))
        name = f"preset {cfg.preset} (random weights, seed {cfg.seed})"
    rng = random.Random(cfg.seed)
    vocab = model.config.vocab_size
    running = [[rng.randrange(3, vocab) for _ in range(24)] for _ in range(cfg.running)]
    arrivals = [[rng.randrange(3, vocab) for _ in range(cfg.prompt_len)] for _ in range(cfg.arrivals)]
    engines = {
        b: Engine(
            model,
            max_batch_size=cfg.running + cfg.arrivals,
            cache_tokens=(cfg.running + cfg.arrivals) * context * 2,
            prefix_caching=False,
            max_num_batched_tokens=b or None,
            compile=False,
        )
        for b in cfg.budgets
    }
    load = [os.getloadavg()[0]]
    for e in engines.values():  # warm-up
        measure(e, running[:2], arrivals[:1])
    results: dict[int, list[dict]] = {b: [] for b in cfg.budgets}
    for r in range(cfg.rounds):
        order = cfg.budgets[r % len(cfg.budgets) :] + cfg.budgets[: r % len(cfg.budgets)]
        for b in order:
            results[b].append(measure(engines[b], running, arrivals))
    load.append(os.getloadavg()[0])
    out = {b: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for b, rs in results.items()}
    log(
        f"{name}: {cfg.running} streams running, {cfg.arrivals} prompts of {cfg.prompt_len} tokens arrive; "
        f"medians of {cfg.rounds} rounds; load average {load[0]:.1f} -> {load[1]:.1f}"
    )
    log(f"{'budget':>8} {'gap p50':>9} {'gap p99':>9} {'gap max':>9} {'TTFT p50':>9} {'TTFT max':>9}  (ms)")
    whole = out.get(0)
    for b, m in out.items():
        line = f"{b or 'whole':>8} " + " ".join(f"{m[k]:9.1f}" for k in m)
        if whole and b:
            gap, ttft = m["gap_max"] / whole["gap_max"], m["ttft_max"] / whole["ttft_max"]
            line += f"   longest gap {gap:.2f}x, longest TTFT {ttft:.2f}x whole's"
        log(line)
    return {"budgets": out, "load": load}
