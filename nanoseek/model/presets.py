"""Named model shapes: `tiny`, `tiny-v32`, `tiny-v4`, `small` (sized for a laptop-class CPU), `long-v32` (long-context
decode benchmarks) and the published `deepseek-v2-lite`, `deepseek-v2`, `deepseek-v3`, `deepseek-v3.2`,
`deepseek-v4-flash`, `deepseek-v4-pro` configs
(built on the meta device by `nanoseek info`, they take no memory)."""

from __future__ import annotations

from typing import Any

from nanoseek.model.config import ConfigError, ModelConfig
from nanoseek.model.v4_config import CSA, HCA, SLIDING, V4Config

_DEEPSEEK_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
}

PRESETS: dict[str, dict[str, Any]] = {
    # ~2.5M parameters: trains in minutes on 2 CPU cores. V3 routing, one dense layer, MTP.
    "tiny": dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
        max_position_embeddings=1024,
        num_nextn_predict_layers=1,
    ),
    # ~60M total parameters, about half active: the shape the decode and training benchmarks measure.
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
        max_position_embeddings=2048,
        num_nextn_predict_layers=1,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        aux_loss_alpha=0.001,
        max_position_embeddings=163840,
        rope_scaling={**_DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000,
        eos_token_id=100001,
        torch_dtype="bfloat16",
    ),
    "deepseek-v2": dict(
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=5120,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=60,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=160,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=3,
        topk_method="group_limited_greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=16.0,
        first_k_dense_replace=1,
        aux_loss_alpha=0.003,
        max_position_embeddings=163840,
        rope_scaling={**_DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000,
        eos_token_id=100001,
        torch_dtype="bfloat16",
    ),
    "deepseek-v3": dict(
        model_type="deepseek_v3",
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=3,
        aux_loss_alpha=0.001,
        max_position_embeddings=163840,
        rope_scaling={**_DEEPSEEK_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=1,
        bos_token_id=0,
        eos_token_id=1,
        torch_dtype="bfloat16",
    ),
}


# `tiny` with DeepSeek Sparse Attention: a 4-head indexer whose top-64 is a quarter of a 256-token window, so
# training and decoding are sparse from the first window on.
PRESETS["tiny-v32"] = dict(
    PRESETS["tiny"], model_type="deepseek_v32", index_n_heads=4, index_head_dim=32, index_topk=64
)
# DeepSeek-V3.2-Exp: V3's shape plus the lightning indexer (64 heads of 128, top-2048 tokens).
PRESETS["deepseek-v3.2"] = dict(
    PRESETS["deepseek-v3"], model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048
)
# ~23M parameters whose decode cost at long contexts is attention's: 4 layers of V3's 576-wide latent (kv_lora_rank
# 512 + rope 64) behind a slim FFN, an 8-head indexer of 64 and top-1024, 32K positions. What `nanoseek bench
# decode --preset long-v32 --context 1024 4096 16384 --compare-dense` measures against the same model dense.
PRESETS["long-v32"] = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    q_lora_rank=256,
    kv_lora_rank=512,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=32768,
    model_type="deepseek_v32",
    index_n_heads=8,
    index_head_dim=64,
    index_topk=1024,
)


