"""DeepSeekMoE: fine-grained routed experts plus shared experts, and its load balancing.

- `Gate` scores experts (softmax for V2, sigmoid for V3) and picks the top-k: "greedy",
  "group_limited_greedy" (V2) or "noaux_tc" (V3: groups ranked by their top-2 biased scores, the fp32
  correction bias used for selection only).
- `Experts` holds the routed experts stacked as (E, out, in) tensors and runs the tokens of all
  experts at once with `torch._grouped_mm`, or loops over only the experts that received tokens.
- `MoE` adds the always-on shared experts, counts tokens per expert for the trainer and, with
  `aux_loss_alpha > 0`, computes the sequence-wise balance loss (DeepSeek-V3 eq. 17-20).
- `update_bias` is DeepSeek-V3's auxiliary-loss-free balancing (§2.1.2): once per optimizer step,
  b_i += γ · sign(mean load − load_i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FP32Buffers(nn.Module):
    """A module whose named buffers stay float32 through `.to(dtype)`, `.half()` or `to_empty()`:
    only their device follows the parameters. Like transformers' _keep_in_fp32_modules."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self.fp32_buffers if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        device = next(self.parameters()).device
        for n, buf in kept.items():
            self._buffers[n] = (
                torch.zeros(buf.shape, device=device) if buf.is_meta else buf.to(device=device, dtype=torch.float32)
            )
        return self


class Gate(FP32Buffers):
    """Router: token -> (weights (N, k), expert indices (N, k), scores (N, E)). Scores in fp32."""

    fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.topk_method, self.scoring_func = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if self.topk_method == "noaux_tc":
            # Kept in fp32 whatever the model dtype: γ-sized updates vanish in bf16.
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            choice = self._limit_to_groups(choice)
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)  # unbiased scores: the bias only steers selection
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the topk_group best of n_group expert groups; the rest get -inf (never chosen)."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # V3: sum of top-2 in group
        else:
            group_scores = grouped.amax(dim=-1)  # V2 group_limited_greedy: best expert in group
        keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~group_mask[..., None], float("-inf")).view_as(choice)


def grouped_mm_ok(*dims: int) -> bool:
    """torch._grouped_mm exists here and the strides meet its 16-byte alignment."""
    return hasattr(torch, "_grouped_mm") and all(d % 8 == 0 for d in dims)


class Experts(nn.Module):
    """The routed experts, stacked: gate_proj/up_proj (E, I, D), down_proj (E, D, I)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.use_grouped_mm = grouped_mm_ok(dim, inter_dim)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (M, D) tokens sorted by expert; counts: (E,) tokens per expert. Returns (M, D)."""
        if self.use_grouped_mm and x.dtype == self.gate_proj.dtype:
            if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
                return _grouped_uncompiled(self, x, counts)
            return self._grouped(x, counts)
        return self._loop(x, counts)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)
        gate = torch._grouped_mm(x, self.gate_proj.transpose(-2, -1), offs=offs)
        up = torch._grouped_mm(x, self.up_proj.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offs)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on its tokens x (n, D) -> (n, D): the unit the loop and the decode path run."""
        return _expert(x, self.gate_proj, self.up_proj, self.down_proj, e)

    def few_tokens(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x (N, D) with routing weights and indices (N, k) -> the weighted sum of each token's experts (N, D).
        Inference only (no autograd through it)."""
        # The custom op when compiling (a graph cannot read the routing); eagerly the plain loop, which skips
        # the dispatcher's cost of a custom op (5-8% of an fp32 decode step here).
        run = experts_few if torch.compiler.is_compiling() else _experts_few
        return run(x, weights, indices, self.gate_proj, self.up_proj, self.down_proj)

    @torch.compiler.disable  # a loop over data-dependent counts: compiled, it would specialize on every count
    def _loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Only experts that received tokens do any work.
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            outs.append(self.one(e, x[start : start + n]))
            start += n
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


