"""Manifold-constrained hyper-connections (mHC; DeepSeek-V4 tech report §2.2, after Xie et al. 2026).

The residual stream of V4 is `hc_mult` parallel streams, (B, T, n, D). Around each sublayer F (attention,
then the MoE) a `HyperConnection` computes from the streams themselves three mixings:

    x_in   = Σ_j pre_j · X_j                      (collapse the n streams into F's input)
    X'_k   = post_k · F(x_in) + Σ_j comb_jk · X_j   (expand F's output, mix the residual streams)

pre = sigmoid(·) + eps, post = 2·sigmoid(·), and comb = Sinkhorn-Knopp(softmax(·)): doubly stochastic, so the
residual mixing neither grows nor shrinks the streams' sum however deep the stack (the "manifold
constraint"). All three are one linear map of the RMS-normalized, flattened streams, each part scaled by its
own learned scalar plus a learned bias. `HyperHead` collapses the streams once more before the final norm.
Everything here runs in fp32, as DeepSeek does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """(…, n, n) logits -> a matrix whose rows and columns each sum to 1 (to within `eps`-sized error after
    `iters` Sinkhorn-Knopp normalizations): softmax over rows, then columns and rows normalized in turn,
    ending with columns, as DeepSeek's kernel does."""
    m = logits.softmax(dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def _flat_norm(streams: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., n, D) -> (..., n·D), RMS-normalized without a weight, in fp32."""
    flat = streams.flatten(-2).float()
    return F.rms_norm(flat, (flat.shape[-1],), eps=eps)


class HyperConnection(nn.Module):
    """One sublayer's mHC: `fn` maps the normalized streams to (pre n, post n, comb n·n) logits."""

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty((2 + hc_mult) * hc_mult, hc_mult * hidden_size))
        self.base = nn.Parameter(torch.empty((2 + hc_mult) * hc_mult))
        self.scale = nn.Parameter(torch.empty(3))  # one for each of pre, post, comb

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams (B, T, n, D) -> (sublayer input (B, T, D), post (B, T, n), comb (B, T, n, n))."""
        n = self.n
        mixes = F.linear(_flat_norm(streams, self.norm_eps), self.fn.float())
        pre, post, comb = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post * post_s + post_b)
        comb = sinkhorn((comb * comb_s + comb_b).unflatten(-1, (n, n)), self.iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return collapsed, post, comb

    @staticmethod
    def expand(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X'_k = post_k · out + Σ_j comb_jk X_j: the sublayer output `out` (B, T, D) back into n streams."""
        dtype = streams.dtype
        mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), streams)  # (B, T, n, D)
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed


class HyperHead(nn.Module):
    """The final collapse of the n streams into one (sigmoid weights, no mixing) before the model's norm."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size))
        self.hc_base = nn.Parameter(torch.empty(hc_mult))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(_flat_norm(streams, self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)
