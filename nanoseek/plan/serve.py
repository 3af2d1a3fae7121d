"""The serving plan: cache bytes per token, concurrent sequences beside the weights, the memory-bandwidth bound
on decode, and what a million output tokens cost.

A serving group of `count` devices holds one copy of the weights, split evenly, and each device holds the cache
of its own sequences (data-parallel attention, as DeepSeek serves MLA: the latent has no heads to split).

Cache per token, all layers, `cache_bytes` per value:
    MLA latent    (kv_lora_rank + qk_rope_head_dim) · L,  plus index_head_dim · L for V3.2's indexer keys
    MHA           2 · H · d_h · L          (same heads, d_h = v_head_dim)
    GQA, g groups 2 · g · d_h · L

A decode step of a batch of B sequences at context T reads the weights it touches and the batch's cache:
    bytes = weight_bytes · (active − k·R·M + E·(1 − (1 − k/E)^B)·R·M) + B · T · cache_per_token
(R routed parameters per expert and MoE layer, M MoE layers, E experts, top-k: the expected number of distinct
experts B tokens touch; B = 1 reads exactly the active parameters). DeepSeek-V3.2's sparse attention reads
every indexer key but only the top index_topk latents: T · cache_per_token becomes
T · index_per_token + min(T, index_topk) · latent_per_token. The bound is
    step_s = overhead_s + B · seq_overhead_s + bytes / (count · bandwidth),  tokens/s per device = B / step_s / count,
and $ per million output tokens = price_per_hour / (3600 · tokens/s per device) · 1e6.
`overhead_s` and `seq_overhead_s` (0 by default) are time per step, and per sequence in a step, that is not
memory traffic: kernel launches, Python, sampling, the server's per-token streaming; on a CPU they dominate a
tiny model and are measured, not assumed (docs/plan.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanoseek.model.config import ModelConfig
from nanoseek.model.stats import ModelStats, model_stats, v4_cache_bytes_per_token
from nanoseek.model.v4_config import CSA, HCA, SLIDING
from nanoseek.plan.hardware import Accelerator, PlanError


@dataclass(frozen=True)
class ServePlanConfig:
    context: int = 4096  # tokens per sequence (prompt + output) held in the cache
    batch: int = 0  # sequences decoded together per group; 0 = as many as fit
    count: int = 8  # devices in one serving group (one copy of the weights)
    cache: str = "mla"  # mla, mha or gqa
    gqa_groups: int = 8
    cache_bytes: float = 2  # per cached value (bf16 = 2, fp8 = 1)
    weight_bytes: float = 1  # per weight (fp8 = 1, as DeepSeek-V3 is released)
    headroom: float = 0.9
    overhead_s: float = 0.0  # per decode step
    seq_overhead_s: float = 0.0  # per sequence per decode step


@dataclass(frozen=True)
class CacheSizes:
    mla: float  # the latent, plus the indexer key for V3.2 (`index`)
    mha: float
    gqa: float | None  # None when the groups do not divide the heads
    gqa_groups: int
    index: float = 0.0  # V3.2's indexer key (part of `mla`); 0 without DSA
    value_bytes: float = 2  # bytes per cached value

    def of(self, kind: str) -> float:
        if kind not in ("mla", "mha", "gqa"):
            raise PlanError(f"cache {kind!r}: one of mla, mha, gqa")
        if getattr(self, kind) is None:
            raise PlanError(f"gqa_groups={self.gqa_groups} does not divide the attention heads")
        return getattr(self, kind)


@dataclass(frozen=True)
class ServePlan:
    cache_per_token: float
    weights_per_device: float
    free_per_device: float
    max_sequences: int  # in the whole group, at `context`
    batch: int
    step_bytes: float
    step_s: float
    tokens_per_s_device: float
    dollars_per_million: float


def cache_sizes(cfg: ModelConfig, cache_bytes: float = 2, gqa_groups: int = 8, context: int = 4096) -> CacheSizes:
    """Cache bytes per token. DeepSeek-V4's own cache (in `mla`, the model's native cache) depends on the
    context: its window is a fixed cost per sequence, its compressed entries grow with 1/rate of the tokens."""
    L, H, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.v_head_dim
    if cfg.model_type == "deepseek_v4":
        d = cfg.v4.head_dim
        native, index = v4_cache_bytes_per_token(cfg, context, cache_bytes), 0.0
    else:
        index = cfg.index_head_dim * L * cache_bytes if cfg.dsa else 0.0
        native = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L * cache_bytes + index
    return CacheSizes(
        index=index,
        value_bytes=cache_bytes,
        mla=native,
        mha=2 * H * d * L * cache_bytes,
        gqa=2 * gqa_groups * d * L * cache_bytes if gqa_groups >= 1 and H % gqa_groups == 0 else None,
        gqa_groups=gqa_groups,
    )


def cache_read(cfg: ModelConfig, sizes: CacheSizes, kind: str, context: int) -> float:
    """Cache bytes one sequence's decode step reads at `context` tokens: all of it, or for V3.2's MLA every
    indexer key and the top index_topk latents (DeepSeek-V3.2 §2.1), or V4's (`v4_cache_read`)."""
    if kind == "mla" and cfg.model_type == "deepseek_v4":
        return v4_cache_read(cfg, context, sizes.value_bytes)
    if kind == "mla" and cfg.dsa:
        return context * sizes.index + min(context, cfg.index_topk) * (sizes.mla - sizes.index)
    return context * sizes.of(kind)


