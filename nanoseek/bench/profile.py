"""`nanoseek bench profile`: where the time of one engine decode step goes.

    nanoseek bench profile --preset small --seed 3 --threads 1
    nanoseek bench profile --model runs/small/checkpoints/step_00000300 --weights fp32 int8 --batch 1 16 \\
        --compile --no-compile --steps 20

For every (weights format, batch size, compiled or not) one engine decodes `batch` random prompts of
`--prompt-len` tokens greedily with EOS ignored. The requests are added and one `step()` prefills them
(prefill is not measured); compiled engines are warmed up first (`nanoseek.engine.compiled.warm_up`: every
graph variant compiled before anything is timed); then a few decode steps warm up and the same running
sequences are measured over `--steps` decode steps in each of three passes (a pass in which dynamo compiled
a new graph, a variant the warm-up missed, is run again, up to 3 times in all):

1. timed, nothing attached: wall ms per decode step and tokens/s (aggregate over the batch);
2. under `torch.profiler` (CPU activity only). Counted per step: the TOP-LEVEL aten operators (events with
   no CPU parent whose name starts with `aten::`; an operator called by another one, `aten::linear` ->
   `aten::addmm`, is counted inside its parent), and the top-level compiled-region events (`Torch-Compiled
   Region`, `CompiledFunction`, ...: one call into a torch.compile'd graph each). "ms in ops" is the time
   inside those top-level operators, "ms in regions" inside those compiled regions, and "outside" is the
   share of the profiled step in neither: Python, the scheduler, the sampler's bookkeeping, dispatch. Both
   are relative to the profiled pass's own wall time, which the profiler inflates by a few microseconds
   per recorded event; the plain ms/step comes from pass 1. Below the table, the `--top` operators by self
   time (every event, nested or not) with calls and ms per step;
3. eager engines only, under a `torch.overrides.TorchFunctionMode` that counts every Python-level torch call
   (functions, tensor methods and attribute reads such as `.shape`; calls made inside a call are not seen)
   and, of those, the host syncs: `tolist`, `item`, `__bool__`, `__int__`, `__float__`, `__index__`,
   `nonzero`, `cpu`. On a CPU these are conversions, not device synchronizations; on CUDA each one would
   wait for the device. A compiled engine is not run under the mode (it would disturb dynamo's tracing and
   guards): its two columns read "-".
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from nanoseek.bench.decode import checkpoint_dir
from nanoseek.checkpoint.hf import from_pretrained
from nanoseek.engine.compiled import compiled_graphs, warm_up
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.model.transformer import Transformer

SYNC_CALLS = frozenset({"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu"})
REGION_MARKS = ("Torch-Compiled Region", "CompiledFunction")
WARMUP_STEPS = 3
MAX_TRIES = 3  # a measured pass is repeated while it compiles a new graph (see _measured)


@dataclass
class ProfileConfig:
    model: str | None = None
    preset: str | None = None
    seed: int = 0
    weights: list[str] = field(default_factory=lambda: ["fp32"])
    batch: list[int] = field(default_factory=lambda: [1, 16])
    steps: int = 20
    prompt_len: int = 32
    compile: list[bool] = field(default_factory=lambda: [False])
    threads: int | None = None
    top: int = 8


class CallCounter(TorchFunctionMode):
    """Counts every Python-level torch call made while active, and of those the host syncs (SYNC_CALLS)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.syncs: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        name = getattr(func, "__name__", "")
        if name in SYNC_CALLS:
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


def make_engine(model: Transformer, max_batch: int, cache_tokens: int, weights: str, compiled: bool) -> Engine:
    return Engine(model, max_batch_size=max_batch, cache_tokens=cache_tokens, weights=weights, compile=compiled)


def _decode_steps(engine: Engine, n: int) -> tuple[float, int]:
    """Run n steps: (seconds, tokens made)."""
    t0, tokens = time.perf_counter(), 0
    for _ in range(n):
        tokens += len(engine.step())
    return time.perf_counter() - t0, tokens


