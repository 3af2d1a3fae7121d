"""Multi-head Latent Attention (DeepSeek-V2 §2.1) in both forms: expanded (training, prefill) and absorbed
(decode over the cached latent only), behind one switch, with the protocol a latent KV cache implements."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.layers import RMSNorm, apply_rope


class LatentCache(Protocol):
    """What MLA needs from a KV cache (the engine's paged cache implements it).

    `update` stores the new tokens' c_kv (B, T, r) and k_pe (B, T, rope) for one layer and returns every
    cached entry the queries may see, (B, S, r) and (B, S, rope), with a keep-mask (B, 1, T, S).
    `absorb` selects the absorbed form (decode) over the expanded one (prefill).
    DSA layers (dsa.py) also call `update_index(layer_idx, keys)`, which stores and returns the indexer's
    keys (B, S, d) with the same mask, and, for sparse decode, `gather(layer_idx, c_kv, k_pe, positions)`
    in place of `update`: it stores the new latents and returns only the rows at positions (B, T, k).
    """

    absorb: bool

    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor
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
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, cfg.hidden_size, bias=bias)
        self._kv_b_dense: torch.Tensor | None = None  # see kv_b_weight

    def query_latent(self, x: torch.Tensor) -> torch.Tensor | None:
        """The normalized query latent c_q (B,T,q_lora_rank) (V2 eq. 12), None without query compression."""
        return None if self.q_lora_rank == 0 else self.q_a_layernorm(self.q_a_proj(x))

    def project_q(self, x: torch.Tensor, c_q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries split into (q_nope (B,T,H,nope), q_pe (B,T,H,rope)), q_pe not yet rotated. c_q: the query
        latent if already computed."""
        if self.q_lora_rank == 0:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.query_latent(x) if c_q is None else c_q)
        q = q.view(*x.shape[:2], self.n_heads, -1)
        return q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    def project_latent(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a cache holds: the normalized latent c_kv (B,T,r) and the rotated k_pe (B,T,rope)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, self.rope_interleave)[:, :, 0]
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
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
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            scale=self.softmax_scale,
        )  # (B, H, T, v or q's head dim)
        return out[..., : self.v_head_dim].transpose(1, 2).reshape(B, T, -1)

    def kv_b_weight(self) -> torch.Tensor:
        """kv_b_proj's weight (H*(nope+v), r): the live parameter, or for a quantized layer (inference only,
        its weights never change) a dense copy made on first use: the absorbed bmm needs the matrix itself,
        and it is small (H*(nope+v)*r values per layer, 0.5 MB in fp32 for the small preset). quantize_model
        makes it at once, so a compiled step never sees the copy missing."""
        if isinstance(self.kv_b_proj, nn.Linear):
            return self.kv_b_proj.weight
        if self._kv_b_dense is None:
            self._kv_b_dense = self.kv_b_proj.dequantize()
        return self._kv_b_dense

    def absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attention over the latent itself: q_nope·W_UK·c_kv + q_pe·k_pe, then ·c_kv·W_UV. (B, T, H*v).

        W_UK and W_UV are views into kv_b_proj.weight (no copy, so never stale after a weight update); a
        quantized kv_b_proj is dequantized once for them (see `kv_b_weight`).
        All heads share one key (c_kv; k_pe) and one value (c_kv), so the H*T queries of a sequence are
        rows of a single matmul against it: MQA with one 576-wide key head for V3.
        """
        B, T, H = q_nope.shape[:3]
        S, r = c_kv.shape[1], self.kv_lora_rank
        w = self.kv_b_weight().view(H, self.qk_nope_head_dim + self.v_head_dim, r)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]  # (H, nope, r), (H, v, r)
        q_lat = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk)  # (H, B*T, r): queries in latent space
        q_lat = q_lat.view(H, B, T, r).transpose(0, 1).reshape(B, H * T, r)
        q_pe = q_pe.transpose(1, 2).reshape(B, H * T, -1)  # (B, H*T, rope)
        scale = self.softmax_scale
        scores = torch.baddbmm(
            torch.bmm(q_pe, k_pe.transpose(1, 2)), q_lat, c_kv.transpose(1, 2), beta=scale, alpha=scale
        ).view(B, H, T, S)
        if mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out_lat = torch.bmm(scores.softmax(dim=-1).view(B, H * T, S), c_kv)  # (B, H*T, r)
        out = torch.bmm(out_lat.view(B, H, T, r).transpose(0, 1).reshape(H, B * T, r), w_uv.transpose(1, 2))
        return out.view(H, B, T, -1).permute(1, 2, 0, 3).reshape(B, T, -1)  # (B, T, H*v)