def v4_cache_read(cfg: ModelConfig, context: int, value_bytes: float) -> float:
    """What a DeepSeek-V4 decode step reads of one sequence's cache (tech report §2.3), per layer: the window's
    min(T, sliding_window) keys; in a CSA layer every indexer key (T / 4 of index_head_dim) and the top
    index_topk entries; in an HCA layer all T / 128 entries."""
    v4, values = cfg.v4, 0
    for kind in v4.layer_types:
        values += min(context, v4.sliding_window) * v4.head_dim
        entries = context // v4.rate(kind) if kind != SLIDING else 0
        if kind == CSA:
            values += entries * cfg.index_head_dim + min(entries, cfg.index_topk) * v4.head_dim
        elif kind == HCA:
            values += entries * v4.head_dim
    return values * value_bytes


def weights_read(cfg: ModelConfig, batch: int, active: int) -> float:
    """Parameters a decode step of `batch` tokens reads: the active ones, with the routed experts replaced by
    the expected number of distinct experts the batch touches."""
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if not moe_layers or cfg.n_routed_experts == 0:
        return active
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    touched = E * (1 - (1 - k / E) ** max(batch, 1))
    return active + (touched - k) * per_expert * moe_layers


def plan_serving(
    cfg: ModelConfig, plan: ServePlanConfig, device: Accelerator, stats: ModelStats | None = None
) -> ServePlan:
    """`stats` (`model_stats(cfg)`) may be passed in when planning many points of one model."""
    if plan.count < 1 or plan.context < 1 or plan.batch < 0:
        raise PlanError("serving needs count >= 1, context >= 1 and batch >= 0")
    stats = stats or model_stats(cfg)
    sizes = cache_sizes(cfg, plan.cache_bytes, plan.gqa_groups, plan.context)
    per_token = sizes.of(plan.cache)
    weights = stats.total * plan.weight_bytes / plan.count
    free = device.memory_bytes * plan.headroom - weights
    max_seqs = max(0, math.floor(free / (per_token * plan.context))) * plan.count
    batch = plan.batch or max_seqs
    if batch == 0:
        raise PlanError(
            f"the weights ({weights / 1e9:.1f} GB per device) leave no room for one sequence of {plan.context} "
            f"tokens on {plan.count} x {device.name}; use more devices (--count)"
        )
    read = cache_read(cfg, sizes, plan.cache, plan.context)
    step_bytes = weights_read(cfg, batch, stats.active) * plan.weight_bytes + batch * read
    step_s = plan.overhead_s + batch * plan.seq_overhead_s + step_bytes / (plan.count * device.bandwidth)
    tok_s = batch / step_s / plan.count
    return ServePlan(
        cache_per_token=per_token,
        weights_per_device=weights,
        free_per_device=free,
        max_sequences=max_seqs,
        batch=batch,
        step_bytes=step_bytes,
        step_s=step_s,
        tokens_per_s_device=tok_s,
        dollars_per_million=device.price_per_hour / (3600 * tok_s) * 1e6,
    )
