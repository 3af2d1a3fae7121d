"""DeepSeek-V4's own hyper-parameters (`model_type` deepseek_v4), named as transformers 5.24 names them.

`ModelConfig` keeps the fields V4 shares with V3 (hidden size, experts, query rank, indexer, RoPE); the fields
only V4 has live here, in `ModelConfig.v4`. config.json is flat: `read_v4` pops V4's keys from it (both
spellings transformers accepts: `layer_types` / `mlp_layer_types` and the legacy `compress_ratios` /
`num_hash_layers`, `compress_rate_csa` / `compress_rate_hca`, `qk_rope_head_dim` / `partial_rotary_factor`)
and `write_v4` writes them back. Problems are raised as ValueError naming the field; config.py turns them
into ConfigError.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
MLP_LAYER_TYPES = ("hash_moe", "moe")
# The legacy per-layer `compress_ratios` spelling (0: sliding window only).
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}
DEFAULT_RATES = {CSA: 4, HCA: 128}  # m and m' of the tech report (§2.3.1, §2.3.2)

# V3 keys a V4 config.json may still carry (transformers ignores them): kept in `extra`, unused.
V3_ONLY = (
    "kv_lora_rank",
    "qk_nope_head_dim",
    "v_head_dim",
    "intermediate_size",
    "first_k_dense_replace",
    "moe_layer_freq",
    "n_group",
    "topk_group",
    "topk_method",
    "rope_interleave",
)


@dataclass(frozen=True)
class V4Config:
    """What only DeepSeek-V4 has (DeepSeek-V4 tech report §2).

    Attention: one shared key/value head of `head_dim` (K = V), a sliding window of `sliding_window` tokens in
    every layer, plus per `layer_types` a compressed branch: CSA compresses every `compress_rates[CSA]` tokens
    (overlapping windows, a lightning indexer keeps the top `index_topk` entries), HCA every
    `compress_rates[HCA]` tokens (all entries attended). The compressed branches rotate with their own RoPE base
    `compress_rope_theta` (YaRN, if any, applies to them only). The output projection is grouped: `o_groups`
    groups of heads, each projected to `o_lora_rank`, then mixed to the hidden size.
    Residual: `hc_mult` streams mixed by manifold-constrained hyper-connections (§2.2), the mixing matrices
    made doubly stochastic by `hc_sinkhorn_iters` Sinkhorn-Knopp iterations with floor `hc_eps`.
    FFN: every layer is MoE; `mlp_layer_types` "hash_moe" layers pick experts by a fixed token-id table,
    "moe" ones by top-k of sqrtsoftplus scores; expert SwiGLU inputs are clamped at `swiglu_limit`.
    """

    head_dim: int = 512
    layer_types: tuple[str, ...] = ()
    mlp_layer_types: tuple[str, ...] = ()
    compress_rates: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_RATES))
    compress_rope_theta: float = 160000.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0

    @staticmethod
    def default_layer_types(n: int) -> tuple[str, ...]:
        """transformers' default for a config without a schedule: two HCA layers, then HCA and CSA alternating
        (released configs always give theirs; V4-Pro's alternates from CSA on)."""
        return tuple([HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))])

    @staticmethod
    def default_mlp_layer_types(n: int, n_hash: int = 3) -> tuple[str, ...]:
        return tuple(["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash))

    def filled(self, n_layers: int) -> "V4Config":
        """This config with the default schedules for n_layers where none is given."""
        return dataclasses.replace(
            self,
            layer_types=tuple(self.layer_types) or self.default_layer_types(n_layers),
            mlp_layer_types=tuple(self.mlp_layer_types) or self.default_mlp_layer_types(n_layers),
        )

    def rate(self, layer_type: str) -> int:
        return self.compress_rates[layer_type]

    def attention_type(self, layer_idx: int) -> str:
        """Layer i's attention; MTP layers (after the main ones) attend by sliding window only, as V4's released
        configs say (their `compress_ratios` end with a 0 for the MTP layer)."""
        return self.layer_types[layer_idx] if layer_idx < len(self.layer_types) else SLIDING

    def mlp_type(self, layer_idx: int) -> str:
        """Layer i's routing; MTP layers route by score (DeepSeek hash-routes only its first layers)."""
        return self.mlp_layer_types[layer_idx] if layer_idx < len(self.mlp_layer_types) else "moe"


def _int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# What V4's MoE and attention fix (transformers builds only this form): one shared expert, no expert groups,
# top-k weights renormalized, sqrtsoftplus scores, every layer MoE, no attention biases.
V4_FIXED = {
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "scoring_func": "sqrtsoftplus",
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "attention_bias": False,
    "hidden_act": "silu",
}


def check_v4(cfg: Any) -> V4Config:
    """V4's shape rules for a ModelConfig (its shared fields already checked); returns its V4Config with the
    default schedules filled in. Each refusal names its field."""
    v4 = (cfg.v4 or V4Config()).filled(cfg.num_hidden_layers)
    for name, value in V4_FIXED.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: deepseek_v4 requires {name}={value!r}")
    if cfg.n_routed_experts == 0:
        raise ValueError("n_routed_experts must be positive for deepseek_v4: every layer is MoE")
    if cfg.q_lora_rank == 0:
        raise ValueError("q_lora_rank must be positive for deepseek_v4: queries and the indexer read the query latent")
    _check_fields(v4, cfg.num_hidden_layers)
    if (cfg.num_attention_heads * v4.head_dim) % v4.o_groups:  # groups split the concatenated head outputs
        raise ValueError(
            f"o_groups={v4.o_groups} must divide num_attention_heads * head_dim = "
            f"{cfg.num_attention_heads} * {v4.head_dim}"
        )
    if cfg.qk_rope_head_dim > min(v4.head_dim, cfg.index_head_dim):
        raise ValueError(
            f"qk_rope_head_dim={cfg.qk_rope_head_dim} must be <= head_dim={v4.head_dim} and "
            f"index_head_dim={cfg.index_head_dim}: V4 rotates the trailing qk_rope_head_dim dims of both"
        )
    return v4


def _check_fields(v4: V4Config, n_layers: int) -> None:
    for name in ("head_dim", "sliding_window", "o_groups", "o_lora_rank", "hc_mult", "hc_sinkhorn_iters"):
        v = getattr(v4, name)
        if not _int(v) or not 1 <= v <= 1 << 20:
            raise ValueError(f"{name} must be an integer in 1..{1 << 20:,}, got {v!r}")
    for name, low in (("compress_rope_theta", 1.0), ("hc_eps", 0.0), ("swiglu_limit", 0.0)):
        v = getattr(v4, name)
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v <= low:
            raise ValueError(f"{name} must be a finite number > {low:g}, got {v!r}")
    for name, types, allowed in (
        ("layer_types", v4.layer_types, LAYER_TYPES),
        ("mlp_layer_types", v4.mlp_layer_types, MLP_LAYER_TYPES),
    ):
        if not isinstance(types, (list, tuple)) or len(types) != n_layers:
            raise ValueError(f"{name} must list one entry per layer (num_hidden_layers={n_layers}), got {types!r}")
        bad = sorted({t for t in types if t not in allowed}, key=str)
        if bad:
            raise ValueError(f"{name} entries must be among {allowed}, got {bad}")
    if not isinstance(v4.compress_rates, dict) or set(v4.compress_rates) != {CSA, HCA}:
        raise ValueError(f"compress_rates must map exactly {CSA!r} and {HCA!r} to ratios, got {v4.compress_rates!r}")
    for kind, rate in v4.compress_rates.items():
        if not _int(rate) or not 1 <= rate <= 1 << 16:
            raise ValueError(f"compress_rates[{kind!r}] must be an integer in 1..65536, got {rate!r}")


def read_v4(d: dict[str, Any], kw: dict[str, Any]) -> None:
    """Pop V4's keys from config.json `d` into `kw` (ModelConfig's keyword arguments, `kw["v4"]` a V4Config)."""
    n = kw.get("num_hidden_layers", 43)
    # transformers' attribute_map: these names set V4's fields, and win over them when both are given.
    for alias, name in (("intermediate_size", "moe_intermediate_size"), ("num_local_experts", "n_routed_experts")):
        if d.get(alias) is not None:
            kw[name] = d.pop(alias)
    rates = dict(d.pop("compress_rates", None) or DEFAULT_RATES)
    for key, kind in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
        if d.get(key) is not None:
            rates[kind] = d.pop(key)
    layer_types = d.pop("layer_types", None)
    ratios = d.pop("compress_ratios", None)
    if layer_types is None and ratios is not None:
        if not isinstance(ratios, list) or any(r not in _RATIO_TO_TYPE for r in ratios):
            raise ValueError(f"compress_ratios entries must be among {sorted(_RATIO_TO_TYPE)}, got {ratios!r}")
        layer_types = [_RATIO_TO_TYPE[r] for r in ratios]
        if _int(n) and any(ratios[n:]):  # entries past the main layers are the MTP layers'
            raise ValueError(f"compress_ratios {ratios[n:]} for the MTP layers: nanoseek builds them sliding-only (0)")
    mlp_types = d.pop("mlp_layer_types", None)
    n_hash = d.pop("num_hash_layers", None)
    if mlp_types is None and n_hash is not None:
        if not _int(n_hash) or n_hash < 0:
            raise ValueError(f"num_hash_layers must be a non-negative integer, got {n_hash!r}")
        mlp_types = list(V4Config.default_mlp_layer_types(n, n_hash)) if _int(n) else None
    v4 = {f.name: d.pop(f.name) for f in dataclasses.fields(V4Config) if f.name in d}
    v4.pop("layer_types", None), v4.pop("mlp_layer_types", None)
    head_dim = v4.get("head_dim", 512)
    partial = d.pop("partial_rotary_factor", None)
    if "qk_rope_head_dim" not in kw:
        kw["qk_rope_head_dim"] = int(head_dim * partial) if partial is not None else 64
    kw["v4"] = V4Config(
        **v4,
        compress_rates=rates,
        layer_types=tuple(layer_types[:n] if isinstance(layer_types, list) and _int(n) else layer_types or ()),
        mlp_layer_types=tuple(mlp_types[:n] if isinstance(mlp_types, list) and _int(n) else mlp_types or ()),
    )
    for key in ("num_key_value_heads", "compress_rope_parameters", "num_hash_layers"):
        d.pop(key, None)
    _read_v4_rope(d, kw)


def _read_v4_rope(d: dict[str, Any], kw: dict[str, Any]) -> None:
    """V4's nested `rope_parameters` {"main": ..., "compress": ...}: main is plain RoPE at rope_theta, compress
    runs at compress_rope_theta with the YaRN of the config (if any). Flat spellings are left to config.py."""
    rp = d.get("rope_parameters")
    if not (isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)):
        return
    main, compress = rp["main"], rp["compress"]
    if main.get("rope_type", "default") != "default":
        raise ValueError(
            f"rope_parameters.main must be plain RoPE (V4's sliding layers), got {main.get('rope_type')!r}"
        )
    d.pop("rope_parameters")
    kw["rope_theta"] = main.get("rope_theta", kw.get("rope_theta", 10000.0))
    kw["v4"] = dataclasses.replace(kw["v4"], compress_rope_theta=compress.get("rope_theta", 160000.0))
    if compress.get("rope_type", "default") != "default":
        yarn = {k: v for k, v in compress.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if yarn.get("attention_factor") == 1.0:  # V4's default (no YaRN rescaling of cos/sin), written explicitly
            del yarn["attention_factor"]
        d["rope_parameters"] = yarn


def write_v4(cfg: Any, shared: dict[str, Any]) -> dict[str, Any]:
    """config.json of a V4 ModelConfig: `shared` (its V3-shared fields) plus V4's, nested rope parameters."""
    v4: V4Config = cfg.v4
    d = {k: v for k, v in shared.items() if k not in V3_ONLY}
    for f in dataclasses.fields(V4Config):
        value = getattr(v4, f.name)
        d[f.name] = list(value) if isinstance(value, tuple) else value
    partial = cfg.qk_rope_head_dim / v4.head_dim
    main = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": partial}
    compress = {"rope_type": "default", "rope_theta": v4.compress_rope_theta, "partial_rotary_factor": partial}
    if cfg.rope_scaling:
        compress.update({k: v for k, v in cfg.rope_scaling.items() if k != "type"}, rope_type="yarn")
        compress.setdefault("attention_factor", 1.0)  # V4 does not scale cos/sin by YaRN's mscale
    d.update(
        rope_parameters={"main": main, "compress": compress},
        num_key_value_heads=1,
        head_dim=v4.head_dim,
        partial_rotary_factor=partial,
    )
    return d
