"""GRPO's objective: group-relative advantages, the clipped surrogate (token ratios, or GSPO's sequence ratio)
with the k3 KL aggregated per loss type, and the training forward that gives every completion token its
log-probability (each prompt run once per group, its G completions attending to its latents). The formulas
are in grpo.py's docstring."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.rl.config import LOSS_TYPES, GRPOError
from nanoseek.rl.rollout import RolloutBatch


# ---- advantages and the loss ---------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): r minus its group's mean, divided by a std (DeepSeekMath §4.1.2).

    scale_rewards: "group" divides by each group's std, "batch" by the std of all P*G rewards, "none" not at
    all (Dr. GRPO). Groups whose rewards are all equal get exactly 0: they carry no signal."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise GRPOError(f"rewards must be (prompts, G >= 2), got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        adv = adv / (rewards.std() + eps)
    elif scale_rewards != "none":
        raise GRPOError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    flat = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return adv.masked_fill(flat, 0.0)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate (already divided by the minibatch normalizer)
    n_tokens: float  # tokens in the loss (this micro-batch)
    kl_sum: float  # Σ KL_t over those tokens (0 when β = 0)
    clip_low: float  # ratios with ρ < 1-ε and A < 0 (the clipped branch is active)
    clip_high: float  # ratios with ρ > 1+ε_high and A > 0
    n_ratios: float = 0.0  # importance ratios those counts are out of: tokens, or sequences for gspo


def gspo_token_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO-token's ratio (Zheng et al. 2025, arXiv 2507.18071), (N, T): every token carries the value of its
    sequence's length-normalized ratio s_i = exp((1/|y_i|) Σ_t log(π_θ/π_old)) and the gradient of its own
    log-prob, s_i,t = sg[s_i] · π_θ(y_i,t) / sg[π_θ(y_i,t)]. Averaged over the sequence's tokens this has
    exactly the gradient of GSPO's sequence-level objective (one advantage per sequence), and clipping s_i,t
    clips the whole sequence at once."""
    log_s = ((logps - old_logps) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # (N, 1)
    return torch.exp(log_s.detach() + logps - logps.detach())


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
) -> LossOutput:
    """The clipped surrogate plus k3 KL, aggregated per `loss_type` (grpo.py's docstring); gspo is grpo's
    per-sequence aggregation over GSPO-token's sequence ratio.

    logps, old_logps, ref_logps, mask: (N, T); advantages: (N,). `num_sequences` / `num_tokens` are the
    minibatch's counts when this call sees only a micro-batch of it, so that summed micro-batch losses
    equal the minibatch loss exactly (default: this call's own counts)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    A = advantages[:, None].to(logps.dtype)  # (N, 1): one advantage for every token of a completion
    ratio = gspo_token_ratio(logps, old_logps, mask) if loss_type == "gspo" else torch.exp(logps - old_logps)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - epsilon, 1 + eps_high) * A)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise GRPOError("beta > 0 needs the reference log-probs")
        log_r = ref_logps - logps  # log(π_ref / π_θ)
        kl = torch.exp(log_r) - log_r - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    total = (per_token * mask).sum(-1)  # (N,)
    if loss_type in ("grpo", "gspo"):
        loss = (total / mask.sum(-1).clamp(min=1)).sum() / (num_sequences or logps.shape[0])
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise GRPOError("loss_type dr_grpo needs max_completion_length (its constant normalizer)")
        loss = total.sum() / ((num_sequences or logps.shape[0]) * max_completion_length)
    elif loss_type == "dapo":
        loss = total.sum() / max(num_tokens if num_tokens is not None else float(mask.sum()), 1.0)
    else:
        raise GRPOError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    with torch.no_grad():
        on = mask > 0
        if loss_type == "gspo":  # one ratio per sequence in the loss: count sequences, not tokens
            ratio, on = ratio[:, :1], on.any(-1, keepdim=True)
        low = ((ratio < 1 - epsilon) & (A < 0) & on).sum()
        high = ((ratio > 1 + eps_high) & (A > 0) & on).sum()
        kl_sum = float((kl * mask).sum()) if kl is not None else 0.0
    return LossOutput(loss, float(mask.sum()), kl_sum, float(low), float(high), float(on.sum()))


# ---- the training forward: each prompt once per group -----------------------------------------------
class SharedPromptCache:
    """A `LatentCache` (model.py) for training: the first forward runs the P prompts and keeps their latents
    (with gradients); the second runs the N = P*G completions, each attending to its group's prompt
    latents plus its own earlier tokens. Exactly the full causal forward over prompt + completion. DSA layers
    (DeepSeek-V3.2) keep their indexer keys the same way (`update_index`), and select among the same keys."""

    absorb = False

    def __init__(self, prompt_lens: torch.Tensor, group_of: torch.Tensor, tp: int, tc: int):
        self.group_of = group_of
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.index_prefix: dict[int, torch.Tensor] = {}
        self.completing = False
        device = prompt_lens.device
        in_prompt = torch.arange(tp, device=device)[None] < prompt_lens[group_of][:, None]  # (N, Tp)
        causal = torch.ones(tc, tc, dtype=torch.bool, device=device).tril()  # (Tc, Tc)
        self.mask = torch.cat(
            (in_prompt[:, None, :].expand(-1, tc, -1), causal[None].expand(len(group_of), -1, -1)), dim=-1
        )[:, None]  # (N, 1, Tc, Tp+Tc)
        self.keep = self.mask  # stays boolean: the DSA layers' top-k selection reads it

    def update_index(self, layer_idx: int, keys: torch.Tensor):
        """A DSA layer's indexer keys (B, T, d), as `update` does the latents (its mask: boolean)."""
        if not self.completing:
            self.index_prefix[layer_idx] = keys  # (P, Tp, d)
            return keys, None
        return torch.cat((self.index_prefix[layer_idx].index_select(0, self.group_of), keys), dim=1), self.keep

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        if not self.completing:
            self.prefix[layer_idx] = (c_kv, k_pe)  # (P, Tp, r), (P, Tp, rope)
            return c_kv, k_pe, None  # None: plain causal attention among the prompt tokens
        if self.mask.dtype == torch.bool:
            # An additive 0 / -inf mask: SDPA's math path (MLA's q·k and v widths differ) takes it ~20% faster
            # than a boolean one. No row is fully masked: every completion token sees its prompt.
            self.mask = torch.zeros(self.mask.shape, dtype=c_kv.dtype, device=c_kv.device).masked_fill_(
                ~self.mask, float("-inf")
            )
        p_kv, p_pe = self.prefix[layer_idx]
        # index_select: a backward of index_add, several times faster on a CPU than indexing's index_put
        g = self.group_of
        return torch.cat((p_kv.index_select(0, g), c_kv), 1), torch.cat((p_pe.index_select(0, g), k_pe), 1), self.mask


