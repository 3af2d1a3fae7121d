"""The DeepSeek-V4 causal LM (`model_type` deepseek_v4; DeepSeek-V4 tech report §2).

    model = DeepseekV4(get_preset("tiny-v4"))
    logits = model(input_ids)  # (B, T, vocab), float

Embedding -> `hc_mult` copies of each token's vector (the mHC residual streams, mhc.py) -> blocks of hybrid
attention (v4_attention.py) and V4's MoE (v4_moe.py), each sublayer wrapped in a hyper-connection -> the
streams collapsed by `HyperHead` -> RMSNorm -> head. Module names follow transformers' DeepseekV4ForCausalLM
(`self_attn.q_a_proj`, `attn_hc.fn`, ...); nanoseek.checkpoint.hf maps them to DeepSeek's names on disk.
Multi-Token Prediction modules (`V4MTPBlock`) follow DeepSeek's own inference code; transformers builds none.

With the engine's cache (nanoseek/engine/v4_cache.py) it also runs the next tokens of running sequences.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.layers import RMSNorm, RotaryEmbedding
from nanoseek.model.mhc import HyperConnection, HyperHead
from nanoseek.model.moe import MoE
from nanoseek.model.v4_attention import HybridAttention, V4Cache
from nanoseek.model.v4_config import SLIDING
from nanoseek.model.v4_moe import V4MoE


def v4_rotaries(cfg: ModelConfig) -> tuple[RotaryEmbedding, RotaryEmbedding]:
    """(main, compressed) RoPE: sliding-only layers rotate plainly at rope_theta; CSA/HCA layers and their
    compressors at compress_rope_theta with the config's YaRN, whose cos/sin V4 does not rescale."""
    main = RotaryEmbedding(cfg.replace(rope_scaling=None))
    yarn = cfg.rope_scaling and {"attention_factor": 1.0, **cfg.rope_scaling}
    return main, RotaryEmbedding(cfg.replace(rope_theta=cfg.v4.compress_rope_theta, rope_scaling=yarn or None))


