"""The small layers every DeepSeek block shares: RMSNorm and the decoupled rotary embedding (RoPE), with
YaRN context extension (DeepSeek-V2 appendix B) and both pair layouts (interleaved, rotate-half)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # the same math in one fused op
        # Normalize in fp32 whatever the activation dtype, then scale in it (as DeepSeek does).
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the decoupled RoPE dims, with YaRN (DeepSeek-V2 appendix B) if set.

    Returns (inv_freq of shape (qk_rope_head_dim/2,), attention_factor applied to cos and sin).
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # Explicitly on the CPU, so a model built under torch.device("meta") still has real frequencies.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    original = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dim whose wavelength fits `rotations` times into the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    # High-frequency dims (ramp 0) keep their frequency; low-frequency ones are interpolated.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin for positions, computed per forward (cheap: one outer product shared by all layers).

    The frequencies are a plain fp32 tensor, not a buffer: nothing to load or save, and `.to(bf16)`
    on the model cannot round them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(cfg)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = (positions.float()[..., None] * self.inv_freq)[:, :, None]  # (B or 1, T, 1, rope/2): one for all heads
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (B, T, H, rope) by position. cos/sin: (B or 1, T, 1, rope/2), as RotaryEmbedding gives them.

    interleave=True: the dims are adjacent pairs (x0, x1), (x2, x3)... rotated as complex numbers, the
    layout of DeepSeek's checkpoints and official code; the output keeps that layout. False: the
    "rotate half" layout, pairs (x_i, x_{i+rope/2}).
    """
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
