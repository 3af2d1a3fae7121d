"""DeepSeek Sparse Attention (DeepSeek-V3.2 §2.1): a lightning indexer scores every earlier token for each
query, and MLA attends over the top-k of them only (`index_topk`, 2048 for V3.2).

The indexer is cheap by design: a few ReLU heads (`index_n_heads` of `index_head_dim`) over one shared key
per token, so scoring a token costs a fraction of attending to it, and the key it caches is small
(`index_head_dim` values beside MLA's 576). Its queries come from MLA's query latent; its keys are
LayerNorm-ed and rotated by RoPE on their first `qk_rope_head_dim` dims in the rotate-half layout (MLA's
are interleaved pairs), as transformers' and DeepSeek's corrected code do.

    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])        (V3.2 eq. 1)

Training (§2.1.1): a dense warm-up fits the indexer's distribution softmax(I[t]) to the main attention's
(summed over heads, L1-normalized) with a KL loss while attention stays dense; sparse training then keeps
that KL on the selected set only, with the indexer's input detached so the LM loss alone trains the rest.
`DSA.dense_attention` and `DSA.indexer_kl` switch those stages on; `DSA.indexer_loss` holds the last KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.layers import apply_rope
from nanoseek.model.mla import MLA, LatentCache

# Score values (queries x keys, per head) a sparse prefill computes at once: 32M, 128 MB in fp32. A 16K-token
# prompt scored whole would need its (T, T) scores per indexer head at once (gigabytes).
PREFILL_SCORES = 1 << 25


class Indexer(nn.Module):
    """The lightning indexer of one layer (V3.2 §2.1, eq. 1); weight names as in the checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim, self.topk = cfg.qk_rope_head_dim, cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim**-0.5

    def _rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = t.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(rot, cos, sin, interleave=False), rest), dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """What a cache holds per token: the normalized, rotated key (B, T, index_head_dim)."""
        return self._rotate(self.k_norm(self.wk(x))[:, :, None], cos, sin)[:, :, 0]

    def forward(
        self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        """Index scores I (B, T, S), fp32, of the T queries (x, and MLA's query latent q_resid) over keys (B, S, d)."""
        B, T = x.shape[:2]
        q = self._rotate(self.wq_b(q_resid).view(B, T, self.n_heads, self.head_dim), cos, sin)
        logits = torch.bmm(q.float().view(B, T * self.n_heads, -1), keys.float().transpose(1, 2))  # (B, T*H, S)
        relu = F.relu(logits * self.softmax_scale).view(B * T, self.n_heads, -1)
        w = self.weights_proj(x).float().view(B * T, 1, self.n_heads) * self.n_heads**-0.5
        return torch.bmm(w, relu).view(B, T, -1)


def top_positions(scores: torch.Tensor, keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-min(k, S) keys of each query among those `keep` (B or 1, 1, T, S) allows: positions (B, T, k')
    and whether each is allowed (a query with fewer than k' allowed keys fills up with disallowed ones)."""
    masked = scores.masked_fill(~keep[:, 0], float("-inf"))
    values, positions = masked.topk(min(k, scores.shape[-1]), dim=-1)
    return positions, values > float("-inf")


def selected_mask(scores: torch.Tensor, keep: torch.Tensor, k: int) -> torch.Tensor:
    """`keep` (B or 1, 1, T, S) narrowed to each query's top-k keys: the sparse attention pattern."""
    if k >= scores.shape[-1]:
        return keep
    positions, _ = top_positions(scores, keep, k)
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, positions, True)
    return keep & chosen[:, None]


def causal_keep(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(1, 1, T, S): the T newest of S positions each see themselves and everything before."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]


class DSA(MLA):
    """MLA behind a lightning indexer (DeepSeek Sparse Attention, V3.2 §2.1). The same two forms as MLA:
    expanded attention under the sparse mask (training, prefill), and absorbed attention over the latents
    of the selected tokens alone, gathered from the cache (decode), so its cost per token stops growing
    with the context once that exceeds index_topk."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__(cfg, layer_idx)
        self.indexer = Indexer(cfg)
        self.dense_attention = False  # warm-up stage: attend densely, train the indexer toward that
        self.indexer_kl = False  # training forwards compute `indexer_loss`
        self.indexer_loss: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        T = x.shape[1]
        c_q = self.query_latent(x)
        q_nope, q_pe = self.project_q(x, c_q)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleave)
        c_kv, k_pe = self.project_latent(x, cos, sin)
        if cache is not None:  # inference (the engine): prefill or decode over the cache, no indexer loss
            return self.o_proj(self.cached(x, c_q, cos, sin, q_nope, q_pe, c_kv, k_pe, cache))
        kl = self.training and self.indexer_kl
        x_idx, q_idx = (x.detach(), c_q.detach()) if kl else (x, c_q)  # §2.1.1: the indexer optimized apart
        keys = self.indexer.keys(x_idx, cos, sin)
        S = keys.shape[1]
        keep = causal_keep(T, S, x.device) if mask is None else mask
        sparse = S > self.indexer.topk and not self.dense_attention
        scores = None
        if sparse or kl:
            with torch.set_grad_enabled(kl and torch.is_grad_enabled()):  # top-k has no gradient to give
                scores = self.indexer(x_idx, q_idx, cos, sin, keys)
        attend = selected_mask(scores, keep, self.indexer.topk) if sparse else mask  # None: plain causal
        if self.training:
            self.indexer_loss = (
                self._indexer_kl(scores, q_nope, q_pe, c_kv, k_pe, keep if attend is None else attend) if kl else None
            )
        return self.o_proj(self.expanded(q_nope, q_pe, c_kv, k_pe, attend))

    def cached(self, x, c_q, cos, sin, q_nope, q_pe, c_kv, k_pe, cache: LatentCache) -> torch.Tensor:
        """Attention of the step's T queries over everything cached, the step's own tokens stored first
        (their indexer keys beside their latents). Decode (`cache.absorb`) attends absorbed over the top-k
        latents alone, gathered from the cache; prefill attends expanded under the sparse mask, a chunk of
        queries at a time (`sparse_prefill`). With no more keys than index_topk it is plain MLA: every key
        is selected, so the indexer is not run. Returns (B, T, H*v)."""
        keys, mask = cache.update_index(self.layer_idx, self.indexer.keys(x, cos, sin))  # (B, S, d)
        T, S, k = x.shape[1], keys.shape[1], self.indexer.topk
        sparse = S > k and not self.dense_attention
        if sparse and cache.absorb:
            keep = causal_keep(T, S, x.device) if mask is None else mask
            positions, valid = top_positions(self.indexer(x, c_q, cos, sin, keys), keep, k)
            c_sel, pe_sel = cache.gather(self.layer_idx, c_kv, k_pe, positions)
            return self.absorbed_sparse(q_nope, q_pe, c_sel, pe_sel, valid)
        c_kv, k_pe, _ = cache.update(self.layer_idx, c_kv, k_pe)
        if sparse:
            return self.sparse_prefill(x, c_q, cos, sin, keys, mask, q_nope, q_pe, c_kv, k_pe)
        if cache.absorb:
            return self.absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        return self.expanded(q_nope, q_pe, c_kv, k_pe, mask)

    def sparse_prefill(self, x, c_q, cos, sin, keys, mask, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        """`expanded` under the sparse mask, the same numbers, for a prompt of any length: the queries go in
        chunks whose indexer scores (B, Q, S') and attention scores (B, H, Q, S') stay near PREFILL_SCORES
        values, S' being the keys up to the chunk's last query (so most of the causal upper half is never
        scored). Keys and values are rebuilt from the latent once for all chunks. keys (B, S, d), c_kv (B, S,
        r), k_pe (B, S, rope): all cached entries; mask: the cache's keep-mask (B, 1, T, S), None: causal."""
        B, T, H = q_nope.shape[:3]
        S = keys.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # (B, H, T, nope+rope)
        k_all = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, H, -1)), dim=-1).transpose(1, 2)
        v = F.pad(v, (0, max(q.shape[-1] - self.v_head_dim, 0))).transpose(1, 2)  # as in `expanded`
        n = max(1, PREFILL_SCORES // (B * S * max(H, self.indexer.n_heads)))  # queries per chunk
        out = []
        for t0 in range(0, T, n):
            t1 = min(t0 + n, T)
            s1 = S - T + t1  # query t sees keys up to its position, start + t <= S - T + t (S >= start + T)
            keep = causal_keep(t1 - t0, s1, x.device) if mask is None else mask[:, :, t0:t1, :s1]
            chunk = slice(t0, t1)
            scores = self.indexer(x[:, chunk], c_q[:, chunk], cos[:, chunk], sin[:, chunk], keys[:, :s1])
            attend = selected_mask(scores, keep, self.indexer.topk)  # (B, 1, Q, S')
            o = F.scaled_dot_product_attention(
                q[:, :, chunk], k_all[:, :, :s1], v[:, :, :s1], attn_mask=attend, scale=self.softmax_scale
            )
            out.append(o[..., : self.v_head_dim])  # (B, H, Q, v)
        return torch.cat(out, dim=2).transpose(1, 2).reshape(B, T, -1)

    def absorbed_sparse(self, q_nope, q_pe, c_sel, pe_sel, valid):
        """Absorbed attention of each query over its own k gathered latents: c_sel (B, T, k, r), pe_sel
        (B, T, k, rope), valid (B, T, k). Returns (B, T, H*v), equal to `absorbed` under the sparse mask."""
        B, T, H = q_nope.shape[:3]
        k, r = c_sel.shape[2], self.kv_lora_rank
        w = self.kv_b_weight().view(H, self.qk_nope_head_dim + self.v_head_dim, r)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]
        q_lat = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk).transpose(0, 1)  # (B*T, H, r)
        c_sel, pe_sel = c_sel.reshape(B * T, k, r), pe_sel.reshape(B * T, k, -1)
        scores = torch.baddbmm(
            torch.bmm(q_pe.reshape(B * T, H, -1), pe_sel.transpose(1, 2)),
            q_lat,
            c_sel.transpose(1, 2),
            beta=self.softmax_scale,
            alpha=self.softmax_scale,
        )  # (B*T, H, k)
        scores = scores.masked_fill(~valid.reshape(B * T, 1, k), float("-inf"))
        out_lat = torch.bmm(scores.softmax(dim=-1), c_sel)  # (B*T, H, r)
        out = torch.bmm(out_lat.transpose(0, 1), w_uv.transpose(1, 2))  # (H, B*T, v)
        return out.transpose(0, 1).reshape(B, T, -1)

    def _indexer_kl(self, scores, q_nope, q_pe, c_kv, k_pe, attend) -> torch.Tensor:
        """KL(p_t || softmax(I_t)) over each query's attended keys, mean over queries (V3.2 §2.1.1), where
        p_t is the main attention's distribution summed over heads and L1-normalized (no gradient)."""
        with torch.no_grad():
            B, T, H = q_nope.shape[:3]
            kv = self.kv_b_proj(c_kv).view(B, -1, H, self.qk_nope_head_dim + self.v_head_dim)
            k_nope = kv[..., : self.qk_nope_head_dim]
            logits = torch.einsum("bthd,bshd->bhts", q_nope.float(), k_nope.float())
            logits = logits + torch.einsum("bthd,bsd->bhts", q_pe.float(), k_pe.float())
            logits = (logits * self.softmax_scale).masked_fill(~attend, float("-inf"))
            p = logits.softmax(dim=-1).mean(dim=1)  # (B, T, S): heads summed, then L1-normalized
        log_q = scores.masked_fill(~attend[:, 0], float("-inf")).log_softmax(dim=-1)
        kl = torch.xlogy(p, p) - torch.where(p > 0, p * log_q, torch.zeros_like(p))
        return kl.sum(dim=-1).mean()
