"""Published figures the plan is checked against, and the checks themselves.

DeepSeek-V3 technical report: 2.788M H800 GPU-hours in all (2.664M pretraining, 0.119M context extension,
0.005M post-training), $5.576M at $2 per GPU-hour, 14.8T tokens, 4K sequences in pretraining, FP8 mixed
precision, 2,048 GPUs. DeepSeek-V2 paper: KV cache 93.3% smaller than DeepSeek 67B's (a dense model with
grouped-query attention: 95 layers, 8 KV heads of 128; V2 deploys its cache at about 6 bits a value)."""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.model.presets import get_preset
from nanoseek.plan.hardware import ACCELERATORS
from nanoseek.plan.serve import cache_sizes
from nanoseek.plan.train import implied_mfu
from nanoseek.train.objective import training_flops_per_token

V3_PRETRAIN_GPU_HOURS = 2.664e6
V3_TOTAL_GPU_HOURS = 2.788e6
V3_TOKENS = 14.8e12
V3_SEQ_LEN = 4096
V3_GPUS = 2048
V3_PRICE = 2.0
V3_MTP_DEPTH = 1
V2_REDUCTION_VS_67B = 0.933
DEEPSEEK_67B_GQA = dict(layers=95, kv_heads=8, head_dim=128)


@dataclass(frozen=True)
class V3Derivation:
    flops_per_token: float
    mfu_bf16: float  # of the H800's dense bf16 peak
    mfu_fp8: float  # of its dense fp8 peak


def v3_implied_mfu() -> V3Derivation:
    """MFU = flops_per_token · 14.8T / (2.664M · 3600 · peak), flops_per_token at 4K with one MTP depth."""
    fpt = training_flops_per_token(get_preset("deepseek-v3"), V3_SEQ_LEN, V3_MTP_DEPTH)
    h800 = ACCELERATORS["h800"]
    return V3Derivation(
        flops_per_token=fpt,
        mfu_bf16=implied_mfu(fpt, V3_TOKENS, V3_PRETRAIN_GPU_HOURS, h800.peak("bf16")),
        mfu_fp8=implied_mfu(fpt, V3_TOKENS, V3_PRETRAIN_GPU_HOURS, h800.peak("fp8")),
    )


@dataclass(frozen=True)
class V2CacheCheck:
    mla_values: int  # per token, all layers
    mha_values: int  # MHA with V2's 128 heads of 128
    gqa67b_values: int  # DeepSeek 67B
    reduction_vs_mha: float
    reduction_vs_67b_bf16: float  # both caches at 2 bytes
    reduction_vs_67b_6bit: float  # V2's cache at 6 bits, 67B's at 16


def v2_cache_check() -> V2CacheCheck:
    sizes = cache_sizes(get_preset("deepseek-v2"), cache_bytes=1)
    g = DEEPSEEK_67B_GQA
    gqa67 = 2 * g["kv_heads"] * g["head_dim"] * g["layers"]
    mla, mha = int(sizes.mla), int(sizes.mha)
    return V2CacheCheck(
        mla_values=mla,
        mha_values=mha,
        gqa67b_values=gqa67,
        reduction_vs_mha=1 - mla / mha,
        reduction_vs_67b_bf16=1 - mla / gqa67,
        reduction_vs_67b_6bit=1 - mla * 6 / (gqa67 * 16),
    )
