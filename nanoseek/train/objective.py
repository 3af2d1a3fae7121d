"""What one training step computes and what it costs: the pretraining objective (`PretrainObjective`), the
held-out loss (`heldout_loss`), and the FLOPs accounting behind MFU (`training_flops_per_token`, `peak_flops`).

The objective is the same module for the trainer and `nanoseek bench train`; the held-out loss runs it with
the next-token target only.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.stats import model_stats
from nanoseek.model.transformer import Transformer, build_model
from nanoseek.model.v4 import DeepseekV4
from nanoseek.model.v4_config import CSA, SLIDING
from nanoseek.train import parallel
from nanoseek.train.data import IGNORE_INDEX, PackedBatches


# ---- the objective -------------------------------------------------------------------------------
def dsa_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of a model whose lightning indexer trains by its KL: DeepSeek-V3.2's DSA layers, V4's CSA ones."""
    return model.dsa_layers() if hasattr(model, "dsa_layers") else []


class PretrainObjective(nn.Module):
    """Forward of one micro-batch: summed next-token and MTP cross-entropies, and the balance loss; with
    `indexer_loss=True` also the lightning indexers' KL (DeepSeek-V3.2 DSA layers, 0 for other models).

    A module of its own so that DDP wraps the whole training forward (the MTP heads included), and every
    loss that reaches a parameter is one of its outputs.

    DeepSeek-V4 (`DeepseekV4`): the head reads the collapsed mHC streams and MTP depth 1 the uncollapsed ones
    (`model.streams`), as V4's own code runs them; V4 takes no attention mask (mask must be None)."""

    def __init__(self, model: Transformer | DeepseekV4, mtp_depth: int, indexer_loss: bool = False):
        super().__init__()
        self.model, self.mtp_depth, self.with_indexer_loss = model, mtp_depth, indexer_loss

    def forward(
        self, inputs: torch.Tensor, targets: list[torch.Tensor], mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """inputs (B, T); targets[k] (B, T-k) for k = 0..mtp_depth. Returns (cross-entropy sums (1+D,), aux
        loss), and the summed indexer KL (training forwards of DSA layers with `indexer_kl` on) as a third."""
        model = self.model
        for layer in dsa_layers(model):
            layer.indexer_loss = None  # an MTP block that does not run this time keeps no stale loss
        if isinstance(model, DeepseekV4):
            if mask is not None:
                raise ValueError("DeepSeek-V4 trains without a document mask (doc_mask=False)")
            streams = model.streams(inputs)
            h = model.norm(model.hc_head(streams))
            logits = [model.lm_head(h)]
            if self.mtp_depth:
                logits += model.mtp_logits(streams, inputs, depth=self.mtp_depth)
        else:
            h = model.hidden_states(inputs, mask=mask)
            logits = [model.lm_head(h)]
            if self.mtp_depth:
                logits += model.mtp_logits(h, inputs, mask, depth=self.mtp_depth)
        sums = torch.stack(
            [
                F.cross_entropy(lg.float().flatten(0, 1), tg.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
                for lg, tg in zip(logits, targets)
            ]
        )
        aux = self.model.aux_loss()
        aux = aux if torch.is_tensor(aux) else h.new_zeros(())
        if not self.with_indexer_loss:
            return sums, aux
        kl = model.indexer_loss() if dsa_layers(model) else 0.0
        return sums, aux, kl if torch.is_tensor(kl) else h.new_zeros((), dtype=torch.float32)


@torch.no_grad()
def heldout_loss(
    forward: nn.Module,
    batches: PackedBatches,
    n_sequences: int,
    batch_size: int,
    device: torch.device,
    autocast=contextlib.nullcontext(),
    doc_mask: bool = True,
) -> float:
    """Mean next-token cross-entropy over the first `n_sequences` windows of the held-out split: the same
    windows, so the same number, whatever the batch size and world size. Rank r takes windows r, r+W, ...;
    every rank runs the same number of forwards (FSDP and expert parallelism communicate inside them), a
    rank out of windows with one dummy window that is not counted."""
    rank, world = parallel.rank(), parallel.world_size()
    n = min(n_sequences, batches.n_windows)
    mine = list(range(rank, n, world))
    forward.train(False)
    total = torch.zeros(2, device=device)
    try:
        for f in range(math.ceil(math.ceil(n / world) / batch_size)):
            rows = mine[f * batch_size : (f + 1) * batch_size]
            mb = batches.take(rows or [0]).to(device)
            tgt = mb.targets(0) if doc_mask else mb.tokens[:, 1:]
            with autocast:
                sums = forward(mb.inputs, [tgt], mb.attention_mask() if doc_mask else None)[0]
            if rows:
                total += torch.stack((sums[0].float(), (tgt != IGNORE_INDEX).sum().float()))
    finally:
        forward.train(True)
    parallel.all_reduce_sum(total)
    return float(total[0] / total[1].clamp_min(1))


# ---- FLOPs ---------------------------------------------------------------------------------------
def training_flops_per_token(cfg: ModelConfig, seq_len: int, mtp_depth: int = 0) -> float:
    """Model FLOPs of one trained token: 6 per activated parameter (forward 2, backward 4) plus causal
    attention, 6 · H · (d_qk + d_v) · (T+1)/2 per layer (PaLM appendix B, halved for the causal mask).
    Activated parameters as DeepSeek counts them (`stats.model_stats`); each MTP depth adds its block
    (shared and top-k experts only) and another pass through the output head. DeepSeek-V3.2 (sparse
    stage): a query attends to at most index_topk keys, and the lightning indexer scores every earlier one,
    6 · index_n_heads · index_head_dim · (T+1)/2 per layer (its projections are parameters, counted above).
    DeepSeek-V4 (`v4_attention_flops_per_token`): per layer its window, plus the compressed entries it attends
    (CSA: the indexer's top-k, scored over every visible entry; HCA: all visible)."""
    s = model_stats(cfg)
    params = s.active
    if mtp_depth:
        with torch.device("meta"):
            block = build_model(cfg.replace(num_nextn_predict_layers=1)).mtp[0]
        mtp = sum(p.numel() for p in block.parameters())
        if hasattr(block.mlp, "experts"):
            routed = sum(p.numel() for p in block.mlp.experts.parameters())
            mtp -= routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
        params += mtp_depth * (mtp + cfg.vocab_size * cfg.hidden_size)
    if cfg.v4 is not None:
        return 6 * params + v4_attention_flops_per_token(cfg, seq_len, mtp_depth)
    layers = cfg.num_hidden_layers + mtp_depth
    causal = (seq_len + 1) / 2  # keys per query, on average
    keys, indexer = causal, 0.0
    if cfg.dsa:
        k = min(cfg.index_topk, seq_len)  # queries past position k attend to k keys
        keys = (k * (k + 1) / 2 + (seq_len - k) * k) / seq_len
        indexer = 6 * cfg.index_n_heads * cfg.index_head_dim * causal
    attention = 6 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys
    return 6 * params + (attention + indexer) * layers


def v4_attention_flops_per_token(cfg: ModelConfig, seq_len: int, mtp_depth: int = 0) -> float:
    """Training FLOPs per token of DeepSeek-V4's attention scores and mixing (6 · H · 2·head_dim per key, K = V),
    averaged over the positions of a seq_len window: the sliding window's keys, plus a CSA layer's top-k of
    its visible compressed entries (and its indexer's 6 · index heads · index_head_dim over every visible one),
    or all of an HCA layer's. MTP layers are sliding-window only."""
    v4, T = cfg.v4, seq_len
    mean = lambda f: sum(f(t) for t in range(T)) / T  # noqa: E731  (average over query positions t)
    per_key = 6 * cfg.num_attention_heads * 2 * v4.head_dim
    window = mean(lambda t: min(t + 1, v4.sliding_window))
    total = 0.0
    for i in range(cfg.num_hidden_layers + mtp_depth):
        kind = v4.attention_type(i)
        keys, index = window, 0.0
        if kind != SLIDING:
            seen = lambda t, r=v4.rate(kind): (t + 1) // r  # noqa: E731
            if kind == CSA:
                keys += mean(lambda t: min(seen(t), cfg.index_topk))
                index = 6 * cfg.index_n_heads * cfg.index_head_dim * mean(seen)
            else:
                keys += mean(seen)
        total += per_key * keys + index
    return total


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Nominal peak FLOP/s of one device. CPU: threads x FLOPs per cycle x base clock, where AVX2 cores with
    two 256-bit FMA pipes do 32 fp32 FLOPs a cycle (64 with AVX-512). CUDA: dense bf16/tf32 of known cards."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {
            "H100": 989e12,
            "H200": 989e12,
            "H800": 989e12,
            "A100": 312e12,
            "A800": 312e12,
            "L40S": 362e12,
            "4090": 165e12,
            "L4": 121e12,
        }
        for key, bf16 in table.items():
            if key in name:
                return bf16 if dtype == torch.bfloat16 else bf16 / 2
        return None
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    if not mhz:
        return None
    per_cycle = 64 if " avx512f" in flags else 32 if (" avx2" in flags and " fma" in flags) else 16
    return torch.get_num_threads() * per_cycle * max(mhz) * 1e6
