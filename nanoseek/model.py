"""The DeepSeek-V2/V3 transformer: MLA attention, DeepSeekMoE, Multi-Token Prediction.

One class per paper concept, module and weight names as in the Hugging Face checkpoint
(`self_attn.kv_a_proj_with_mqa`, `mlp.gate`, ...), so `checkpoint.py` only renames the stacked expert
weights. The MoE lives in `moe.py`.

    model = Transformer(get_preset("tiny"))
    logits = model(input_ids)  # (B, T, vocab), float
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, yarn_mscale
from .moe import MLP, MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # the same math in one fused op
        # Normalize in fp32 whatever the activation dtype, then scale in it (as DeepSeek does).
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y


# ---- rotary embedding ---------------------------------------------------------------------------
def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the decoupled RoPE dims, with YaRN (DeepSeek-V2 appendix B) if set.

    Returns (inv_freq of shape (qk_rope_head_dim/2,), attention_factor applied to cos and sin).
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # Explicitly on the CPU, so a model built under torch.device("meta") still has real frequencies.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    original = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dim whose wavelength fits `rotations` times into the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    # High-frequency dims (ramp 0) keep their frequency; low-frequency ones are interpolated.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin for positions, computed per forward (cheap: one outer product shared by all layers).

    The frequencies are a plain fp32 tensor, not a buffer: nothing to load or save, and `.to(bf16)`
    on the model cannot round them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(cfg)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = (positions.float()[..., None] * self.inv_freq)[:, :, None]  # (B or 1, T, 1, rope/2): one for all heads
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (B, T, H, rope) by position. cos/sin: (B or 1, T, 1, rope/2), as RotaryEmbedding gives them.

    interleave=True: the dims are adjacent pairs (x0, x1), (x2, x3)... rotated as complex numbers, the
    layout of DeepSeek's checkpoints and official code; the output keeps that layout. False: the
    "rotate half" layout, pairs (x_i, x_{i+rope/2}).
    """
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---- Multi-head Latent Attention ------------------------------------------------------------------
class LatentCache(Protocol):
    """What MLA needs from a KV cache (the engine's paged cache implements it).

    `update` stores the new tokens' c_kv (B, T, r) and k_pe (B, T, rope) for one layer and returns every
    cached entry the queries may see, (B, S, r) and (B, S, rope), with a keep-mask (B, 1, T, S).
    `absorb` selects the absorbed form (decode) over the expanded one (prefill).
    """

    absorb: bool

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 §2.1, eqs. 9-19).

    Keys and values are rebuilt per head from a shared latent c_kv (kv_lora_rank wide) by kv_b_proj;
    position rides on a separate RoPE key k_pe (qk_rope_head_dim) shared by all heads. A cache needs
    only c_kv and k_pe: 576 values a token for V3 instead of 40,960.

    Two forms of the same attention, as in DeepSeek's inference code: `expanded` rebuilds per-head keys
    and values from the latent (cheaper for training and prefill, where queries are many); `absorbed`
    folds kv_b_proj's key half W_UK into the query and its value half W_UV into the output, so decoding
    attends straight over the cached latent, an MQA with one 576-wide key head (V2 §2.1.2, "absorb").
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.rope_interleave = cfg.rope_interleave
        qk_dim, bias = cfg.qk_head_dim, cfg.attention_bias
        if self.q_lora_rank == 0:
            self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)  # eps 1e-6 as in DeepSeek's code, not rms_norm_eps
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)  # normalizes the latent only, never k_pe
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, cfg.hidden_size, bias=bias)

    def project_q(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries split into (q_nope (B,T,H,nope), q_pe (B,T,H,rope)), q_pe not yet rotated."""
        q = self.q_proj(x) if self.q_lora_rank == 0 else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(*x.shape[:2], self.n_heads, -1)
        return q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    def project_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a cache holds: the normalized latent c_kv (B,T,r) and the rotated k_pe (B,T,rope)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, self.rope_interleave)[:, :, 0]
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LatentCache | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D).

        Without a cache the T tokens attend causally among themselves (mask: None, or a bool keep-mask
        (B or 1, 1, T, T)). With one, they attend over everything the cache returns for this layer.
        """
        q_nope, q_pe = self.project_q(x)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleave)
        c_kv, k_pe = self.project_latent(x, cos, sin)
        if cache is not None:
            c_kv, k_pe, mask = cache.update(self.layer_idx, c_kv, k_pe)
            if cache.absorb:
                return self.o_proj(self.absorbed(q_nope, q_pe, c_kv, k_pe, mask))
        return self.o_proj(self.expanded(q_nope, q_pe, c_kv, k_pe, mask))

    def expanded(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Per-head attention over keys/values rebuilt from the latent. Returns (B, T, H*v)."""
        B, T, S = q_nope.shape[0], q_nope.shape[1], c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, T, H, nope+rope)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)), dim=-1)  # (B, S, H, nope+rope)
        # The fused (flash) SDPA kernels want one head dim for q, k and v; zero-padding v to it leaves the
        # first v_head_dim outputs exact and skips the masked half of causal attention (the math fallback
        # computes all T x S scores). Transformers pads the same way for flash-attn.
        pad = q.shape[-1] - self.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None and T > 1, scale=self.softmax_scale,
        )  # (B, H, T, v or q's head dim)
        return out[..., : self.v_head_dim].transpose(1, 2).reshape(B, T, -1)

    def absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attention over the latent itself: q_nope·W_UK·c_kv + q_pe·k_pe, then ·c_kv·W_UV. (B, T, H*v).

        W_UK and W_UV are views into kv_b_proj.weight (no copy, so never stale after a weight update).
        All heads share one key (c_kv; k_pe) and one value (c_kv), so the H*T queries of a sequence are
        rows of a single matmul against it: MQA with one 576-wide key head for V3.
        """
        B, T, H = q_nope.shape[:3]
        S, r = c_kv.shape[1], self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, r)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]  # (H, nope, r), (H, v, r)
        q_lat = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk)  # (H, B*T, r): queries in latent space
        q_lat = q_lat.view(H, B, T, r).transpose(0, 1).reshape(B, H * T, r)
        q_pe = q_pe.transpose(1, 2).reshape(B, H * T, -1)  # (B, H*T, rope)
        scale = self.softmax_scale
        scores = torch.baddbmm(torch.bmm(q_pe, k_pe.transpose(1, 2)), q_lat, c_kv.transpose(1, 2),
                               beta=scale, alpha=scale).view(B, H, T, S)
        if mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out_lat = torch.bmm(scores.softmax(dim=-1).view(B, H * T, S), c_kv)  # (B, H*T, r)
        out = torch.bmm(out_lat.view(B, H, T, r).transpose(0, 1).reshape(H, B * T, r), w_uv.transpose(1, 2))
        return out.view(H, B, T, -1).permute(1, 2, 0, 3).reshape(B, T, -1)  # (B, T, H*v)


