"""DeepSeek-V4's compressed key/value branches (DeepSeek-V4 tech report §2.3).

- `Compressor`: every `rate` tokens become one compressed entry, a softmax-gated sum of their projections,
  `C_w = Σ_{j ∈ window w} softmax_j(Z_j + B_j) ⊙ C_j` (per channel, B a learned per-slot bias), RMS-normalized
  and rotated (the trailing RoPE dims, the compressed branch's base) at the window's first position w·rate.
  Heavily Compressed Attention (HCA, §2.3.2) uses it with non-overlapping windows of m' = 128 tokens.
  Compressed Sparse Attention (CSA, §2.3.1) uses m = 4 with overlapping windows: each token projects two
  series, Ca and Cb; entry w pools window w-1's Ca with window w's Cb, so it sees 2m tokens with stride m.
- `Indexer`: CSA's lightning indexer, scoring each query against compressed indexer keys with
  `Σ_h w_{t,h} · ReLU(q_{t,h} · K_s)` and keeping each query's top `index_topk` entries.

Causality: entry w summarizes tokens up to (w+1)·rate − 1, so query t sees it only when w < (t+1) // rate.
Tokens after the last full window are not compressed yet (the sliding window covers them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.layers import RMSNorm, RotaryEmbedding, apply_rope


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing RoPE dims of x (B, T, H, d) (interleaved pairs, V4's layout); the rest pass."""
    rd = 2 * cos.shape[-1]
    return torch.cat((x[..., :-rd], apply_rope(x[..., -rd:], cos, sin, interleave=True)), dim=-1)


def visible(positions: torch.Tensor, n_entries: int, rate: int) -> torch.Tensor:
    """(B or 1, T) positions -> (B or 1, T, n_entries) bool: which compressed entries each query may see."""
    return torch.arange(n_entries, device=positions.device) < ((positions + 1) // rate)[..., None]


class Compressor(nn.Module):
    """Gated pooling of every `rate` tokens into one entry of `head_dim` (overlapping windows when `overlap`)."""

    def __init__(self, hidden_size: int, head_dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.rate, self.overlap = head_dim, rate, overlap
        width = 2 * head_dim if overlap else head_dim  # Ca and Cb side by side when overlapping
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.empty(rate, width))
        self.kv_norm = RMSNorm(head_dim, eps)

    @property
    def window(self) -> int:
        """Tokens one entry pools: 2·rate with overlapping windows, else rate."""
        return 2 * self.rate if self.overlap else self.rate

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) at positions (B or 1, T) -> the values C and gate logits Z + B (B, T, width) of each token
        (B: the bias of the token's slot in its window, position mod rate)."""
        return self.kv_proj(x), self.gate_proj(x) + self.position_bias[positions % self.rate]

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, starts: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        """Windows of projected tokens (B, n, `window`, width), oldest first, -> their entries (B, n, head_dim),
        rotated at `starts` (B or 1, n), each window's own first position w·rate. With overlap a window's first
        `rate` tokens are window w-1's (their Ca half counts) and its last `rate` its own (their Cb half)."""
        if self.overlap:
            d, m = self.head_dim, self.rate
            kv = torch.cat((kv[:, :, :m, :d], kv[:, :, m:, d:]), dim=2)
            gate = torch.cat((gate[:, :, :m, :d], gate[:, :, m:, d:]), dim=2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)  # (B, n, head_dim)
        cos, sin = rotary(starts)
        return rope_tail(self.kv_norm(pooled)[:, :, None], cos, sin)[:, :, 0]

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        """x (B, T, D) of a whole sequence from position 0 -> its entries (B, T // rate, head_dim)."""
        n, m = x.shape[1] // self.rate, self.rate
        kv, gate = self.project(x[:, : n * m], torch.arange(n * m, device=x.device))
        kv, gate = kv.unflatten(1, (n, m)), gate.unflatten(1, (n, m))  # (B, n, rate, width)
        if self.overlap:  # window 0 has no predecessor: zero values under -inf gates (softmax weight 0)
            kv = torch.cat((F.pad(kv, (0, 0, 0, 0, 1, 0))[:, :n], kv), dim=2)
            gate = torch.cat((F.pad(gate, (0, 0, 0, 0, 1, 0), value=float("-inf"))[:, :n], gate), dim=2)
        return self.pool(kv, gate, torch.arange(n, device=x.device)[None] * m, rotary)


class Indexer(nn.Module):
    """CSA's lightning indexer (§2.3.1 eq. 13-17): its own overlapping compressor at `index_head_dim`, queries
    from the attention's query latent, `index_n_heads` ReLU heads weighted per token."""

    def __init__(self, cfg: ModelConfig, rate: int):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.rate = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, rate
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, rate, overlap=True, eps=cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> keep (B, T, N) bool: the compressed entries each query attends to (its top-k of the visible).
        keys: the indexer's compressed keys (B, N, d), from the engine's cache; None: computed here from x, a
        whole sequence from position 0."""
        keys = self.compressor(x, rotary) if keys is None else keys
        index = self.scores(x, q_latent, positions, rotary, keys)
        return self.select(index, visible(positions, keys.shape[1], self.rate))

    def scores(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        keys: torch.Tensor,
    ) -> torch.Tensor:
        """Index scores I (B, T, N) in fp32 of every query against every compressed key (eq. 16)."""
        q = self.q_b_proj(q_latent).unflatten(-1, (self.n_heads, self.head_dim))  # (B, T, H, d)
        cos, sin = rotary(positions)
        q = rope_tail(q, cos, sin)
        scores = F.relu(torch.einsum("bthd,bnd->bthn", q.float(), keys.float())) * self.head_dim**-0.5
        weights = self.weights_proj(x).float() * self.n_heads**-0.5  # (B, T, H)
        return (scores * weights[..., None]).sum(dim=2)  # (B, T, N)

    def select(self, index: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Each query's top `index_topk` entries among those it may see (`seen`, (B, T, N) bool)."""
        index = index.masked_fill(~seen, float("-inf"))
        top = index.topk(min(self.topk, index.shape[-1]), dim=-1).indices
        keep = torch.zeros_like(index, dtype=torch.bool).scatter_(-1, top, True)
        return keep & seen  # early queries see fewer than k entries: their extra picks are not visible
