"""Parameter and KV-cache accounting for a model config, computed on the meta device (no memory), and
`parameter_count`, the same count by arithmetic alone (no module built, so instant for any shape: what a
loader checks a stranger's config.json against before building anything).

Counting follows DeepSeek's reports: "total" is every main-model parameter; "active" is what one
token touches — everything except the input embedding (a table lookup, not compute) and the routed
experts it was not sent to. MTP modules are counted apart, as DeepSeek does (V3: 671B + 14B MTP).

DeepSeek-V4 caches no latent: one shared K = V head per token in a sliding window, plus compressed entries
(and CSA's indexer keys) that grow with the context at 1/4 or 1/128 of its length, so its bytes per token
depend on the context (`v4_cache_bytes_per_token`; the derivation is in docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.model.config import ModelConfig
from nanoseek.model.transformer import build_model
from nanoseek.model.v4_config import CSA, HCA, SLIDING


@dataclass(frozen=True)
class ModelStats:
    total: int  # main model parameters
    active: int  # per-token activated parameters (DeepSeek's convention, see module docstring)
    embedding: int
    mtp: int  # unique parameters of the MTP modules (embedding and head are shared)
    mtp_stored: int  # as a released checkpoint stores them: with copies of the embedding and head
    latent_cache_bytes: int  # per token, all layers: c_kv + k_pe (MLA)
    index_cache_bytes: int  # per token, all layers: the lightning indexer's key (V3.2 DSA; 0 without)
    naive_cache_bytes: int  # per token: expanded per-head K (nope+rope) and V
    mha_cache_bytes: int  # per token: an MHA model with the same heads, K and V of v_head_dim each
    cache_dtype_bytes: int


def model_stats(cfg: ModelConfig, cache_dtype_bytes: int = 2) -> ModelStats:
    with torch.device("meta"):
        model = build_model(cfg)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    embedding = model.embed_tokens.weight.numel()
    idle = 0
    for layer in model.layers:
        if hasattr(layer.mlp, "experts"):
            routed = sum(p.numel() for p in layer.mlp.experts.parameters())
            idle += routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
    active = total - embedding - idle
    if cfg.tie_word_embeddings:
        active += embedding  # the tied head still computes over the whole vocabulary
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    if cfg.v4 is not None:  # no latent: V4's context-dependent cache is v4_cache_bytes_per_token's
        mha = 2 * H * cfg.v4.head_dim * L * cache_dtype_bytes
        return ModelStats(total, active, embedding, mtp, mtp, 0, 0, mha, mha, cache_dtype_bytes)
    return ModelStats(
        total=total,
        active=active,
        embedding=embedding,
        mtp=mtp,
        mtp_stored=mtp + cfg.num_nextn_predict_layers * 2 * embedding,  # embed_tokens + shared_head.head
        latent_cache_bytes=(cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L * cache_dtype_bytes,
        index_cache_bytes=cfg.index_head_dim * L * cache_dtype_bytes if cfg.dsa else 0,
        naive_cache_bytes=H * (cfg.qk_head_dim + cfg.v_head_dim) * L * cache_dtype_bytes,
        mha_cache_bytes=2 * H * cfg.v_head_dim * L * cache_dtype_bytes,
        cache_dtype_bytes=cache_dtype_bytes,
    )


def v4_cache_bytes_per_token(cfg: ModelConfig, context: int, cache_dtype_bytes: int = 2) -> float:
    """DeepSeek-V4's KV cache for a `context`-token sequence, divided by its length. Per layer: the last
    sliding_window tokens' shared K = V vector (head_dim values), plus in CSA / HCA layers one compressed
    head_dim entry per `rate` tokens, plus in CSA layers one indexer key (index_head_dim) per entry."""
    v4, values = cfg.v4, 0
    for kind in v4.layer_types:
        values += min(context, v4.sliding_window) * v4.head_dim
        if kind != SLIDING:
            entries = context // v4.rate(kind)
            values += entries * (v4.head_dim + (cfg.index_head_dim if kind == CSA else 0))
    return values * cache_dtype_bytes / context


def parameter_count(cfg: ModelConfig) -> int:
    """Every parameter `build_model(cfg)` holds (main model and MTP modules; a tied head counted once),
    computed from the config alone. Buffers (router bias, expert counters: 2 floats per expert and MoE
    layer; V4's hash table) are not parameters and not counted. Tested equal to the meta-device count."""
    if cfg.v4 is not None:
        return _v4_parameter_count(cfg)
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, r, rope = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    bias = cfg.attention_bias
    if cfg.q_lora_rank == 0:
        q = D * H * qk
    else:
        q = D * cfg.q_lora_rank + bias * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    kv = D * (r + rope) + bias * (r + rope) + r + r * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attention = q + kv + H * cfg.v_head_dim * D + bias * D + 2 * D  # + the two norms of the block
    if cfg.dsa:  # the lightning indexer: wq_b, wk, k_norm (weight and bias), weights_proj
        Hi, Di = cfg.index_n_heads, cfg.index_head_dim
        attention += cfg.q_lora_rank * Hi * Di + D * Di + 2 * Di + D * Hi
    E, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
    moe = E * D + 3 * E * D * inter + 3 * D * inter * cfg.n_shared_experts
    dense = 3 * D * cfg.intermediate_size

    def block(i: int) -> int:
        return attention + (moe if cfg.is_moe_layer(i) else dense)

    L = cfg.num_hidden_layers
    main = cfg.vocab_size * D * (1 if cfg.tie_word_embeddings else 2) + D + sum(block(i) for i in range(L))
    mtp_extra = 2 * D + 2 * D * D + D  # enorm, hnorm, eh_proj, shared_head.norm
    return main + sum(block(L + k) + mtp_extra for k in range(cfg.num_nextn_predict_layers))


def _v4_parameter_count(cfg: ModelConfig) -> int:
    """DeepSeek-V4: per layer its hybrid attention, two mHC and the MoE; each MTP module a sliding-window layer
    plus e_proj, h_proj, three norms and its own HyperHead."""
    v4, D, H, q = cfg.v4, cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank
    hd, n, E, inter = v4.head_dim, v4.hc_mult, cfg.n_routed_experts, cfg.moe_intermediate_size
    attention = D * q + q + q * H * hd + D * hd + hd + H * hd * v4.o_lora_rank + v4.o_groups * v4.o_lora_rank * D + H

    def compressor(width: int, d: int, rate: int) -> int:  # kv_proj, gate_proj, position_bias, kv_norm
        return 2 * D * width + rate * width + d

    extra = {SLIDING: 0, HCA: compressor(hd, hd, v4.rate(HCA))}
    Hi, Di, m = cfg.index_n_heads, cfg.index_head_dim, v4.rate(CSA)
    extra[CSA] = compressor(2 * hd, hd, m) + compressor(2 * Di, Di, m) + q * Hi * Di + D * Hi
    hc = (2 + n) * n * n * D + (2 + n) * n + 3
    moe = E * D + 3 * E * D * inter + 3 * D * inter
    layers = sum(attention + extra[kind] + 2 * hc + 2 * D + moe for kind in v4.layer_types)
    hc_head = n * n * D + n + 1
    head = cfg.vocab_size * D * (1 if cfg.tie_word_embeddings else 2) + D + hc_head
    mtp = attention + 2 * hc + 2 * D + moe + 2 * D * D + 3 * D + hc_head
    return layers + head + cfg.num_nextn_predict_layers * mtp


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_stats(name: str, cfg: ModelConfig, s: ModelStats) -> str:
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    lines = [
        f"{name}: {cfg.model_type}, {cfg.num_hidden_layers} layers ({moe_layers} MoE), hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, {cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} "
        f"+ {cfg.n_shared_experts} shared",
        f"  parameters, total        {_human(s.total):>10}   ({s.total:,})",
        f"  parameters, active/token {_human(s.active):>10}   ({s.active:,}; excludes the input embedding)",
    ]
    if s.mtp:
        copies = f"; {_human(s.mtp_stored)} as stored with copies of the embedding and head" * (s.mtp_stored > s.mtp)
        lines.append(f"  MTP modules              {_human(s.mtp):>10}   ({s.mtp:,}{copies})")
    if cfg.v4 is not None:
        return "\n".join(lines + _v4_cache_lines(cfg, s))
    b = s.cache_dtype_bytes
    cached = s.latent_cache_bytes + s.index_cache_bytes
    rows = [(f"MLA latent (c_kv {cfg.kv_lora_rank} + k_pe {cfg.qk_rope_head_dim})", s.latent_cache_bytes)]
    if s.index_cache_bytes:
        rows += [
            (f"DSA indexer key ({cfg.index_head_dim})", s.index_cache_bytes),
            ("V3.2 cache: latent + indexer key", cached),
        ]
    rows += [
        ("naive per-head K and V", s.naive_cache_bytes),
        (f"MHA, same {cfg.num_attention_heads} heads, d_h {cfg.v_head_dim}", s.mha_cache_bytes),
    ]
    lines.append(f"  KV cache per token ({b}-byte values, all {cfg.num_hidden_layers} layers):")
    what = "the latent + indexer" if s.index_cache_bytes else "the latent"
    for label, nbytes in rows:
        ratio = f"  ({nbytes / cached:.1f}x {what})" if nbytes > cached else ""
        lines.append(f"    {label:<36} {nbytes:>12,} B{ratio}")
    if cfg.dsa:
        n = 128 * 1024  # a long context, where the sparse read pays
        dense, sparse = n * s.latent_cache_bytes, n * s.index_cache_bytes + cfg.index_topk * s.latent_cache_bytes
        lines += [
            f"  sparse attention: each query attends to the indexer's top {cfg.index_topk:,} tokens "
            f"({cfg.index_n_heads} indexer heads of {cfg.index_head_dim})",
            f"  cache read per decoded token at 128K context: {sparse / 1e9:.2f} GB (every indexer key, top-"
            f"{cfg.index_topk:,} latents) vs {dense / 1e9:.2f} GB dense MLA ({dense / sparse:.1f}x)",
        ]
    return "\n".join(lines)


def _v4_cache_lines(cfg: ModelConfig, s: ModelStats) -> list[str]:
    v4, b = cfg.v4, s.cache_dtype_bytes
    kinds = {k: v4.layer_types.count(k) for k in (SLIDING, CSA, HCA)}
    lines = [
        f"  attention: {kinds[SLIDING]} sliding-window, {kinds[CSA]} CSA (1/{v4.rate(CSA)}, indexer top "
        f"{cfg.index_topk:,}), {kinds[HCA]} HCA (1/{v4.rate(HCA)}) layers; one shared K=V head of {v4.head_dim}, "
        f"window {v4.sliding_window}",
        f"  KV cache per token ({b}-byte values, all {cfg.num_hidden_layers} layers; depends on the context):",
    ]
    for context in (128 * 1024, 1024 * 1024):
        per = v4_cache_bytes_per_token(cfg, context, b)
        lines.append(
            f"    at {context // 1024:>5}K context {per:>12,.0f} B   (MHA, same {cfg.num_attention_heads} heads of "
            f"{v4.head_dim}: {s.mha_cache_bytes:,} B, {s.mha_cache_bytes / per:,.0f}x)"
        )
    return lines