# ---- blocks ---------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm x), then + FFN(norm x); the FFN is dense or DeepSeekMoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LatentCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP module's own final norm; the output head itself is the main model's (V3 §2.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPBlock(Block):
    """One Multi-Token Prediction module (DeepSeek-V3 §2.2, eq. 21-23).

    Depth k combines the previous depth's hidden state at position i with the embedding of token i+k:
    h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]) (that order, as the released checkpoints expect),
    runs one transformer block and predicts token i+k+1 through shared_head.norm and the shared head.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LatentCache | None = None) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))
        return super().forward(x, cos, sin, mask, cache)


class Transformer(nn.Module):
    """DeepSeek-V2/V3 causal LM. `forward(input_ids)` returns logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ---- initialization ---------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share the embedding with the head if configured (again after `to_empty`, which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, initializer_range) for matrices, ones for norms, zero biases, as HF does.
        Draws from torch's global generator: seed it with torch.manual_seed for reproducible weights."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 1 and name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for module in self.modules():
            if isinstance(module, MoE):
                module.reset_buffers()

    # ---- forward ----------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: LatentCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalized hidden states (B, T, D), the input of the head and of MTP depth 1.
        positions: (B or 1, T), default 0..T-1; with a cache, the tokens' absolute positions.
        mask: optional bool keep-mask (B or 1, 1, T, T) replacing plain causal attention (no cache), e.g.
        packed documents that must not see each other."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(self._positions(input_ids, positions))
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, positions, cache, mask)).float()

    def mtp_logits(self, h: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
                   depth: int | None = None) -> list[torch.Tensor]:
        """Logits of every MTP depth k = 1..D (DeepSeek-V3 eq. 21-23), or of the first `depth` only.

        h: main-model hidden states (B, T, D) for input_ids (B, T). Depth k's logits have length T-k;
        position i predicts token i+k+1 (the main head predicts i+1). Train with targets
        `labels[:, k:]` where labels are the input ids shifted by one. mask: as in `hidden_states`
        (depth k uses its leading (T-k, T-k) block).
        """
        out = []
        T = input_ids.shape[1]
        for k, block in enumerate(self.mtp[:depth], start=1):
            if T - k <= 0:
                break
            cos, sin = self.rotary(self._positions(input_ids[:, : T - k], None))
            m = None if mask is None else mask[..., : T - k, : T - k]
            h = block(h[:, : T - k], self.embed_tokens(input_ids[:, k:]), cos, sin, m)
            out.append(self.lm_head(block.shared_head.norm(h)).float())
        return out

    @staticmethod
    def _positions(input_ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return positions

    # ---- MoE bookkeeping --------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def aux_loss(self) -> torch.Tensor | float:
        """Sum of the sequence-wise balance losses of the last training forward (0 when α = 0)."""
        return sum((m.aux_loss for m in self.moe_layers() if m.aux_loss is not None), 0.0)

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_pretrained(self, path, **kwargs) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)