def sequence_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(o_t | q, o_<t) of every completion token (N, Tc) under `model` at `temperature`, and the
    entropy of π at each of those positions if asked (no gradient). Padding positions hold garbage:
    use batch.mask."""
    h = _v4_states(model, batch) if model.config.model_type == "deepseek_v4" else _shared_prompt_states(model, batch)
    logits = model.lm_head(h).float()  # (N, Tc, V)
    if temperature != 1.0:
        logits = logits / temperature
    lse = logits.logsumexp(-1)  # (N, Tc)
    logps = logits.gather(-1, batch.completion_ids[..., None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():  # H = lse - Σ p·logit: one more pass over the vocabulary, not three
            entropy = lse - (logits.softmax(-1) * logits).sum(-1)
    return logps, entropy


def _shared_prompt_states(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """(N, Tc, D): the hidden state predicting each completion token, each prompt run once for its group."""
    group_of = batch.group_of.to(batch.completion_ids.device)
    tp, tc = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    cache = SharedPromptCache(batch.prompt_lens, group_of, tp, tc)
    h_prompt = model.hidden_states(batch.prompt_ids, None, cache)  # (P, Tp, D)
    cache.completing = True
    positions = batch.prompt_lens[group_of][:, None] + torch.arange(tc, device=group_of.device)  # (N, Tc)
    h_comp = model.hidden_states(batch.completion_ids, positions, cache)  # (N, Tc, D)
    last_prompt = h_prompt[group_of, batch.prompt_lens[group_of] - 1]  # (N, D): predicts the first token
    return torch.cat((last_prompt[:, None], h_comp[:, :-1]), dim=1)  # (N, Tc, D): state predicting token t


def _v4_states(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """`_shared_prompt_states` for DeepSeek-V4, whose compressed branches pool fixed windows of positions, so a
    prompt's keys cannot be shared as a prefix: each row runs its whole prompt + completion (right-padded)."""
    ids, dev = batch.completion_ids, batch.completion_ids.device
    group_of = batch.group_of.to(dev)
    tp, tc = batch.prompt_ids.shape[1], ids.shape[1]
    lens = batch.prompt_lens.to(dev)[group_of][:, None]  # (N, 1)
    j = torch.arange(tp + tc, device=dev)[None]  # (1, Tp+Tc)
    prompt = batch.prompt_ids[group_of].gather(1, j.clamp(max=tp - 1).expand(len(ids), -1))
    completion = ids.gather(1, (j - lens).clamp(0, tc - 1))
    h = model.hidden_states(torch.where(j < lens, prompt, completion))  # (N, Tp+Tc, D)
    at = lens - 1 + torch.arange(tc, device=dev)  # (N, Tc): the position before each completion token
    return h.gather(1, at[..., None].expand(-1, -1, h.shape[-1]))
