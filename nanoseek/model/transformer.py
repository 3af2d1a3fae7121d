"""The DeepSeek-V2/V3/V3.2 transformer: MLA attention (sparse behind a lightning indexer for V3.2),
DeepSeekMoE, Multi-Token Prediction.

One class per paper concept, module and weight names as in the Hugging Face checkpoint
(`self_attn.kv_a_proj_with_mqa`, `mlp.gate`, ...), so `nanoseek.checkpoint.hf` only renames the stacked
expert weights. The parts live beside it: `layers.py`, `mla.py`, `dsa.py`, `moe.py`, `block.py`, `mtp.py`.

    model = Transformer(get_preset("tiny"))
    logits = model(input_ids)  # (B, T, vocab), float
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.block import Block
from nanoseek.model.config import ConfigError, ModelConfig
from nanoseek.model.dsa import DSA
from nanoseek.model.layers import RMSNorm, RotaryEmbedding
from nanoseek.model.mla import LatentCache
from nanoseek.model.moe import MoE
from nanoseek.model.mtp import MTPBlock
from nanoseek.model.v4 import DeepseekV4


class Transformer(nn.Module):
    """DeepSeek-V2/V3/V3.2 causal LM. `forward(input_ids)` returns logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.model_type == "deepseek_v4":
            raise ConfigError("a deepseek_v4 config builds nanoseek.model.v4.DeepseekV4 (build_model), not Transformer")
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
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normalized hidden states (B, T, D), the input of the head and of MTP depth 1.
        positions: (B or 1, T), default 0..T-1; with a cache, the tokens' absolute positions.
        mask: optional bool keep-mask (B or 1, 1, T, T) replacing plain causal attention (no cache), e.g.
        packed documents that must not see each other."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(self._positions(input_ids, positions))
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        return self.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, positions, cache, mask)).float()

    def mtp_logits(
        self, h: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None, depth: int | None = None
    ) -> list[torch.Tensor]:
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

    # ---- DeepSeek Sparse Attention stages (V3.2 §2.1.1) ---------------------------------------------
    def dsa_layers(self) -> list[DSA]:
        return [m for m in self.modules() if isinstance(m, DSA)]

    def set_dsa_stage(self, dense_attention: bool, indexer_kl: bool) -> None:
        """dense_attention: attend to every earlier token (the warm-up stage) instead of the indexer's top-k.
        indexer_kl: training forwards compute the indexer's KL loss (`indexer_loss`)."""
        for m in self.dsa_layers():
            m.dense_attention, m.indexer_kl = dense_attention, indexer_kl

    def indexer_loss(self) -> torch.Tensor | float:
        """Sum over layers of the indexer KL losses of the last training forward (0 when not asked for)."""
        return sum((m.indexer_loss for m in self.dsa_layers() if m.indexer_loss is not None), 0.0)


def build_model(cfg: ModelConfig) -> Transformer | DeepseekV4:
    """The causal LM of a config: `Transformer` for DeepSeek-V2/V3/V3.2, `DeepseekV4` for V4."""
    return DeepseekV4(cfg) if cfg.model_type == "deepseek_v4" else Transformer(cfg)