def _measured(engine: Engine, n: int, context=contextlib.nullcontext) -> tuple[float, int, int, object]:
    """n steps under `context()`, run again (up to MAX_TRIES times in all) while a step compiled a new graph
    (a variant warm-up missed): (seconds, tokens, repeats, what the context gave)."""
    for tries in range(MAX_TRIES):
        graphs = compiled_graphs()
        with context() as ctx:
            seconds, tokens = _decode_steps(engine, n)
        if compiled_graphs() == graphs:
            break
    return seconds, tokens, tries, ctx


def _is_region(name: str) -> bool:
    return any(mark in name for mark in REGION_MARKS)


def _profiled(engine: Engine, steps: int, top: int) -> dict:
    """Pass 2: the decode steps under torch.profiler, summarized per step."""
    seconds, _, repeats, prof = _measured(engine, steps, lambda: profile(activities=[ProfilerActivity.CPU]))
    ops = regions = 0
    op_us = region_us = 0.0
    for ev in prof.events():
        if _is_region(ev.name):
            parent = ev.cpu_parent
            while parent is not None and not _is_region(parent.name):
                parent = parent.cpu_parent
            if parent is None:  # the outermost region event of a call into a compiled graph
                regions += 1
                region_us += ev.time_range.elapsed_us()
        elif ev.cpu_parent is None and ev.name.startswith("aten::"):
            ops += 1
            op_us += ev.time_range.elapsed_us()
    averages = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    wall_ms = seconds * 1e3 / steps
    op_ms, region_ms = op_us / 1e3 / steps, region_us / 1e3 / steps
    return {
        "profiled_ms_per_step": wall_ms,
        "repeats": repeats,
        "ops_per_step": ops / steps,
        "regions_per_step": regions / steps,
        "op_ms_per_step": op_ms,
        "region_ms_per_step": region_ms,
        "outside_share": min(1.0, max(0.0, 1 - (op_ms + region_ms) / wall_ms)),
        "top_ops": [
            {"name": a.key, "calls_per_step": a.count / steps, "ms_per_step": a.self_cpu_time_total / 1e3 / steps}
            for a in averages[:top]
        ],
    }


def _counted(engine: Engine, steps: int) -> dict:
    """Pass 3 (eager engines): Python-level torch calls and host syncs per step."""
    counter = _measured(engine, steps, CallCounter)[3]
    return {
        "torch_calls_per_step": counter.calls / steps,
        "syncs_per_step": sum(counter.syncs.values()) / steps,
        "syncs_by_name": {k: v / steps for k, v in counter.syncs.most_common()},
    }


def profile_one(engine: Engine, prompts: list[list[int]], steps: int, top: int) -> dict:
    """Prefill `prompts`, warm up, then the three passes over `steps` decode steps each (module docstring)."""
    eager = not engine.compiled
    n_tokens = WARMUP_STEPS + (3 if eager else 2) * MAX_TRIES * steps + 2
    params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)
    graphs = compiled_graphs()
    rids = [engine.add_request(p, params) for p in prompts]
    engine.step()  # admission: every prompt is prefilled and gets its first token
    if engine.waiting or len(engine.running) != len(prompts):
        raise NanoseekError(f"{len(prompts)} prompts did not all fit the engine's batch or cache")
    _decode_steps(engine, WARMUP_STEPS)
    seconds, tokens, repeats, _ = _measured(engine, steps)
    row = {"ms_per_step": seconds * 1e3 / steps, "tokens_per_s": tokens / seconds}
    row.update(_profiled(engine, steps, top))
    row["repeats"] += repeats
    row.update(_counted(engine, steps) if eager else {"torch_calls_per_step": None, "syncs_per_step": None})
    if len(engine.running) != len(prompts):
        raise NanoseekError("a sequence finished or was preempted while being profiled")
    for rid in rids:
        engine.abort(rid)
    row["late_graphs"] = compiled_graphs() - graphs  # compiled after warm_up: by the warm-up steps or measured passes
    return row


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict]) -> list[str]:
    out = [
        "| weights | batch | compiled | ms/step | tok/s | aten ops/step | compiled regions/step | ms in ops/step "
        "| ms in regions/step | outside ops | torch calls/step | syncs/step |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['weights']} | {r['batch']} | {'yes' if r['compiled'] else 'no'} | {r['ms_per_step']:.2f} "
            f"| {r['tokens_per_s']:.1f} | {r['ops_per_step']:.1f} | {r['regions_per_step']:.1f} "
            f"| {r['op_ms_per_step']:.2f} | {r['region_ms_per_step']:.2f} | {r['outside_share']:.0%} "
            f"| {_cell(r['torch_calls_per_step'], '.1f')} | {_cell(r['syncs_per_step'], '.1f')} |"
        )
    return out


