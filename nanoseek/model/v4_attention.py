"""DeepSeek-V4's hybrid attention (DeepSeek-V4 tech report §2.3): one layer of it.

- Queries: a low-rank path as in MLA (`q_a_proj`, RMSNorm, `q_b_proj`) to `num_attention_heads` heads of
  `head_dim`, each RMS-normalized (no weight).
- Keys and values: ONE shared head, K = V (`kv_proj`, RMSNorm): multi-query attention whose cache holds a
  single `head_dim` vector per token. The trailing `qk_rope_head_dim` dims of queries and keys are rotated.
- What a query sees: the last `sliding_window` tokens (itself included), plus in CSA / HCA layers the
  compressed entries of csa.py (CSA: the indexer's top-k of them; HCA: all visible ones). Compressed
  layers rotate with the compressed branch's RoPE base, sliding-only layers with the main one.
- Attention sinks: a learned logit per head joins the softmax and takes probability mass without a value, so
  a head can attend to nothing.
- Because V = K carries RoPE, the output's rope dims are rotated back by the query's own position (-θ·t).
- Grouped output projection: heads in `o_groups` groups, each group's concatenated outputs projected to
  `o_lora_rank` (`o_a_proj`, block-diagonal), then all groups mixed to the hidden size (`o_b_proj`).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.csa import Compressor, Indexer, rope_tail, visible
from nanoseek.model.layers import RMSNorm, RotaryEmbedding
from nanoseek.model.v4_config import CSA, SLIDING


class V4Cache(Protocol):
    """What V4 attention asks of the engine's cache (nanoseek/engine/v4_cache.py), per step of new tokens."""

    def window(self, layer_idx: int, kv: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys (B, T, hd); return the keys the window may show (B, S, hd) and allowed (B, T, S)."""

    def compress(
        self, key: tuple[int, str], compressor: Compressor, x: torch.Tensor, positions: torch.Tensor, rotary
    ) -> torch.Tensor:
        """Feed the new tokens x (B, T, D) to `compressor`; return every entry each row has so far (B, N, d)."""


def sliding_window_mask(positions: torch.Tensor, window: int) -> torch.Tensor:
    """(B or 1, T) -> (B or 1, T, T) bool: key s is visible to query t when t - window < s <= t."""
    diff = positions[..., :, None] - positions[..., None, :]
    return (diff >= 0) & (diff < window)


class HybridAttention(nn.Module):
    """Shared-KV attention over a sliding window plus this layer's compressed branch (none, CSA or HCA)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        v4 = cfg.v4
        self.layer_idx, self.layer_type = layer_idx, v4.attention_type(layer_idx)
        self.n_heads, self.head_dim, self.window = cfg.num_attention_heads, v4.head_dim, v4.sliding_window
        self.o_groups, self.eps = v4.o_groups, cfg.rms_norm_eps
        D, H, hd = cfg.hidden_size, self.n_heads, self.head_dim
        self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * hd, bias=False)
        self.kv_proj = nn.Linear(D, hd, bias=False)
        self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps)
        # Block-diagonal: group g's (H/G)·hd outputs -> its o_lora_rank rows, stored as one (G·R, H·hd/G) matrix.
        self.o_a_proj = nn.Linear(H * hd // self.o_groups, self.o_groups * v4.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(self.o_groups * v4.o_lora_rank, D, bias=False)
        self.sinks = nn.Parameter(torch.empty(H))
        self.compressor: Compressor | None = None
        self.indexer: Indexer | None = None
        if self.layer_type != SLIDING:
            rate = v4.rate(self.layer_type)
            self.compressor = Compressor(D, hd, rate, overlap=self.layer_type == CSA, eps=cfg.rms_norm_eps)
            if self.layer_type == CSA:
                self.indexer = Indexer(cfg, rate)
        # Training the CSA indexer as DeepSeek-V3.2 trains its own (`DeepseekV4.set_dsa_stage`): a dense stage
        # attending every visible entry, and training forwards that compute the indexer's KL toward the main
        # attention's distribution over the entries it attends (`indexer_loss`), with the indexer's input
        # detached so that the KL trains the indexer alone and the LM loss the rest.
        self.dense_attention = False
        self.indexer_kl = False
        self.indexer_loss: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, cache: V4Cache | None = None
    ) -> torch.Tensor:
        """x (B, T, D), positions (B or 1, T), rotary: this layer's RoPE (main or compressed) -> (B, T, D).
        Without a cache, x is a whole sequence from position 0; with one (the engine's, nanoseek/engine/v4_cache.py)
        it is each row's next tokens, and the window and the compressed entries before them come from the cache."""
        cos, sin = rotary(positions)
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).unflatten(-1, (self.n_heads, self.head_dim))  # (B, T, H, hd)
        q = rope_tail(F.rms_norm(q, (self.head_dim,), eps=self.eps), cos, sin)
        kv = rope_tail(self.kv_norm(self.kv_proj(x))[:, :, None], cos, sin)[:, :, 0]  # (B, T, hd): K = V
        if cache is None:
            keys, allowed = kv, sliding_window_mask(positions, self.window)
        else:
            keys, allowed = cache.window(self.layer_idx, kv, positions)
        kl = self.indexer is not None and self.training and self.indexer_kl and cache is None
        if self.compressor is not None:
            compressed = self._compressed(self.compressor, "kv", x, positions, rotary, cache)  # (B, N, hd)
            seen = visible(positions, compressed.shape[1], self.compressor.rate)
            if self.indexer is not None:
                index = self._index(x, q_latent, positions, rotary, cache, kl)  # (B, T, N)
                seen = seen.expand_as(index) if self.dense_attention else self.indexer.select(index, seen)
            keys = torch.cat((keys, compressed), dim=1)
            allowed = torch.cat((allowed.expand(seen.shape[0], -1, -1), seen), dim=-1)
        out, probs = self._attend(q, keys, allowed)  # (B, T, H, hd), (B, H, T, S)
        if self.indexer is not None and self.training:
            self.indexer_loss = indexer_kl(probs[..., -index.shape[-1] :], index, seen) if kl else None
        out = rope_tail(out, cos, -sin)  # undo the rotation V carried (K = V)
        return self._project(out)

    def _index(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        cache: V4Cache | None,
        kl: bool,
    ) -> torch.Tensor:
        """The CSA indexer's scores (B, T, N). With the KL on, on detached inputs and with gradient (the KL
        trains the indexer apart); otherwise without gradient, as top-k passes none."""
        if kl:
            x, q_latent = x.detach(), q_latent.detach()
        with torch.set_grad_enabled(kl and torch.is_grad_enabled()):
            keys = self._compressed(self.indexer.compressor, "index", x, positions, rotary, cache)
            return self.indexer.scores(x, q_latent, positions, rotary, keys)

    def _compressed(
        self,
        compressor: Compressor,
        kind: str,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        cache: V4Cache | None,
    ) -> torch.Tensor:
        """Every compressed entry of `compressor` (attention's or the indexer's) each row has so far (B, N, d)."""
        if cache is None:
            return compressor(x, rotary)
        return cache.compress((self.layer_idx, kind), compressor, x, positions, rotary)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over the allowed keys and the head's sink; the sink's share of mass is dropped. Returns the
        output and the attention probabilities (B, H, T, S)."""
        logits = torch.einsum("bthd,bsd->bhts", q, keys) * self.head_dim**-0.5
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        sink = self.sinks.to(logits.dtype)[None, :, None, None].expand(*logits.shape[:-1], 1)
        probs = torch.cat((logits, sink), dim=-1).softmax(dim=-1)[..., :-1]
        return torch.einsum("bhts,bsd->bthd", probs.to(keys.dtype), keys), probs

    def _project(self, out: torch.Tensor) -> torch.Tensor:
        B, T = out.shape[:2]
        groups = out.reshape(B, T, self.o_groups, -1)  # (B, T, G, H·hd/G)
        w = self.o_a_proj.weight.view(self.o_groups, -1, groups.shape[-1])  # (G, R, H·hd/G)
        return self.o_b_proj(torch.einsum("btgi,gri->btgr", groups, w).flatten(2))


def indexer_kl(probs: torch.Tensor, index: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """KL(p_t || softmax(I_t)) over the compressed entries each query attends, mean over the queries that attend
    any (DeepSeek-V3.2 §2.1.1's indexer loss, on V4's entries): p_t is the main attention's probability on them
    (B, H, T, N), summed over heads and L1-normalized, without gradient; I the index scores (B, T, N)."""
    with torch.no_grad():
        p = probs.float().sum(dim=1) * attended  # (B, T, N)
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    log_q = index.masked_fill(~attended, float("-inf")).log_softmax(dim=-1)
    kl = (torch.xlogy(p, p) - torch.where(p > 0, p * log_q, torch.zeros_like(p))).sum(dim=-1)  # (B, T)
    rows = attended.any(dim=-1)
    return kl[rows].sum() / rows.sum().clamp_min(1)
