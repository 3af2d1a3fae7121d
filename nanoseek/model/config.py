"""Model configuration: one dataclass with Hugging Face's DeepSeek-V2/V3/V3.2 field names.

`ModelConfig.from_hf_dict(json.load(...))` reads a `config.json` of `model_type` deepseek_v3, deepseek_v32
(V3 plus DeepSeek Sparse Attention's lightning indexer) or deepseek_v2 (rope scaling in either the older
`rope_scaling` + `rope_theta` spelling or the newer `rope_parameters` one), or deepseek_v4 (whose own fields
sit in `ModelConfig.v4`, v4_config.py); `to_hf_dict()` writes one that transformers loads with no remote code.
Named shapes live in presets.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import NanoseekError
from nanoseek.model.v4_config import V3_ONLY, V4Config, check_v4, read_v4, write_v4

MODEL_TYPES = ("deepseek_v3", "deepseek_v32", "deepseek_v2", "deepseek_v4")
ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v4": "DeepseekV4ForCausalLM",
}
INDEXER_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")  # DeepSeek-V3.2 only
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")  # sqrtsoftplus: DeepSeek-V4 only

# Inclusive bounds on every integer field. A config.json may come from anyone: these stop a
# nonsensical or hostile shape (a million layers, a billion-wide hidden size) before anything is
# built or counted, with room of 8x or more above the largest published shapes (DeepSeek-V3:
# vocab 129,280, hidden 7,168, FFN 18,432, 61 layers, 128 heads, 256 experts, 163,840 positions).
# Whether a shape inside them fits the machine is the loader's check (nanoseek/checkpoint/trust.py).
FIELD_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 19),
    "moe_intermediate_size": (1, 1 << 17),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "q_lora_rank": (0, 1 << 16),
    "kv_lora_rank": (1, 1 << 16),
    "qk_nope_head_dim": (0, 4096),
    "qk_rope_head_dim": (1, 4096),
    "v_head_dim": (1, 4096),
    "n_routed_experts": (0, 1 << 14),
    "n_shared_experts": (0, 256),
    "num_experts_per_tok": (0, 1 << 14),
    "n_group": (0, 1 << 14),
    "topk_group": (0, 1 << 14),
    "first_k_dense_replace": (0, 1 << 20),
    "moe_layer_freq": (1, 1024),
    "max_position_embeddings": (1, 1 << 24),
    "num_nextn_predict_layers": (0, 64),
    "index_n_heads": (1, 1024),
    "index_head_dim": (1, 4096),
    "index_topk": (1, 1 << 24),
}
# Real-valued fields: (name, smallest allowed, whether the smallest itself is allowed); all must be finite.
REAL_FIELDS = (
    ("rms_norm_eps", 0.0, False),
    ("rope_theta", 1.0, False),  # YaRN divides by log(rope_theta)
    ("routed_scaling_factor", 0.0, False),
    ("initializer_range", 0.0, True),
    ("aux_loss_alpha", 0.0, True),
)
BOOL_FIELDS = ("norm_topk_prob", "seq_aux", "rope_interleave", "tie_word_embeddings", "attention_bias")


class ConfigError(NanoseekError):
    """A config.json or preset that cannot describe a DeepSeek model."""


@dataclass
class ModelConfig:
    """DeepSeek-V2/V3 hyper-parameters, named as in the Hugging Face config.

    Attention is Multi-head Latent Attention (DeepSeek-V2 §2.1): queries through a `q_lora_rank`
    bottleneck (0: one plain projection), keys and values through a `kv_lora_rank` latent, plus a
    decoupled RoPE key of `qk_rope_head_dim` shared by all heads. The FFN of every layer from
    `first_k_dense_replace` on is DeepSeekMoE (DeepSeek-V3 §2.1.2): `n_shared_experts` always-on
    experts plus `num_experts_per_tok` of `n_routed_experts`, chosen by `topk_method` over
    `scoring_func` scores, limited to `topk_group` of `n_group` groups.
    """

    model_type: str = "deepseek_v3"
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384  # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 128  # width of each routed / shared expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # MLA (DeepSeek-V2 §2.1.2-2.1.3)
    q_lora_rank: int = 0  # 0 = no query compression (HF writes null)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeekMoE (DeepSeek-V3 §2.1.2)
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    # Sequence-wise balance loss weight α (DeepSeek-V3 eq. 17); 0 disables it.
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    # Positions
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
    # "beta_slow", "mscale", "mscale_all_dim"}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True  # checkpoint rope dims are adjacent pairs, as DeepSeek ships them
    # Multi-Token Prediction modules (DeepSeek-V3 §2.2)
    num_nextn_predict_layers: int = 0
    # DeepSeek Sparse Attention (DeepSeek-V3.2 §2.1), model_type deepseek_v32 only: a lightning indexer of
    # index_n_heads ReLU heads of index_head_dim scores every earlier token; each query attends to the top
    # index_topk. Defaults are V3.2's (and transformers').
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "float32"  # storage dtype written to config.json
    # DeepSeek-V4's own fields (model_type deepseek_v4 only; filled with V4's defaults when None): v4_config.py.
    v4: V4Config | None = None
    # Keys of a loaded config.json that nanoseek does not use, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes ----------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times mscale^2 under YaRN (DeepSeek-V2 appendix, YaRN)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            mscale = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= mscale * mscale
        return scale

    @property
    def dsa(self) -> bool:
        """Whether attention is DeepSeek Sparse Attention (MLA behind a lightning indexer)."""
        return self.model_type == "deepseek_v32"

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.model_type in MODEL_TYPES, f"unknown model_type {self.model_type!r}; nanoseek reads {MODEL_TYPES}")
        need(
            self.topk_method in TOPK_METHODS,
            f"unknown topk_method {self.topk_method!r}; expected one of {TOPK_METHODS}",
        )
        need(
            self.scoring_func in SCORING_FUNCS,
            f"unknown scoring_func {self.scoring_func!r}; expected one of {SCORING_FUNCS}",
        )
        _check_field_types_and_bounds(self)
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.n_routed_experts > 0:
            need(
                0 < self.num_experts_per_tok <= self.n_routed_experts,
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"1..n_routed_experts={self.n_routed_experts}",
            )
            need(
                self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                f"n_routed_experts={self.n_routed_experts} must divide into n_group={self.n_group} groups",
            )
            need(
                1 <= self.topk_group <= self.n_group,
                f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}",
            )
            if self.topk_method == "noaux_tc":
                need(
                    self.n_routed_experts // self.n_group >= 2,
                    "noaux_tc scores a group by its top-2 experts: need >= 2 experts per group",
                )
            if self.topk_method != "greedy":
                need(
                    self.topk_group * (self.n_routed_experts // self.n_group) >= self.num_experts_per_tok,
                    "topk_group groups hold fewer experts than num_experts_per_tok",
                )
        if self.dsa:
            _check_indexer(self)
        need(
            self.scoring_func != "sqrtsoftplus" or self.model_type == "deepseek_v4",
            "scoring_func 'sqrtsoftplus' is DeepSeek-V4's (model_type deepseek_v4)",
        )
        need(
            self.v4 is None or self.model_type == "deepseek_v4", "v4 holds DeepSeek-V4's fields: model_type deepseek_v4"
        )
        if self.model_type == "deepseek_v4":
            try:
                self.v4 = check_v4(self)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.rope_scaling is not None:
            need(isinstance(self.rope_scaling, dict), f"rope_scaling must be an object, got {self.rope_scaling!r}")
            need(
                self.rope_scaling.get("type") == "yarn",
                f"only YaRN rope scaling is supported, got {self.rope_scaling.get('type')!r}",
            )
            _check_yarn(self.rope_scaling)

    # ---- Hugging Face config.json -----------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        model_type = d.pop("model_type", None)
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"unknown model_type {model_type!r} in config.json; nanoseek reads {MODEL_TYPES}")
        v3 = model_type in ("deepseek_v3", "deepseek_v32", "deepseek_v4")
        kw: dict[str, Any] = {"model_type": model_type}
        v4 = model_type == "deepseek_v4"
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "model_type", "rope_scaling", "torch_dtype", "v4"}
        names -= set(V3_ONLY) if v4 else set()  # V3's keys in a V4 config.json mean nothing: kept in extra
        for name in names:
            if name in d:
                kw[name] = d.pop(name)
        # Defaults where the HF class defaults differ by model type.
        kw.setdefault("topk_method", "noaux_tc" if v3 else "greedy")
        kw.setdefault("scoring_func", "sqrtsoftplus" if v4 else "sigmoid" if v3 else "softmax")
        kw.setdefault("norm_topk_prob", v3)
        kw.setdefault("first_k_dense_replace", 3 if v3 and not v4 else 0)
        if v4:
            try:
                read_v4(d, kw)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if "num_mtp_layers" in d:  # transformers' alias
            kw.setdefault("num_nextn_predict_layers", d.pop("num_mtp_layers"))
        # HF writes null for "absent": no query compression, one group.
        for key, absent in (("q_lora_rank", 0), ("n_group", 1), ("topk_group", 1)):
            if key in kw and kw[key] is None:
                kw[key] = absent
        if isinstance(kw.get("eos_token_id"), list):
            if not kw["eos_token_id"]:
                raise ConfigError("eos_token_id is an empty list")
            kw["eos_token_id"] = kw["eos_token_id"][0]
        kw["rope_theta"], kw["rope_scaling"] = _read_rope(d, kw.get("rope_theta"))
        dtype = d.pop("dtype", None)
        dtype = d.pop("torch_dtype", None) or dtype
        if dtype:
            kw["torch_dtype"] = str(dtype).replace("torch.", "")
        d.pop("rope_parameters", None)
        d.pop("rope_scaling", None)
        d.pop("quantization_config", None)  # weights are dequantized on load
        if not v4:
            _check_layer_types(d, kw, model_type)
        for derived in (
            "qk_head_dim",
            "head_dim",
            "num_key_value_heads",
            "architectures",
            "transformers_version",
            "auto_map",
        ):
            d.pop(derived, None)
        try:
            return cls(**kw, extra=d)
        except TypeError as e:  # a field of the wrong type
            raise ConfigError(f"bad config.json: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling", "v4") or (f.name in INDEXER_FIELDS and not (self.dsa or self.v4)):
                continue
            d[f.name] = getattr(self, f.name)
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        d["q_lora_rank"] = self.q_lora_rank or None
        d["num_key_value_heads"] = self.num_attention_heads
        d["head_dim"] = self.qk_rope_head_dim  # what transformers derives; written for older readers
        d["dtype"] = self.torch_dtype
        # Both spellings: the newer `rope_parameters` (transformers >= 5) and the older
        # `rope_scaling` + `rope_theta` that vLLM, SGLang and DeepSeek's own code read.
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        rp = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rp.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            rp["rope_type"] = "yarn"
        d["rope_parameters"] = rp
        if self.model_type == "deepseek_v4":
            d.pop("rope_scaling")
            d = write_v4(self, d)
        return dict(sorted(d.items()))

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_field_types_and_bounds(cfg: ModelConfig) -> None:
    """Every integer field an integer within FIELD_LIMITS, every real one a finite number in range, every
    flag a bool: a config.json is input from anyone, and a shape is bounded before anything is built."""
    for name, (low, high) in FIELD_LIMITS.items():
        v = getattr(cfg, name)
        if not _is_int(v):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        if v < low:
            raise ConfigError(f"{name}={v} must be " + ("positive" if low == 1 else f">= {low}"))
        if v > high:
            raise ConfigError(
                f"{name}={v} is over nanoseek's limit of {high:,} (FIELD_LIMITS; published models use far less)"
            )
    for name, low, inclusive in REAL_FIELDS:
        v = getattr(cfg, name)
        if not _is_real(v) or not math.isfinite(v) or v < low or (v == low and not inclusive):
            rel = ">=" if inclusive else ">"
            raise ConfigError(f"{name} must be a finite number {rel} {low:g}, got {v!r}")
    for name in BOOL_FIELDS:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, name)
        if v is not None and not _is_int(v):
            raise ConfigError(f"{name} must be an integer or null, got {v!r}")


def _check_indexer(cfg: ModelConfig) -> None:
    """DeepSeek-V3.2's shape rules: the indexer's queries come from MLA's query latent, and it rotates the
    first qk_rope_head_dim of its head dims (transformers and DeepSeek's code build only this form)."""
    if cfg.q_lora_rank == 0:
        raise ConfigError("q_lora_rank must be positive for deepseek_v32: the lightning indexer reads the query latent")
    if cfg.index_head_dim < cfg.qk_rope_head_dim:
        raise ConfigError(
            f"index_head_dim={cfg.index_head_dim} must be >= qk_rope_head_dim={cfg.qk_rope_head_dim}: "
            "the indexer rotates its first qk_rope_head_dim dims"
        )
    if not cfg.rope_interleave:
        raise ConfigError("rope_interleave must be true for deepseek_v32 (its MLA keys are interleaved pairs)")


def _check_layer_types(d: dict[str, Any], kw: dict[str, Any], model_type: str) -> None:
    """V3.2 configs may spell the layer pattern out (`mlp_layer_types`, `layer_types`); nanoseek derives it
    from first_k_dense_replace, so a pattern that says otherwise is refused rather than silently ignored."""
    mlp = d.get("mlp_layer_types")
    if mlp is not None:
        n, first, freq = (kw.get(k, 1) for k in ("num_hidden_layers", "first_k_dense_replace", "moe_layer_freq"))
        if not all(_is_int(v) and v > 0 for v in (n, freq)) or not _is_int(first):
            return  # validate() names the bad field
        expected = ["sparse" if i >= first and i % freq == 0 else "dense" for i in range(n)]
        if mlp != expected:
            raise ConfigError(
                f"mlp_layer_types {mlp!r} disagrees with first_k_dense_replace={first} (dense layers first, "
                "then MoE ones), the only pattern DeepSeek models use"
            )
    layers = d.get("layer_types")
    if layers is not None and model_type == "deepseek_v32" and set(layers) != {"indexed_attention"}:
        raise ConfigError(f"layer_types {sorted(set(layers))!r}: every deepseek_v32 layer is indexed_attention")


def _check_yarn(rs: dict[str, Any]) -> None:
    factor = rs.get("factor")
    if not _is_real(factor) or not math.isfinite(factor) or factor < 1.0:
        raise ConfigError(f"rope_scaling.factor must be a finite number >= 1, got {factor!r}")
    original = rs.get("original_max_position_embeddings")
    low, high = FIELD_LIMITS["max_position_embeddings"]
    if original is not None and (not _is_int(original) or not low <= original <= high):
        raise ConfigError(f"rope_scaling.original_max_position_embeddings must be in {low}..{high:,}, got {original!r}")
    for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        v = rs.get(k)
        if v is not None and (not _is_real(v) or not math.isfinite(v)):
            raise ConfigError(f"rope_scaling.{k} must be a finite number, got {v!r}")
    for k in ("beta_fast", "beta_slow"):
        if rs.get(k) is not None and rs[k] < 0:
            raise ConfigError(f"rope_scaling.{k} must be >= 0, got {rs[k]!r}")


def _read_rope(d: dict[str, Any], rope_theta: float | None) -> tuple[float, dict[str, Any] | None]:
    """Normalize the two HF spellings of rope settings to (rope_theta, yarn dict or None)."""
    params = d.get("rope_parameters") or d.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"rope_parameters / rope_scaling must be an object, got {params!r}")
    theta = rope_theta
    if params and "rope_theta" in params:
        theta = params["rope_theta"]
    if theta is not None and not _is_real(theta):
        raise ConfigError(f"rope_theta must be a number, got {theta!r}")
    theta = float(theta if theta is not None else 10000.0)
    if not params:
        return theta, None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"unsupported rope scaling type {kind!r}; DeepSeek models use 'yarn'")
    out = {"type": "yarn"}
    for k in (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    ):
        if params.get(k) is not None:
            out[k] = params[k]
    if "factor" not in out:
        raise ConfigError("yarn rope scaling needs a 'factor'")
    return theta, out


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(s) + 1 (YaRN paper eq. 22)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