class V4Block(nn.Module):
    """Decoder layer on n residual streams: mHC around hybrid attention, then mHC around the MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        v4 = cfg.v4
        self.layer_idx = layer_idx
        self.compressed = v4.attention_type(layer_idx) != SLIDING
        args = (cfg.hidden_size, v4.hc_mult, v4.hc_sinkhorn_iters, v4.hc_eps, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(*args)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = HybridAttention(cfg, layer_idx)
        self.ffn_hc = HyperConnection(*args)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = V4MoE(cfg, layer_idx)

    def forward(
        self,
        streams: torch.Tensor,
        positions: torch.Tensor,
        rotaries: tuple[RotaryEmbedding, RotaryEmbedding],
        input_ids: torch.Tensor,
        cache: V4Cache | None = None,
    ) -> torch.Tensor:
        """streams (B, T, n, D) -> (B, T, n, D)."""
        x, post, comb = self.attn_hc(streams)
        out = self.self_attn(self.input_layernorm(x), positions, rotaries[self.compressed], cache)
        streams = HyperConnection.expand(out, streams, post, comb)
        x, post, comb = self.ffn_hc(streams)
        out = self.mlp(self.post_attention_layernorm(x), input_ids)
        return HyperConnection.expand(out, streams, post, comb)


class V4MTPBlock(V4Block):
    """One Multi-Token Prediction module of V4 (as V3 §2.2, on mHC streams), as DeepSeek's inference code builds
    it: the main model's final streams h (B, T, n, D), before their collapse, and the embedding of the next
    tokens combine as e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(h_i)) (broadcast over the streams), run
    one sliding-window, score-routed block, and are collapsed by the module's own HyperHead and norm; the
    embedding and the output head are the main model's."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        D, v4 = cfg.hidden_size, cfg.v4
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.hc_head = HyperHead(D, v4.hc_mult, v4.hc_eps, cfg.rms_norm_eps)

    def forward(
        self,
        streams: torch.Tensor,
        emb: torch.Tensor,
        positions: torch.Tensor,
        rotaries: tuple[RotaryEmbedding, RotaryEmbedding],
        input_ids: torch.Tensor,
        cache: V4Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this depth's streams (B, T, n, D) for the next depth, its normalized hidden states (B, T, D))."""
        x = self.e_proj(self.enorm(emb))[:, :, None] + self.h_proj(self.hnorm(streams))
        x = super().forward(x, positions, rotaries, input_ids, cache)
        return x, self.norm(self.hc_head(x))


class DeepseekV4(nn.Module):
    """DeepSeek-V4 causal LM. `forward(input_ids)` returns logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.model_type != "deepseek_v4":
            raise ValueError(f"DeepseekV4 builds deepseek_v4 configs, not {cfg.model_type!r}")
        self.config = cfg
        v4 = cfg.v4
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(V4Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg.hidden_size, v4.hc_mult, v4.hc_eps, cfg.rms_norm_eps)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(V4MTPBlock(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotaries = v4_rotaries(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """As transformers initializes V4: matrices N(0, initializer_range); norm weights and the mHC scales
        one; mHC biases, attention sinks and the compressors' position biases zero; a random hash table.
        Draws from torch's global generator."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("base", "hc_base", "sinks", "position_bias"):
                p.zero_()
            elif leaf in ("scale", "hc_scale") or p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for moe in self.moe_layers():
            moe.reset_buffers()

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: V4Cache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normalized hidden states (B, T, D): of whole sequences from position 0, or with the engine's
        cache of each row's next tokens at `positions` (B, T). No custom attention mask: the compressed branches
        pool fixed windows of positions, so right padding is the only padding V4 takes."""
        return self.norm(self.hc_head(self.streams(input_ids, positions, cache, mask)))

    def streams(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: V4Cache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's mHC streams (B, T, n, D): the input of the final collapse and of MTP depth 1."""
        if mask is not None or (positions is None) != (cache is None):
            raise ValueError(
                "DeepSeek-V4 runs whole sequences from position 0, or the engine's cache with the new tokens' "
                "positions: no custom attention mask (its compressed branches pool fixed windows of positions)"
            )
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        h = self.embed_tokens(input_ids)
        streams = h[:, :, None].expand(-1, -1, self.config.v4.hc_mult, -1).contiguous()  # (B, T, n, D)
        for layer in self.layers:
            streams = layer(streams, positions, self.rotaries, input_ids, cache)
        return streams

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: object | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, positions, cache, mask)).float()

    def mtp_logits(
        self, streams: torch.Tensor, input_ids: torch.Tensor, mask: None = None, depth: int | None = None
    ) -> list[torch.Tensor]:
        """Logits of every MTP depth k = 1..D, or of the first `depth` only. streams: `self.streams(input_ids)`
        (not the collapsed hidden states Transformer.mtp_logits takes). Depth k's logits have length T-k;
        position i predicts token i+k+1."""
        if mask is not None:
            raise ValueError("DeepSeek-V4's MTP runs whole sequences: no custom attention mask")
        out, T = [], input_ids.shape[1]
        for k, block in enumerate(self.mtp[:depth], start=1):
            if T - k <= 0:
                break
            positions = torch.arange(T - k, device=input_ids.device)[None]
            emb = self.embed_tokens(input_ids[:, k:])
            streams, h = block(streams[:, : T - k], emb, positions, self.rotaries, input_ids[:, k:])
            out.append(self.lm_head(h).float())
        return out

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    # The lightning indexer's training, as for DeepSeek-V3.2's DSA layers (trainers call these on any model):
    # V4's CSA layers are the layers with an indexer.
    def dsa_layers(self) -> list[HybridAttention]:
        return [m for m in self.modules() if isinstance(m, HybridAttention) and m.indexer is not None]

    def set_dsa_stage(self, dense_attention: bool, indexer_kl: bool) -> None:
        """dense_attention: CSA attends every visible entry (a warm-up stage) instead of the indexer's top-k.
        indexer_kl: training forwards compute the indexers' KL loss (`indexer_loss`)."""
        for m in self.dsa_layers():
            m.dense_attention, m.indexer_kl = dense_attention, indexer_kl

    def indexer_loss(self) -> torch.Tensor | float:
        """Sum over CSA layers of the indexer KL losses of the last training forward (0 when not asked for)."""
        return sum((m.indexer_loss for m in self.dsa_layers() if m.indexer_loss is not None), 0.0)

    def aux_loss(self) -> torch.Tensor | float:
        """Sum of the sequence-wise balance losses of the last training forward (0 when α = 0)."""
        return sum((m.aux_loss for m in self.moe_layers() if m.aux_loss is not None), 0.0)
