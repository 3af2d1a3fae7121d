"""Multi-Token Prediction modules (DeepSeek-V3 §2.2): one extra block per depth, sharing the main model's
embedding and output head."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.block import Block
from nanoseek.model.config import ModelConfig
from nanoseek.model.layers import RMSNorm
from nanoseek.model.mla import LatentCache


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

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))
        return super().forward(x, cos, sin, mask, cache)
