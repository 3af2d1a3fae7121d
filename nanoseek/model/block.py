"""The decoder block: pre-norm MLA (behind a lightning indexer for V3.2), then a dense FFN or DeepSeekMoE
(DeepSeek-V3 §2.1)."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.dsa import DSA
from nanoseek.model.layers import RMSNorm
from nanoseek.model.mla import MLA, LatentCache
from nanoseek.model.moe import MLP, MoE


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm x), then + FFN(norm x); the FFN is dense or DeepSeekMoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DSA(cfg, layer_idx) if cfg.dsa else MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))