# DeepSeek-V4 (April 2026), as its config.json files on the Hub give them. What both share: one shared K=V head of
# 512 with 64 rotated dims, a 128-token window, CSA at 1/4 and HCA at 1/128, mHC with 4 streams, 3 hash-routed
# layers, sqrtsoftplus top-6 of the routed experts plus one shared, SwiGLU clamped at 10, YaRN x16 from 64K on the
# compressed branches (base 160,000), 1M positions, one MTP module. Their configs spell the schedules in the legacy
# form (`compress_ratios`, with a last 0 for the MTP layer, and `num_hash_layers`); transformers reads that as the
# layer_types below.
_V4 = dict(
    model_type="deepseek_v4",
    vocab_size=129280,
    num_attention_heads=64,
    qk_rope_head_dim=64,
    n_shared_experts=1,
    num_experts_per_tok=6,
    scoring_func="sqrtsoftplus",
    first_k_dense_replace=0,
    index_n_heads=64,
    index_head_dim=128,
    max_position_embeddings=1048576,
    rope_theta=10000.0,
    rope_scaling={
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    num_nextn_predict_layers=1,
    bos_token_id=0,
    eos_token_id=1,
    torch_dtype="bfloat16",
)
_V4_RATES = {CSA: 4, HCA: 128}
# V4-Flash, 284B total / 13B active: 43 layers, two sliding-window-only layers, then CSA and HCA alternating
# (compress_ratios 0, 0, 4, 128, 4, ...).
PRESETS["deepseek-v4-flash"] = dict(
    _V4,
    hidden_size=4096,
    moe_intermediate_size=2048,
    num_hidden_layers=43,
    q_lora_rank=1024,
    n_routed_experts=256,
    routed_scaling_factor=1.5,
    index_topk=512,
    v4=V4Config(
        layer_types=(SLIDING, SLIDING) + (CSA, HCA) * 20 + (CSA,),
        mlp_layer_types=V4Config.default_mlp_layer_types(43),
        compress_rates=_V4_RATES,
        o_groups=8,
        o_lora_rank=1024,
    ),
)
# V4-Pro, 1.6T total / 49B active: 61 layers, two HCA layers, then CSA and HCA alternating (compress_ratios 128, 128,
# 4, 128, 4, ..., 4; not transformers' default schedule, which starts the alternation with HCA).
PRESETS["deepseek-v4-pro"] = dict(
    _V4,
    hidden_size=7168,
    moe_intermediate_size=3072,
    num_hidden_layers=61,
    num_attention_heads=128,
    q_lora_rank=1536,
    n_routed_experts=384,
    routed_scaling_factor=2.5,
    index_topk=1024,
    v4=V4Config(
        layer_types=(HCA, HCA) + (CSA, HCA) * 29 + (CSA,),
        mlp_layer_types=V4Config.default_mlp_layer_types(61),
        compress_rates=_V4_RATES,
        o_groups=16,
        o_lora_rank=1024,
    ),
)


# `tiny` as DeepSeek-V4 (~2.5M parameters like tiny): every attention kind V4 has, at rates small enough for
# 256-token windows and dividing the engine's 16-token cache blocks: sliding-window only, CSA (1/4, an indexer of
# 4 heads of 32 keeping the top-16 compressed entries) and HCA (1/16), a 64-token window; 4 mHC streams; one
# hash-routed layer, then score-routed (sqrtsoftplus) ones; a shared K=V head of 48; one MTP module. Trains with
# `nanoseek pretrain --preset tiny-v4 --no-doc-mask` (V4's compressors pool across document boundaries).
PRESETS["tiny-v4"] = dict(
    model_type="deepseek_v4",
    vocab_size=2048,
    hidden_size=128,
    moe_intermediate_size=96,  # every V4 layer is MoE (tiny's first is dense): narrower experts, equal total
    num_hidden_layers=4,
    num_attention_heads=4,
    q_lora_rank=96,
    qk_rope_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    scoring_func="sqrtsoftplus",
    first_k_dense_replace=0,
    routed_scaling_factor=1.0,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=16,
    max_position_embeddings=1024,
    num_nextn_predict_layers=1,
    v4=V4Config(
        head_dim=48,  # tiny's query-key head (32 + 16 rotated)
        layer_types=(SLIDING, CSA, HCA, CSA),
        mlp_layer_types=("hash_moe", "moe", "moe", "moe"),
        compress_rates={CSA: 4, HCA: 16},
        compress_rope_theta=160000.0,
        sliding_window=64,
        o_groups=2,
        o_lora_rank=48,
        hc_mult=4,
    ),
)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
