"""The optimizer every nanoseek trainer uses (pretraining, GRPO, SFT): AdamW with weight decay on matrices only.

Norm gains, biases and the router's bias-free vectors are not decayed (decay would pull RMSNorm gains toward
zero); the fused implementation runs one kernel over all parameters on CPU as on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn


def adamw(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool = True,
) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters: `weight_decay` on tensors of 2+ dims, none on the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