def run(cfg: ProfileConfig, log=print) -> list[dict]:
    """Profile every configuration, print the table (and the top operators), return one dict per row."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    formats = list(dict.fromkeys(cfg.weights))
    batches = sorted(set(cfg.batch))
    if not formats or not batches or not cfg.compile or cfg.steps < 1 or min(batches) < 1:
        raise NanoseekError("profile needs at least one format, batch size >= 1, compile choice and step")
    if bool(cfg.model) == bool(cfg.preset):
        raise NanoseekError("give exactly one of --model and --preset")
    with checkpoint_dir(cfg.model, cfg.preset, cfg.seed) as (path, name):
        model = from_pretrained(path).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = {b: torch.randint(5, vocab, (b, cfg.prompt_len), generator=gen).tolist() for b in batches}
    max_b = max(batches)
    cache_tokens = max_b * (cfg.prompt_len + WARMUP_STEPS + 3 * MAX_TRIES * cfg.steps + 64)
    rows = []
    for fmt in formats:
        for compiled in dict.fromkeys(cfg.compile):
            engine = make_engine(model, max_b, cache_tokens, fmt, compiled)
            if engine.compiled:
                warm_up(engine)  # every graph variant compiled before anything is measured
            for b in batches:
                row = {"weights": fmt, "batch": b, "compiled": engine.compiled}
                row.update(profile_one(engine, prompts[b], cfg.steps, cfg.top))
                row["compile_seconds"] = engine.compile_seconds
                rows.append(row)
                log(f"  {fmt} batch {b} {'compiled' if row['compiled'] else 'eager'}: {row['ms_per_step']:.2f} ms/step")
            del engine

    log(f"\nnanoseek bench profile: {name}")
    log(
        f"  {torch.get_num_threads()} threads, torch {torch.__version__}; per decode step over {cfg.steps} steps "
        f"after {WARMUP_STEPS} warm-up steps; prompts of {cfg.prompt_len} tokens, greedy"
    )
    log("")
    for line in table(rows):
        log(line)
    if cfg.top:
        for r in rows:
            mode = "compiled" if r["compiled"] else "eager"
            extra = ""
            if r["compiled"]:
                extra = (
                    f", compiled in {r['compile_seconds']:.1f} s so far; {r['late_graphs']} graphs compiled after "
                    f"warm_up, {r['repeats']} measured passes repeated for it"
                )
            log(f"\n{r['weights']}, batch {r['batch']}, {mode}{extra}: top {len(r['top_ops'])} by self time")
            for op in r["top_ops"]:
                log(f"  {op['name'][:60]:60} {op['calls_per_step']:8.1f} calls {op['ms_per_step']:8.3f} ms")
            if r.get("syncs_by_name"):
                log("  host syncs per step: " + ", ".join(f"{k} {v:g}" for k, v in r["syncs_by_name"].items()))
    return rows