def _experts_few(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """The routed experts of a few tokens (a decode step): token n runs its k experts indices[n] directly,
    weighted by weights[n]. Registered below as the custom op `experts_few`, which a compiled block calls
    without a graph break (the loop reads the routing on the host, which a graph cannot)."""
    y = torch.zeros_like(x)
    for n, (ws, es) in enumerate(zip(weights.tolist(), indices.tolist())):
        xn = x[n : n + 1]
        for w, e in zip(ws, es):
            y[n : n + 1].add_(_expert(xn, gate_proj, up_proj, down_proj, e), alpha=w)
    return y


def _expert(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e of the stacks on its tokens x (n, D): down(silu(gate x) * up x), in x's dtype."""
    h = F.silu(F.linear(x, gate[e].to(x.dtype))) * F.linear(x, up[e].to(x.dtype))
    return F.linear(h, down[e].to(x.dtype))


experts_few = torch.library.custom_op("nanoseek::experts_few", mutates_args=())(_experts_few)


@experts_few.register_fake
def _(x, weights, indices, gate_proj, up_proj, down_proj):
    return torch.empty_like(x)


# torch.compile traces _grouped_mm with a bf16-only meta kernel; other dtypes run it eagerly (a graph break).
_grouped_uncompiled = torch.compiler.disable(Experts._grouped)


class MoE(FP32Buffers):
    """DeepSeekMoE layer (DeepSeek-V3 eq. 12-16): shared experts + weighted top-k routed experts."""

    fp32_buffers = ("tokens_per_expert",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.aux_loss_alpha = cfg.aux_loss_alpha if cfg.seq_aux else 0.0
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts > 0 else None
        )
        # Tokens routed to each expert since the last `update_bias` (training forwards only).
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def reset_buffers(self) -> None:
        self.tokens_per_expert.zero_()
        if self.gate.e_score_correction_bias is not None:
            self.gate.e_score_correction_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        return self.combine(flat, *self.gate(flat), x.shape)

    def combine(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor, shape: torch.Size
    ) -> torch.Tensor:
        """Routed experts weighted by the router's choice plus the shared experts. x: (N, D); weights, indices:
        (N, k); scores: (N, E); returns the layer's output in `shape`."""
        few = x.shape[0] * self.top_k <= self.n_experts
        if few and not (self.training or torch.is_grad_enabled()):
            if x.device.type != "cpu" and isinstance(self.experts, Experts):
                return self._gathered(x, weights, indices).view(shape)
            return self._few_tokens(x, weights, indices).view(shape)
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
        # Sort the N*k (token, expert) pairs by expert so each expert sees one contiguous slice.
        order = indices.flatten().argsort(stable=True)
        # index_select, not x[...]: its backward is an index_add, several times faster on a CPU than indexing's
        # accumulating index_put
        routed = self.experts(x.index_select(0, order // self.top_k), counts)
        unsorted = torch.empty_like(routed).index_copy_(0, order, routed).view(-1, self.top_k, shape[-1])
        y = (unsorted * weights.to(x.dtype)[..., None]).sum(dim=1)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += counts.float()
            self.aux_loss = self._sequence_balance_loss(scores, indices, shape) if self.aux_loss_alpha > 0 else None
        return y.view(shape)

    def _few_tokens(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Inference on a few tokens (a decode step): each token runs its k experts directly, no sort, no
        grouped matmul over mostly empty groups (per-operator overhead is what a decode step pays for)."""
        y = self.experts.few_tokens(x, weights, indices)
        return y + self.shared_experts(x) if self.shared_experts is not None else y

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Inference on a few tokens on an accelerator: each token's k experts gathered into one batched
        product. No host sync (nothing reads the routing on the host), so a compiled step has no break here;
        the gather copies k expert matrices per token, which only a few tokens can afford."""
        ex = self.experts
        xs = x[:, None, :, None]  # (N, 1, D, 1)
        h = F.silu((ex.gate_proj[indices] @ xs)[..., 0]) * (ex.up_proj[indices] @ xs)[..., 0]  # (N, k, I)
        routed = (ex.down_proj[indices] @ h[..., None])[..., 0]  # (N, k, D)
        y = (routed * weights.to(x.dtype)[..., None]).sum(dim=1)
        return y + self.shared_experts(x) if self.shared_experts is not None else y

    def _sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """α Σ_i f_i P_i per sequence, averaged over the batch (DeepSeek-V3 eq. 17-20)."""
        B, T = (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0])
        probs = scores / scores.sum(dim=-1, keepdim=True)  # s'_{i,t}: normalized affinities
        P = probs.view(B, T, -1).mean(dim=1)  # (B, E)
        hits = torch.zeros(B, self.n_experts, device=scores.device).scatter_add_(
            1, indices.view(B, -1), torch.ones(B, T * self.top_k, device=scores.device)
        )
        f = hits * self.n_experts / (self.top_k * T)  # (B, E)
        return self.aux_loss_alpha * (f * P).sum(dim=-1).mean()


def expert_load_imbalance(moe: MoE) -> float:
    """max/mean of the tokens routed per expert since the last reset (1.0 is perfect balance)."""
    load = moe.tokens_per_expert
    return float(load.max() / load.mean().clamp_min(1e-9))


@torch.no_grad()
def update_bias(model: nn.Module, gamma: float = 1e-3) -> list[float]:
    """Auxiliary-loss-free balancing step (DeepSeek-V3 §2.1.2), once per optimizer step.

    For each MoE layer with a correction bias: b_i += γ · sign(mean load − load_i), from the token counts
    accumulated since the last call; then the counts reset. Returns each layer's max/mean load before
    the update. Under torch.distributed the counts are summed over ranks first, so every rank applies
    the same update.
    """
    imbalance = []
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        load = moe.tokens_per_expert
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        imbalance.append(expert_load_imbalance(moe))
        bias = moe.gate.e_score_correction_bias
        if bias is not None and gamma > 0 and load.sum() > 0:
            bias += gamma * torch.sign(load.mean() - load)
        load.zero_()
    return imbalance
