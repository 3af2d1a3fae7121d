"""`nanoseek bench decode`: the engine against transformers' `generate` on the same checkpoint, in one run.

    nanoseek bench decode --preset small                      # random weights, saved and reloaded by both
    nanoseek bench decode --preset small --weights fp32 bf16 int8 int4    # each weight format, side by side
    nanoseek bench decode --model runs/small/checkpoints/step_00000300 --prompt "... User: What is 26 + 49? Assistant:"

One fp32 model is loaded; each `--weights` format gets its own engine built from it (an engine that stores
the weights in another format quantizes its own copy, see nanoseek/model/quant.py). Every engine first
decodes a few tokens at each `--batch` size (allocations, first-call costs, and with `--compile` the
compilation, whose time is reported when the engine records it). Reported, as medians over `--rounds`
interleaved rounds (each round measures every format and transformers in turn: the machine is shared and
noisy, so drift hits all sides alike):
- per weight format, prefill tokens/s of one `--prefill-len` prompt (nanoseek: the engine's prefill step;
  transformers: `generate` of one token) and greedy decode tokens/s at each `--batch` size, aggregate over
  the batch (nanoseek: the engine's decode steps after the prefill; transformers: `generate` of N+1 tokens
  minus `generate` of 1), with nanoseek / transformers as the ratio (transformers always runs fp32);
- per weight format, the bytes of weights a batch-1 token reads, as that format stores them (every weight
  of the main model but the input embedding, and of each MoE layer's routed experts only the
  top_k / n_routed_experts share a token is sent to), the GB/s of weights batch-1 decoding reads (those
  bytes x tokens/s), and its share of the memory-bandwidth limit: the copy bandwidth measured in this run
  (bytes read + written per second, before and after the rounds);
- KV-cache bytes per token: MLA's latent against a naive per-head cache and an MHA model of the same heads;
- with MTP modules in the checkpoint: the draft acceptance rate and the batch-1 decode speedup of
  self-speculative decoding over plain decoding (both nanoseek with fp32 weights, same prompts, interleaved).

Both sides run greedy decoding with EOS ignored, so every run makes exactly the tokens asked for. The
returned medians are keyed `prefill/nanoseek/<format>`, `decode<b>/nanoseek/<format>`,
`active_bytes/<format>`, `bandwidth_fraction/<format>`, ...; the fp32 figures also under the keys without
the format (`decode1/nanoseek`, `bandwidth_fraction`).

**Long contexts** (`--context`, in place of the table above): how decoding slows as the context grows, where
DeepSeek-V3.2's sparse attention (DSA) pays.

    nanoseek bench decode --preset long-v32 --context 1024 4096 16384 --compare-dense --threads 1

For each N: one random N-token prompt is prefilled (timed), then batch-1 greedy decode tokens/s is measured in
`--rounds` rounds of `--tokens` steps each, all on the one request (so the context during measurement runs from
N to N + rounds x tokens); medians. `--compare-dense` measures a V3.2 model beside its dense twin, the same
config and weights as model_type deepseek_v3 with the indexer dropped (every query attends to every earlier
token), rounds interleaved, and reports the ratio: the question a V3.2 user asks is what sparsity buys against
the same model attending densely, which two separately seeded presets would not answer. Also printed: the
engine cache's bytes per token (all layers: MLA's latent, plus the indexer key for V3.2) and the 1-minute
load average before and after. No transformers reference here: its `generate` at 16K tokens takes too long.
Prefill costs grow with N squared (the indexer scores every earlier token, and expanded attention under the
sparse mask scores them too): at 16K on 2 CPU cores, minutes. `--weights` applies its first format. Medians are
keyed `context<N>/decode/<label>`, `context<N>/prefill_s/<label>`, `context<N>/ratio`, `cache_bytes/<label>`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.checkpoint.hf import from_pretrained, save_pretrained
from nanoseek.checkpoint.tokenizer import Tokenizer
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.model.moe import MoE
from nanoseek.model.presets import get_preset
from nanoseek.model.quant import weight_bytes
from nanoseek.model.stats import model_stats
from nanoseek.model.transformer import Transformer, build_model
from nanoseek.plan.hardware import copy_bandwidth


@dataclass
class DecodeBenchConfig:
    model: str | None = None
    preset: str | None = None
    seed: int = 0
    prompt: list[str] | None = None  # texts; batches and the MTP rounds cycle through them
    prompt_len: int = 32
    prefill_len: int = 256
    tokens: int = 64
    batch: list[int] = field(default_factory=lambda: [1, 16])
    rounds: int = 3
    threads: int | None = None
    no_reference: bool = False
    bandwidth_mb: int = 256  # size of the copy that measures memory bandwidth (well past the caches)
    weights: list[str] = field(default_factory=lambda: ["fp32"])  # formats measured, one engine each
    compile: bool | None = None  # the engines' torch.compile'd decode step; None: where it is faster
    context: list[int] | None = None  # prompt lengths of the context sweep (which replaces the usual table)
    compare_dense: bool = False  # the sweep also measures a V3.2 model as dense V3 (its indexer dropped)


def engine_decode(engine: Engine, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
    """Greedy decode of n_new tokens for every prompt at once: (aggregate decode tokens/s after the prefill,
    acceptance rate of this run's drafts when the engine speculates)."""
    params = SamplingParams(max_tokens=n_new + 1, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    engine.step()  # admission: every prompt is prefilled and gets its first token
    if engine.waiting:
        raise NanoseekError(f"{len(prompts)} prompts did not fit the engine's batch or cache")
    drafts, accepted = engine.stats.draft_tokens, engine.stats.accepted_tokens
    t0, n = time.perf_counter(), 0
    while engine.has_unfinished():
        n += len(engine.step())
    dt = time.perf_counter() - t0
    for rid in ids:
        engine.pop_output(rid)
    d = engine.stats.draft_tokens - drafts
    return n / dt, (engine.stats.accepted_tokens - accepted) / d if d else 0.0


def engine_prefill(engine: Engine, prompt: list[int]) -> float:
    rid = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    engine.step()
    dt = time.perf_counter() - t0
    engine.pop_output(rid)
    return len(prompt) / dt


def hf_generate_time(hf, prompts: list[list[int]], n_new: int) -> float:
    """Wall time of transformers' greedy `generate` of n_new tokens for the prompts (left-padded)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.no_grad():
        hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return time.perf_counter() - t0


def active_weight_bytes(model: Transformer) -> int:
    """Bytes of weights one batch-1 decode token reads, as the model stores them (packed for quantized
    layers): every main-model weight but the input embedding (a row lookup) and, of each MoE layer's routed
    experts, the top_k / n_routed_experts share the token is sent to. MTP modules are not counted."""
    total = weight_bytes(model.norm) + weight_bytes(model.lm_head)  # a tied head reads the embedding: counted
    for layer in model.layers:
        total += weight_bytes(layer)
        if isinstance(layer.mlp, MoE):
            routed = weight_bytes(layer.mlp.experts)  # experts are stored alike: each holds routed / n bytes
            total -= routed - routed * layer.mlp.top_k // layer.mlp.n_experts
    return total


def _prompts(cfg: DecodeBenchConfig, tokenizer, vocab: int, batch: int, gen: torch.Generator) -> list[list[int]]:
    if cfg.prompt:
        if tokenizer is None:
            raise NanoseekError("--prompt needs a checkpoint with tokenizer.json")
        ids = [tokenizer.encode(cfg.prompt[i % len(cfg.prompt)]) for i in range(batch)]
        return [t if t[:1] == [tokenizer.bos_id] else [tokenizer.bos_id] + t for t in ids]  # templates may hold BOS
    return torch.randint(5, vocab, (batch, cfg.prompt_len), generator=gen).tolist()


@contextlib.contextmanager
def checkpoint_dir(model: str | None, preset: str | None, seed: int) -> Iterator[tuple[Path, str]]:
    """(directory, display name) of the checkpoint a benchmark measures: `model` itself, or the preset's random
    weights (seeded) saved to a temporary directory that lives while the block runs, so every side of the
    benchmark loads the same files."""
    if model:
        yield Path(model), model
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        save_pretrained(build_model(get_preset(preset)), tmp)
        yield Path(tmp), f"preset {preset} (random weights, seed {seed})"


def run(cfg: DecodeBenchConfig, log=print) -> dict:
    """Run the benchmark, print the table, return the medians."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    formats = list(dict.fromkeys(cfg.weights))  # in the order given, each once
    if not formats:
        raise NanoseekError("--weights needs at least one format")
    with checkpoint_dir(cfg.model, cfg.preset, cfg.seed) as (path, name):
        model = from_pretrained(path).eval()
        tokenizer = Tokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else None
        hf = None
        if cfg.context:
            return context_sweep(cfg, model, name, log)
        if not cfg.no_reference:
            # transformers is the reference, a dev dependency only: imported when it runs.
            import transformers

            transformers.logging.set_verbosity_error()
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    mc = model.config
    max_b = max(cfg.batch)
    cache_tokens = max_b * (cfg.prefill_len + cfg.tokens + 64)
    # One loaded model serves every format: an engine storing another format quantizes a copy of it.
    engines = {
        fmt: Engine(model, tokenizer, max_batch_size=max_b, cache_tokens=cache_tokens, weights=fmt, compile=cfg.compile)
        for fmt in formats
    }
    mtp_engine = mtp_plain = None
    if len(model.mtp):  # speculation is measured with fp32 weights only, against plain fp32 decoding
        mtp_engine = Engine(model, tokenizer, max_batch_size=1, use_mtp=True, compile=cfg.compile)
        mtp_plain = (
            engines["fp32"] if "fp32" in engines else Engine(model, tokenizer, max_batch_size=1, compile=cfg.compile)
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = {b: _prompts(cfg, tokenizer, mc.vocab_size, b, gen) for b in cfg.batch}
    n_mtp = max(cfg.rounds, len(cfg.prompt or []))
    mtp_prompts = _prompts(cfg, tokenizer, mc.vocab_size, n_mtp, gen)  # one per MTP round
    prefill_prompt = torch.randint(5, mc.vocab_size, (cfg.prefill_len,), generator=gen).tolist()

    # warm-up: a short run of each path at every batch size (allocations, first-call costs, compilation)
    for engine in engines.values():
        for b in cfg.batch:
            engine_decode(engine, prompts[b], 4)
    if mtp_engine:
        engine_decode(mtp_engine, mtp_prompts[:1], 4)
        engine_decode(mtp_plain, mtp_prompts[:1], 4)
    if hf is not None:
        hf_generate_time(hf, prompts[cfg.batch[0]], 2)

    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    bandwidth = [copy_bandwidth(cfg.bandwidth_mb << 20)]
    for r in range(cfg.rounds):
        for fmt, engine in engines.items():
            add(f"prefill/nanoseek/{fmt}", engine_prefill(engine, prefill_prompt))
        if hf is not None:
            add("prefill/transformers", cfg.prefill_len / hf_generate_time(hf, [prefill_prompt], 1))
        for b in cfg.batch:
            for fmt, engine in engines.items():
                add(f"decode{b}/nanoseek/{fmt}", engine_decode(engine, prompts[b], cfg.tokens)[0])
            if hf is not None:
                t_full, t_one = hf_generate_time(hf, prompts[b], cfg.tokens + 1), hf_generate_time(hf, prompts[b], 1)
                add(f"decode{b}/transformers", b * cfg.tokens / (t_full - t_one))
        if mtp_engine:
            one = [mtp_prompts[r]]
            tok_s, acc = engine_decode(mtp_engine, one, cfg.tokens)
            add("mtp/speculative", tok_s)
            add("mtp/acceptance", acc)
            add("mtp/plain", engine_decode(mtp_plain, one, cfg.tokens)[0])
        log(f"round {r + 1}/{cfg.rounds} done", flush=True)
    bandwidth.append(copy_bandwidth(cfg.bandwidth_mb << 20))
    med = {k: statistics.median(v) for k, v in res.items()}
    med["bandwidth"] = statistics.median(bandwidth)

    # ---- report --------------------------------------------------------------------------------
    first = engines[formats[0]]
    st = model_stats(mc, cache_dtype_bytes=first.cache.dtype.itemsize)
    log(f"\nnanoseek bench decode: {name}")
    log(
        f"  {st.total / 1e6:.1f}M parameters, {st.active / 1e6:.1f}M active per token; "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; medians of {cfg.rounds} rounds"
    )
    log(f"  memory: copy bandwidth {med['bandwidth'] / 1e9:.1f} GB/s (read + write) bounds the decode rate")
    log(f"  {'':34}{'nanoseek':>12}{'transformers':>14}{'ratio':>8}")
    rows = [("prefill", f"prefill tok/s ({cfg.prefill_len}-token prompt)")]
    rows += [(f"decode{b}", f"decode tok/s, batch {b}" + (" (aggregate)" if b > 1 else "")) for b in cfg.batch]
    for fmt, engine in engines.items():
        active = active_weight_bytes(engine.model)
        limit = med["bandwidth"] / active
        med[f"active_bytes/{fmt}"], med[f"bandwidth_limit/{fmt}"] = active, limit
        med[f"compile_seconds/{fmt}"] = engine.compile_seconds
        compiled = f"compiled in {engine.compile_seconds:.1f} s" if engine.compiled else "eager"
        log(
            f"  {fmt} weights ({compiled}): a batch-1 token reads {active / 1e6:.2f} MB of weights "
            f"-> memory-bandwidth limit {limit:.0f} tok/s"
        )
        for key, label in rows:
            ours, ref = med[f"{key}/nanoseek/{fmt}"], med.get(f"{key}/transformers")
            ref_s = f"{ref:14.1f}" if ref else f"{'-':>14}"
            ratio = f"{ours / ref:7.2f}x" if ref else f"{'-':>8}"
            log(f"    {label:32}{ours:12.1f}{ref_s}{ratio}")
        if f"decode1/nanoseek/{fmt}" in med:
            gbs = active * med[f"decode1/nanoseek/{fmt}"]
            med[f"weights_gbs/{fmt}"], med[f"bandwidth_fraction/{fmt}"] = gbs / 1e9, gbs / med["bandwidth"]
            log(
                f"    batch-1 decode reads {gbs / 1e9:.2f} GB/s of weights: "
                f"{gbs / med['bandwidth']:.0%} of the memory-bandwidth limit"
            )
    for key in [k for k in med if k.endswith("/fp32")]:  # the fp32 figures under their pre-format keys too
        plain = key.removesuffix("/fp32")
        if plain not in ("active_bytes", "weights_gbs", "compile_seconds"):
            med[plain] = med[key]
    b = st.cache_dtype_bytes
    log(
        f"  KV cache per token ({b}-byte values, {mc.num_hidden_layers} layers): MLA latent "
        f"{st.latent_cache_bytes:,} B; naive per-head K/V {st.naive_cache_bytes:,} B "
        f"({st.naive_cache_bytes / st.latent_cache_bytes:.1f}x); MHA with the same heads {st.mha_cache_bytes:,} B "
        f"({st.mha_cache_bytes / st.latent_cache_bytes:.1f}x)"
    )
    if mtp_engine:
        med["mtp/speedup"] = med["mtp/speculative"] / med["mtp/plain"]
        log(
            f"  MTP self-speculative decoding, fp32 weights, batch 1: acceptance {med['mtp/acceptance']:.0%}, "
            f"{med['mtp/speculative']:.1f} vs {med['mtp/plain']:.1f} tok/s plain -> {med['mtp/speedup']:.2f}x"
        )
    else:
        log("  MTP: the checkpoint has no MTP modules (nothing to measure)")
    return med


def dense_twin(model: Transformer) -> Transformer:
    """A DeepSeek-V3.2 model as DeepSeek-V3: the same config and weights with model_type deepseek_v3 and no
    indexer, so every query attends to every earlier token (dense MLA)."""
    dense = Transformer(model.config.replace(model_type="deepseek_v3"))
    missing, _ = dense.load_state_dict(model.state_dict(), strict=False)  # the unexpected keys: the indexers
    if missing:
        raise NanoseekError(f"the dense twin lacks {missing[:3]}")
    return dense.eval()


SWEEP_WARMUP = 4  # decode steps after the prefill before the clock starts (first-call costs, compilation)


def context_sweep(cfg: DecodeBenchConfig, model: Transformer, name: str, log=print) -> dict:
    """The `--context` run: batch-1 greedy decode tokens/s after a prefill of each length, with
    `--compare-dense` beside the model's dense twin; returns the medians keyed `context<n>/decode/<label>`."""
    mc = model.config
    if cfg.compare_dense and not mc.dsa:
        raise NanoseekError(
            "--compare-dense needs a deepseek_v32 model: it measures it beside itself without the indexer"
        )
    label = "V3.2" if mc.dsa else mc.model_type
    models = {label: model, "V3": dense_twin(model)} if cfg.compare_dense else {label: model}
    steps = SWEEP_WARMUP + cfg.rounds * cfg.tokens
    if min(cfg.context) < 1:
        raise NanoseekError("--context takes prompt lengths of at least 1 token")
    if max(cfg.context) + steps >= mc.max_position_embeddings:
        raise NanoseekError(
            f"--context {max(cfg.context)} plus {steps} decoded tokens exceeds the model's "
            f"{mc.max_position_embeddings} positions"
        )
    fmt = cfg.weights[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    load = [os.getloadavg()[0]]
    res: dict[str, list[float]] = {}
    med: dict[str, float] = {}
    for ctx in cfg.context:
        prompt = torch.randint(5, mc.vocab_size, (ctx,), generator=gen).tolist()
        params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
        engines = {}
        for key, m in models.items():  # one request each, alive through every round: one prefill per context
            engine = Engine(m, max_batch_size=1, cache_tokens=ctx + steps + 64, weights=fmt, compile=cfg.compile)
            engine.add_request(prompt, params)
            t0 = time.perf_counter()
            engine.step()
            med[f"context{ctx}/prefill_s/{key}"] = time.perf_counter() - t0
            for _ in range(SWEEP_WARMUP):
                engine.step()
            engines[key] = engine
            med[f"cache_bytes/{key}"] = engine.cache.bytes_per_token()
        for _ in range(cfg.rounds):  # interleaved: drift on a shared machine hits every model alike
            for key, engine in engines.items():
                t0 = time.perf_counter()
                for _ in range(cfg.tokens):
                    engine.step()
                res.setdefault(f"context{ctx}/decode/{key}", []).append(cfg.tokens / (time.perf_counter() - t0))
        for key, engine in engines.items():
            med[f"context{ctx}/decode/{key}"] = statistics.median(res[f"context{ctx}/decode/{key}"])
            med[f"context{ctx}/ms_per_token/{key}"] = 1e3 / med[f"context{ctx}/decode/{key}"]
        log(f"context {ctx} done", flush=True)
    load.append(os.getloadavg()[0])
    med["load_before"], med["load_after"] = load

    st = model_stats(mc, cache_dtype_bytes=4)
    log(f"\nnanoseek bench decode --context: {name}")
    log(
        f"  {st.total / 1e6:.1f}M parameters, {fmt} weights, batch 1, greedy; torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}; medians of {cfg.rounds} rounds of {cfg.tokens} tokens, decoded after a prefill "
        f"of the context (no transformers reference: its generate at these lengths takes too long)"
    )
    if mc.dsa:
        log(
            f"  V3.2: every query attends to its indexer's top {mc.index_topk} tokens "
            f"({mc.index_n_heads} indexer heads of {mc.index_head_dim})"
        )
    log(f"  load average (1 min): {load[0]:.2f} before, {load[1]:.2f} after")
    log("  cache bytes per token, all layers: " + ", ".join(f"{k} {med[f'cache_bytes/{k}']:,}" for k in models))
    keys = list(models)
    head = "".join(f"{k + ' tok/s':>14}" for k in keys) + "".join(f"{k + ' prefill s':>16}" for k in keys)
    ratio = f"{keys[0]} / {keys[1]}" if len(keys) == 2 else ""
    log(f"  {'context':>8}{head}{ratio:>12}")
    for ctx in cfg.context:
        row = "".join(f"{med[f'context{ctx}/decode/{k}']:14.1f}" for k in keys)
        row += "".join(f"{med[f'context{ctx}/prefill_s/{k}']:16.1f}" for k in keys)
        if len(keys) == 2:
            med[f"context{ctx}/ratio"] = med[f"context{ctx}/decode/{keys[0]}"] / med[f"context{ctx}/decode/{keys[1]}"]
            row += f"{med[f'context{ctx}/ratio']:11.2f}x"
        log(f"  {ctx:>8}{row}")
    return med
