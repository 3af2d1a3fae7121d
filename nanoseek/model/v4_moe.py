"""DeepSeek-V4's MoE: DeepSeekMoE (moe.py) with three changes (DeepSeek-V4 tech report §2.1).

- Scores are sqrt(softplus(logits)) ("sqrtsoftplus"); the chosen experts' scores are renormalized to sum to
  one and scaled by `routed_scaling_factor`, as V3 does with sigmoid scores.
- The first layers (`mlp_layer_types` "hash_moe") choose experts by hash routing: a fixed token id -> experts
  table `tid2eid` (loaded with the weights, never trained); the learned gate only weights the chosen experts.
  The other layers take the top-k of the scores plus the auxiliary-loss-free correction bias, as V3 does.
- Every SwiGLU (routed and shared experts) clamps its inputs: gate at most `swiglu_limit`, up within
  ±`swiglu_limit`, which bounds activations in low-precision training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.moe import MLP, Experts, Gate, MoE


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


class ClampedMLP(MLP):
    """The shared expert: SwiGLU with clamped inputs."""

    def __init__(self, dim: int, inter_dim: int, limit: float):
        super().__init__(dim, inter_dim)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class ClampedExperts(Experts):
    """The routed experts, stacked as in moe.Experts, each a SwiGLU with clamped inputs."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, limit: float):
        super().__init__(n_experts, dim, inter_dim)
        self.limit = limit

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (M, D) tokens sorted by expert; counts: (E,) tokens per expert. Returns (M, D). (moe.Experts' own
        compiled fallback runs its unclamped kernel, so this one always picks its own.)"""
        if self.use_grouped_mm and x.dtype == self.gate_proj.dtype:
            return self._grouped(x, counts)
        return self._loop(x, counts)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)
        gate = torch._grouped_mm(x, self.gate_proj.transpose(-2, -1), offs=offs)
        up = torch._grouped_mm(x, self.up_proj.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(clamped_swiglu(gate, up, self.limit), self.down_proj.transpose(-2, -1), offs=offs)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (w[e].to(x.dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        return F.linear(clamped_swiglu(F.linear(x, gate), F.linear(x, up), self.limit), down)

    def few_tokens(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        for n, (ws, es) in enumerate(zip(weights.tolist(), indices.tolist())):
            for w, e in zip(ws, es):
                y[n : n + 1].add_(self.one(e, x[n : n + 1]), alpha=w)
        return y


class ScoreGate(Gate):
    """Top-k routing over sqrtsoftplus scores (V4's "moe" layers); the correction bias steers selection only."""

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()  # (N, E)
        indices = self.select(scores, input_ids)
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores

    def select(self, scores: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        return (scores + self.e_score_correction_bias).topk(self.top_k, dim=-1, sorted=False).indices


class HashGate(ScoreGate):
    """Hash routing (V4's "hash_moe" layers): token id t goes to the experts tid2eid[t], a fixed table."""

    fp32_buffers = ()

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.e_score_correction_bias = None  # nothing to balance: the table decides
        self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.top_k, dtype=torch.long))

    def select(self, scores: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("a hash-routed MoE layer needs the token ids")
        return self.tid2eid[input_ids.reshape(-1)]

    @torch.no_grad()
    def reset_table(self) -> None:
        """A fresh table for a model trained from scratch: k distinct random experts per token id (released
        checkpoints ship theirs). Draws from torch's global generator."""
        n_experts = self.weight.shape[0]
        self.tid2eid.copy_(torch.rand(self.tid2eid.shape[0], n_experts).argsort(dim=-1)[:, : self.top_k])


class V4MoE(MoE):
    """DeepSeekMoE as V4 runs it: hash or score routing, clamped SwiGLU experts, one shared expert."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        nn.Module.__init__(self)  # MoE's own __init__ would build V3's gate and experts first, only to replace them
        limit = cfg.v4.swiglu_limit
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.aux_loss_alpha = cfg.aux_loss_alpha if cfg.seq_aux else 0.0
        self.gate = HashGate(cfg) if cfg.v4.mlp_type(layer_idx) == "hash_moe" else ScoreGate(cfg)
        self.experts = ClampedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, limit)
        self.shared_experts = ClampedMLP(cfg.hidden_size, cfg.moe_intermediate_size, limit)
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def reset_buffers(self) -> None:
        super().reset_buffers()
        if isinstance(self.gate, HashGate):
            self.gate.reset_table()

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        return self.combine(flat, *self.gate(flat, input_ids), x.shape)

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self._few_tokens(x, weights, indices)  # the per-token loop clamps; moe.MoE's gather does not
