"""GRPO: Group Relative Policy Optimization (DeepSeekMath §4.1), the optimizer of DeepSeek-R1-Zero.

    result = train_grpo(model, tokenizer, get_task("arithmetic"), GRPOConfig(max_steps=200), "runs/grpo")
    nanoseek grpo --model ckpt/ --task arithmetic --out runs/grpo [--loss-type dr_grpo ...] [--resume]

One step: draw `prompts_per_step` problems from the task's train split; sample G = `num_generations`
completions of each through the engine (the G samples share one prefill); score them with rule rewards;
give every token of completion i the advantage A_i = (r_i - mean(r_group)) / std(r_group); then take
`num_iterations` (μ) passes over the batch, split into `num_minibatches`, minimizing per token

    ℓ_t = -min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε_high) A) + β KL_t,    ρ_t = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)
    KL_t = π_ref/π_θ - log(π_ref/π_θ) - 1                             (k3 estimator, in the loss, not the reward)

aggregated over tokens by `loss_type`:
    grpo     (1/N) Σ_i (1/|o_i|) Σ_t ℓ_it      per-sequence length-normalized mean (DeepSeekMath eq. 3)
    dr_grpo  (1/(N·L)) Σ_i Σ_t ℓ_it            constant normalizer, L = max_completion_length (Dr. GRPO)
    dapo     (1/Σ_i |o_i|) Σ_i Σ_t ℓ_it        token-level mean over the minibatch (DAPO eq. 8)

Where this departs from the papers (each also how TRL's GRPOTrainer behaves, unless noted):
- std is the unbiased one plus 1e-4, as TRL; the papers do not say. A group whose rewards are all equal
  gets advantage exactly 0 (computing r - mean in floating point would leave ~1e-9 residues).
- `scale_rewards`: "group" is the paper; "batch" divides by the batch's std (Lite PPO); "none" is
  Dr. GRPO's. "auto" (default) means "none" with loss_type dr_grpo and "group" otherwise.
- β defaults to 0, TRL's and DAPO's choice (R1-Zero used 0.001); with β = 0 no reference model exists.
  The reference is replaced by the policy every `ref_model_sync_steps` steps (R1: every 400), a hard copy.
- Sampling at temperature T, the log-probabilities are those of logits / T, so ρ compares the policies
  that actually sampled (TRL does the same).
- π_old: with one pass over one minibatch the ratio is 1 by construction and π_old is the detached policy
  itself (no extra forward); otherwise one no-grad forward before the first update. The engine's own
  log-probs are used only when asked (`old_logprobs="engine"`, temperature 1): they come from the absorbed
  decode path and agree with the training forward to ~1e-5 (checked in tests, logged as `logprob_gap`).
- Dynamic sampling (DAPO §3.2) drops groups with equal rewards and, with `max_resample_rounds > 0`,
  samples more prompts (only as many as are missing) at most that many times; a step with no
  informative group skips the update.
- The training forward runs each prompt once per group and the G completions attend to its latents
  (our own packing; exact, a test holds it to the plain forward): prompts are not recomputed G times.
- MoE: the sequence-wise balance loss is not added; the router's correction bias moves only if
  `router_bias_update_speed` > 0 (default 0: routing is frozen during RL).
- Optimizer: AdamW (β2 = 0.99, no weight decay), gradient norm clipped to `max_grad_norm`, linear warmup.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoseek.engine.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.model.moe import update_bias
from nanoseek.engine.sampling import SamplingParams
from nanoseek.checkpoint.hf import save_pretrained

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("auto", "group", "batch", "none")
OLD_LOGPROBS = ("auto", "forward", "engine")


class GRPOError(NanoseekError):
    """A GRPO configuration or run that cannot proceed; the message names the field or file."""


@dataclass
class GRPOConfig:
    """Every knob of a GRPO run. Names follow TRL's GRPOConfig where one exists."""

    # ---- the batch of rollouts (one GRPO step) ----
    num_generations: int = 8  # G: completions sampled per prompt
    prompts_per_step: int = 16  # prompts per step; the batch holds G x this completions
    max_completion_length: int = 256  # tokens per completion, EOS included
    temperature: float = 1.0  # rollout sampling temperature (R1-Zero: 1)
    top_p: float = 1.0
    ignore_eos: bool = False  # every completion runs to max_completion_length (benchmarks)
    # ---- objective ----
    loss_type: str = "dapo"  # grpo | dr_grpo | dapo (see the module docstring)
    scale_rewards: str = "auto"  # group | batch | none | auto (none for dr_grpo, else group)
    epsilon: float = 0.2  # ε: ratio clipped to [1 - ε, 1 + ε_high]
    epsilon_high: float | None = None  # ε_high (DAPO's clip-higher, 0.28); None = ε
    beta: float = 0.0  # β: weight of the k3 KL to the reference; 0 loads no reference
    ref_model_sync_steps: int = 0  # replace the reference by the policy every this many steps; 0 = never
    mask_truncated_completions: bool = False  # DAPO overlong filtering: truncated completions get no loss
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    max_resample_rounds: int = 0  # with dynamic_sampling: extra sampling rounds to refill the batch
    reward_weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    # ---- optimization ----
    learning_rate: float = 1e-5
    warmup_steps: int = 0  # linear warmup, in GRPO steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_iterations: int = 1  # μ: passes over each batch of rollouts
    num_minibatches: int = 1  # optimizer steps per pass (the batch is split by whole groups)
    micro_batch_size: int = 64  # completions per forward/backward (gradient accumulation; memory only)
    old_logprobs: str = "auto"  # auto | forward | engine: where π_old comes from when μ·minibatches > 1
    router_bias_update_speed: float = 0.0  # γ of DeepSeek-V3's aux-loss-free balancing during RL
    # ---- run ----
    max_steps: int = 100
    seed: int = 0
    save_steps: int = 50  # checkpoint every this many steps (and at the end); 0 = only at the end
    save_total_limit: int = 2  # checkpoints kept
    eval_steps: int = 0  # held-out pass@1 every this many steps; 0 = never
    eval_problems: int = 64

    def __post_init__(self) -> None:
        self.validate()

    @property
    def reward_scaling(self) -> str:
        """scale_rewards with "auto" resolved: none for dr_grpo (Dr. GRPO drops the std), else group."""
        if self.scale_rewards != "auto":
            return self.scale_rewards
        return "none" if self.loss_type == "dr_grpo" else "group"

    @property
    def clip_high(self) -> float:
        """ε_high, the upper clip (epsilon_high, or epsilon when unset)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise GRPOError(f"GRPOConfig: {msg}")

        need(self.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        need(self.scale_rewards in SCALE_REWARDS, f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, "
                                                  f"got {self.scale_rewards!r}")
        need(self.old_logprobs in OLD_LOGPROBS, f"old_logprobs must be one of {', '.join(OLD_LOGPROBS)}")
        need(self.num_generations >= 2, f"num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        for name in ("prompts_per_step", "max_completion_length", "num_iterations", "num_minibatches",
                     "micro_batch_size", "max_steps", "eval_problems"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"{name} must be a positive integer")
        for name in ("ref_model_sync_steps", "max_resample_rounds", "warmup_steps", "save_steps", "eval_steps"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0")
        need(self.save_total_limit >= 1, "save_total_limit must be >= 1")
        need(self.num_minibatches <= self.prompts_per_step, "num_minibatches cannot exceed prompts_per_step "
                                                            "(minibatches hold whole groups)")
        need(self.temperature > 0, f"temperature must be > 0 for RL sampling, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.epsilon < 1 and self.clip_high >= 0, "epsilon must be in [0, 1) and epsilon_high >= 0")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.learning_rate > 0, "learning_rate must be > 0")
        need(self.old_logprobs != "engine" or (self.temperature == 1.0 and self.top_p == 1.0),
             "old_logprobs='engine' needs temperature 1 and top_p 1 (the engine reports untempered log-probs)")
        need(isinstance(self.reward_weights, dict) and set(self.reward_weights) <= {"accuracy", "format"}
             and all(isinstance(v, (int, float)) for v in self.reward_weights.values()),
             f"reward_weights must map accuracy/format to numbers, got {self.reward_weights!r}")

    @property
    def batch_size(self) -> int:
        return self.num_generations * self.prompts_per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- rollouts and the packed batch ------------------------------------------------------------------
@dataclass
class Rollout:
    """One sampled completion of one prompt, with its rewards and advantage."""

    problem: Any  # the task's Problem
    group: int  # index of its prompt in the step
    prompt_ids: list[int]
    completion_ids: list[int]  # EOS included when the completion stopped
    text: str
    finish_reason: str  # "stop" or "length" (truncated)
    sample_logprobs: list[float] | None = None  # the engine's log π(o_t) of each sampled token
    reward: float = 0.0
    accuracy: float = 0.0
    format: float = 0.0
    advantage: float = 0.0

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class Batch:
    """Rollouts as tensors, groups contiguous: rows g*G .. g*G+G-1 are the samples of prompt g."""

    prompt_ids: torch.Tensor  # (P, Tp) right-padded
    prompt_lens: torch.Tensor  # (P,)
    completion_ids: torch.Tensor  # (N, Tc) right-padded, N = P*G
    lengths: torch.Tensor  # (N,) completion tokens
    mask: torch.Tensor  # (N, Tc) float: 1 on the tokens that enter the loss
    advantages: torch.Tensor  # (N,)
    group_size: int
    sample_logps: torch.Tensor | None = None  # (N, Tc) from the engine
    old_logps: torch.Tensor | None = None  # (N, Tc) π_old
    ref_logps: torch.Tensor | None = None  # (N, Tc) π_ref

    @property
    def n_groups(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def group_of(self) -> torch.Tensor:
        return torch.arange(self.completion_ids.shape[0]) // self.group_size  # (N,)

    @property
    def token_mask(self) -> torch.Tensor:
        """(N, Tc) bool: real completion tokens (not padding), in the loss or not."""
        return torch.arange(self.completion_ids.shape[1], device=self.lengths.device)[None] < self.lengths[:, None]

    def to(self, device: torch.device) -> Batch:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def rows(self, groups: Sequence[int]) -> torch.Tensor:
        """Row indices of the completions of `groups`, group by group."""
        g = torch.as_tensor(list(groups), dtype=torch.long)
        return (g[:, None] * self.group_size + torch.arange(self.group_size)).flatten()

    def select(self, groups: Sequence[int]) -> Batch:
        """The sub-batch of whole groups, padding trimmed to its own longest prompt and completion."""
        g = torch.as_tensor(list(groups), dtype=torch.long)
        rows = self.rows(groups)
        tp, tc = int(self.prompt_lens[g].max()), max(int(self.lengths[rows].max()), 1)

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows, :tc]

        return Batch(self.prompt_ids[g, :tp], self.prompt_lens[g], self.completion_ids[rows, :tc], self.lengths[rows],
                     self.mask[rows, :tc], self.advantages[rows], self.group_size, cut(self.sample_logps),
                     cut(self.old_logps), cut(self.ref_logps))

    @classmethod
    def from_rollouts(cls, rollouts: list[Rollout], group_size: int, mask_truncated: bool = False,
                      pad_id: int = 0) -> Batch:
        groups = rollouts[::group_size]
        prompts = [r.prompt_ids for r in groups]
        tp, tc = max(map(len, prompts)), max(max(len(r.completion_ids) for r in rollouts), 1)
        prompt_ids = torch.full((len(prompts), tp), pad_id, dtype=torch.long)
        completion_ids = torch.full((len(rollouts), tc), pad_id, dtype=torch.long)
        sample = torch.zeros(len(rollouts), tc)
        for i, p in enumerate(prompts):
            prompt_ids[i, : len(p)] = torch.tensor(p)
        for i, r in enumerate(rollouts):
            completion_ids[i, : len(r.completion_ids)] = torch.tensor(r.completion_ids, dtype=torch.long)
            if r.sample_logprobs is not None:
                sample[i, : len(r.sample_logprobs)] = torch.tensor(r.sample_logprobs)
        lengths = torch.tensor([len(r.completion_ids) for r in rollouts])
        mask = (torch.arange(tc)[None] < lengths[:, None]).float()
        if mask_truncated:
            mask *= torch.tensor([0.0 if r.truncated else 1.0 for r in rollouts])[:, None]
        has_sample = all(r.sample_logprobs is not None for r in rollouts)
        return cls(prompt_ids, torch.tensor([len(p) for p in prompts]), completion_ids, lengths, mask,
                   torch.tensor([r.advantage for r in rollouts], dtype=torch.float32), group_size,
                   sample if has_sample else None)


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
    clip_low: float  # tokens with ρ < 1-ε and A < 0 (the clipped branch is active)
    clip_high: float  # tokens with ρ > 1+ε_high and A > 0


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              ref_logps: torch.Tensor | None = None, max_completion_length: int | None = None,
              num_sequences: int | None = None, num_tokens: float | None = None) -> LossOutput:
    """The clipped surrogate plus k3 KL, aggregated per `loss_type` (module docstring).

    logps, old_logps, ref_logps, mask: (N, T); advantages: (N,). `num_sequences` / `num_tokens` are the
    minibatch's counts when this call sees only a micro-batch of it, so that summed micro-batch losses
    equal the minibatch loss exactly (default: this call's own counts)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    A = advantages[:, None].to(logps.dtype)  # (N, 1): one advantage for every token of a completion
    ratio = torch.exp(logps - old_logps)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - epsilon, 1 + eps_high) * A)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise GRPOError("beta > 0 needs the reference log-probs")
        log_r = ref_logps - logps  # log(π_ref / π_θ)
        kl = torch.exp(log_r) - log_r - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    total = (per_token * mask).sum(-1)  # (N,)
    if loss_type == "grpo":
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
        low = ((ratio < 1 - epsilon) & (A < 0) & on).sum()
        high = ((ratio > 1 + eps_high) & (A > 0) & on).sum()
        kl_sum = float((kl * mask).sum()) if kl is not None else 0.0
    return LossOutput(loss, float(mask.sum()), kl_sum, float(low), float(high))


# ---- the training forward: each prompt once per group -----------------------------------------------
class _SharedPromptCache:
    """A `LatentCache` (model.py) for training: the first forward runs the P prompts and keeps their latents
    (with gradients); the second runs the N = P*G completions, each attending to its group's prompt
    latents plus its own earlier tokens. Exactly the full causal forward over prompt + completion."""

    absorb = False

    def __init__(self, prompt_lens: torch.Tensor, group_of: torch.Tensor, tp: int, tc: int):
        self.group_of = group_of
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.completing = False
        device = prompt_lens.device
        in_prompt = torch.arange(tp, device=device)[None] < prompt_lens[group_of][:, None]  # (N, Tp)
        causal = torch.ones(tc, tc, dtype=torch.bool, device=device).tril()  # (Tc, Tc)
        self.mask = torch.cat((in_prompt[:, None, :].expand(-1, tc, -1),
                               causal[None].expand(len(group_of), -1, -1)), dim=-1)[:, None]  # (N, 1, Tc, Tp+Tc)

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        if not self.completing:
            self.prefix[layer_idx] = (c_kv, k_pe)  # (P, Tp, r), (P, Tp, rope)
            return c_kv, k_pe, None  # None: plain causal attention among the prompt tokens
        if self.mask.dtype == torch.bool:
            # An additive 0 / -inf mask: SDPA's math path (MLA's q·k and v widths differ) takes it ~20% faster
            # than a boolean one. No row is fully masked: every completion token sees its prompt.
            self.mask = torch.zeros(self.mask.shape, dtype=c_kv.dtype, device=c_kv.device).masked_fill_(
                ~self.mask, float("-inf"))
        p_kv, p_pe = self.prefix[layer_idx]
        return (torch.cat((p_kv[self.group_of], c_kv), dim=1), torch.cat((p_pe[self.group_of], k_pe), dim=1),
                self.mask)


def sequence_logprobs(model: torch.nn.Module, batch: Batch, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(o_t | q, o_<t) of every completion token (N, Tc) under `model` at `temperature`, and the
    entropy of π at each of those positions if asked (no gradient). Padding positions hold garbage:
    use batch.mask."""
    group_of = batch.group_of.to(batch.completion_ids.device)
    (P, tp), (N, tc) = batch.prompt_ids.shape, batch.completion_ids.shape
    cache = _SharedPromptCache(batch.prompt_lens, group_of, tp, tc)
    h_prompt = model.hidden_states(batch.prompt_ids, None, cache)  # (P, Tp, D)
    cache.completing = True
    positions = batch.prompt_lens[group_of][:, None] + torch.arange(tc, device=group_of.device)  # (N, Tc)
    h_comp = model.hidden_states(batch.completion_ids, positions, cache)  # (N, Tc, D)
    last_prompt = h_prompt[group_of, batch.prompt_lens[group_of] - 1]  # (N, D): predicts the first token
    h = torch.cat((last_prompt[:, None], h_comp[:, :-1]), dim=1)  # (N, Tc, D): state predicting token t
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


# ---- the loop ---------------------------------------------------------------------------------------
RewardFn = Callable[[list[Any], list[str]], list[Any]]  # (problems, completions) -> [.total, .accuracy, .format]


@dataclass
class GRPOResult:
    steps: int  # the step the run ended at
    history: list[dict[str, float]]  # the metrics of every step this call ran
    final: dict[str, float]  # the last step's metrics
    run_dir: Path | None = None
    checkpoint: Path | None = None  # the last checkpoint written
    final_model_dir: Path | None = None  # HF-format model + tokenizer after the last step


def is_timing_metric(key: str) -> bool:
    """Metrics that depend on wall-clock time; every other one repeats exactly on a resumed run."""
    return key.startswith(("time/", "throughput/"))


class GRPOTrainer:
    """The state of a GRPO run: policy, engine, optimizer, reference. `train_grpo` drives it."""

    def __init__(self, model: torch.nn.Module, tokenizer, task, cfg: GRPOConfig, *,
                 reward_fn: RewardFn | None = None, prompt_fn: Callable[[Any], str] | None = None,
                 engine: Engine | None = None):
        self.model, self.tokenizer, self.task, self.cfg = model, tokenizer, task, cfg
        self.reward_fn = reward_fn or _default_reward_fn(task, cfg.reward_weights)
        self.prompt_fn = prompt_fn or _default_prompt_fn()
        self.engine = engine or Engine(model, tokenizer, max_batch_size=min(cfg.batch_size, 256),
                                       cache_tokens=max(1 << 16, cfg.batch_size * (cfg.max_completion_length + 256)))
        # β = 0: no reference model at all (no memory, no forward).
        self.ref_model = self._frozen_copy(model) if cfg.beta > 0 else None
        self.ref_step = 0  # the step whose policy the reference is
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate, betas=(0.9, 0.99), eps=1e-8,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
        self.step = 0

    @staticmethod
    def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return ref

    def sync_reference(self) -> None:
        """R1-Zero: the reference becomes the current policy (every ref_model_sync_steps steps)."""
        if self.ref_model is not None:
            self.ref_model.load_state_dict(self.model.state_dict())
            self.ref_step = self.step

    # ---- 1. rollouts -----------------------------------------------------------------------------
    def generate(self, problems: list[Any], rng: random.Random, first_group: int = 0) -> list[Rollout]:
        """G completions of each problem through the engine, all prompts in one engine batch; the rollouts
        of problems[j] get group index first_group + j."""
        cfg = self.cfg
        prompts = [self.tokenizer.encode(self.prompt_fn(p)) for p in problems]
        params = [SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_tokens=cfg.max_completion_length, ignore_eos=cfg.ignore_eos, logprobs=True,
                                 seed=rng.getrandbits(62))
                  for _ in problems]
        self.model.eval()
        outs = self.engine.generate(prompts, params)
        rollouts = []
        for g, (problem, ids, out) in enumerate(zip(problems, prompts, outs)):
            if out.error:
                raise GRPOError(f"the engine refused a prompt of {len(ids)} tokens: {out.error}")
            for c in sorted(out.outputs, key=lambda c: c.index):
                rollouts.append(Rollout(problem, first_group + g, ids, list(c.token_ids), c.text or "",
                                        c.finish_reason or "length", c.logprobs))
        return rollouts

    # ---- 2. rewards ------------------------------------------------------------------------------
    def score(self, rollouts: list[Rollout]) -> None:
        scores = self.reward_fn([r.problem for r in rollouts], [r.text for r in rollouts])
        for r, s in zip(rollouts, scores, strict=True):
            r.reward, r.accuracy, r.format = float(s.total), float(s.accuracy), float(s.format)

    def collect(self, step: int) -> tuple[list[Rollout], list[Rollout], dict[str, float]]:
        """Rollouts and rewards for one step: (all sampled, the groups kept for the update, timings)."""
        cfg, G = self.cfg, self.cfg.num_generations
        rng = random.Random(f"grpo-{cfg.seed}-{step}")  # per step, so a resumed run draws the same
        sampled: list[Rollout] = []
        kept: list[list[Rollout]] = []
        t_gen = t_rew = 0.0
        rounds = 1 + (cfg.max_resample_rounds if cfg.dynamic_sampling else 0)
        for _ in range(rounds):
            want = cfg.prompts_per_step - len(kept)
            if want <= 0:
                break
            problems = [self.task.sample(rng, "train") for _ in range(want)]
            t0 = time.perf_counter()
            rollouts = self.generate(problems, rng, first_group=len(sampled) // G)
            t1 = time.perf_counter()
            self.score(rollouts)
            t_gen, t_rew = t_gen + t1 - t0, t_rew + time.perf_counter() - t1
            sampled += rollouts
            groups = [rollouts[i : i + G] for i in range(0, len(rollouts), G)]
            if cfg.dynamic_sampling:
                groups = [g for g in groups if len({r.reward for r in g}) > 1]
            kept += groups
        kept = kept[: cfg.prompts_per_step]
        flat = [r for g in kept for r in g]
        if flat:
            rewards = torch.tensor([r.reward for r in flat]).view(len(kept), G)
            for r, a in zip(flat, group_advantages(rewards, cfg.reward_scaling).flatten().tolist()):
                r.advantage = a
        return sampled, flat, {"time/rollout_s": t_gen, "time/reward_s": t_rew}

    # ---- 3. the policy update -------------------------------------------------------------------
    def _micro_groups(self, batch: Batch, groups: Sequence[int]) -> list[list[int]]:
        """`groups` split into micro-batches of whole groups, longest completions first, so that each
        micro-batch pads to lengths close to its own (the padding is trimmed per micro-batch)."""
        per = max(1, self.cfg.micro_batch_size // batch.group_size)
        longest = batch.lengths.view(-1, batch.group_size).amax(dim=1).tolist()
        order = sorted(groups, key=lambda g: -longest[g])
        return [order[i : i + per] for i in range(0, len(order), per)]

    @torch.no_grad()
    def _fill_logps(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """A no-grad forward of `model` over the whole batch, (N, Tc)."""
        out = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)
        for groups in self._micro_groups(batch, range(batch.n_groups)):
            lp, _ = sequence_logprobs(model, batch.select(groups), self.cfg.temperature)
            out[batch.rows(groups), : lp.shape[1]] = lp
        return out

    def update(self, batch: Batch, step: int) -> dict[str, float]:
        """μ passes over the batch, each split into minibatches of whole groups, one optimizer step each."""
        cfg = self.cfg
        batch = batch.to(next(self.model.parameters()).device)
        n_updates = cfg.num_iterations * cfg.num_minibatches
        if cfg.beta > 0:
            batch.ref_logps = self._fill_logps(self.ref_model, batch)
        if n_updates > 1:
            if cfg.old_logprobs == "engine":
                if batch.sample_logps is None:
                    raise GRPOError("old_logprobs='engine' but the rollouts carry no engine log-probs")
                batch.old_logps = batch.sample_logps
            else:
                self.model.eval()
                batch.old_logps = self._fill_logps(self.model, batch)
        gen = torch.Generator().manual_seed(hash_seed(cfg.seed, step))
        sums = dict(loss=0.0, tokens=0.0, kl=0.0, clip_low=0.0, clip_high=0.0, entropy=0.0, ent_tokens=0.0,
                    grad_norm=0.0, gap=0.0, gap_tokens=0.0)
        self.model.train()
        for it in range(cfg.num_iterations):
            order = torch.randperm(batch.n_groups, generator=gen).tolist() if cfg.num_minibatches > 1 else \
                list(range(batch.n_groups))
            for mb, groups in enumerate(_split(order, cfg.num_minibatches)):
                rows = batch.rows(groups)
                n_seqs, n_tokens = len(rows), float(batch.mask[rows].sum())
                self.optimizer.zero_grad(set_to_none=True)
                for micro in map(batch.select, self._micro_groups(batch, groups)):
                    logps, entropy = sequence_logprobs(self.model, micro, cfg.temperature, with_entropy=True)
                    old = micro.old_logps if micro.old_logps is not None else logps.detach()
                    out = grpo_loss(logps, old, micro.advantages, micro.mask, loss_type=cfg.loss_type,
                                    epsilon=cfg.epsilon, epsilon_high=cfg.clip_high, beta=cfg.beta,
                                    ref_logps=micro.ref_logps, max_completion_length=cfg.max_completion_length,
                                    num_sequences=n_seqs, num_tokens=n_tokens)
                    out.loss.backward()
                    real = micro.token_mask
                    sums["loss"] += float(out.loss.detach())
                    sums["tokens"] += out.n_tokens
                    sums["kl"] += out.kl_sum
                    sums["clip_low"] += out.clip_low
                    sums["clip_high"] += out.clip_high
                    sums["entropy"] += float(entropy[real].sum())
                    sums["ent_tokens"] += float(real.sum())
                    if it == 0 and mb == 0 and micro.sample_logps is not None and cfg.temperature == 1.0:
                        # rollout/training mismatch: the engine's log-probs vs this forward, same weights
                        sums["gap"] += float((logps.detach() - micro.sample_logps).abs()[real].sum())
                        sums["gap_tokens"] += float(real.sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                sums["grad_norm"] += float(grad_norm)
                self.optimizer.step()
                self._after_optimizer_step()
        self.model.eval()
        tokens = max(sums["tokens"], 1.0)
        metrics = {
            "loss": sums["loss"] / n_updates,
            "kl": sums["kl"] / tokens,
            "clip_ratio/low": sums["clip_low"] / tokens,
            "clip_ratio/high": sums["clip_high"] / tokens,
            "clip_ratio/total": (sums["clip_low"] + sums["clip_high"]) / tokens,
            "entropy": sums["entropy"] / max(sums["ent_tokens"], 1.0),
            "grad_norm": sums["grad_norm"] / n_updates,
        }
        if sums["gap_tokens"]:
            metrics["logprob_gap"] = sums["gap"] / sums["gap_tokens"]
        return metrics

    def _after_optimizer_step(self) -> None:
        """Count routed tokens into the router bias (if γ > 0) and make the engine decode with the new weights."""
        update_bias(self.model, self.cfg.router_bias_update_speed)
        refresh = getattr(self.engine, "refresh_weights", None)
        if refresh is not None:
            refresh()

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        step = self.step + 1
        t0 = time.perf_counter()
        sampled, kept, times = self.collect(step)
        t1 = time.perf_counter()
        metrics: dict[str, float] = {"step": step, "lr": self.optimizer.param_groups[0]["lr"]}
        if kept:
            batch = Batch.from_rollouts(kept, cfg.num_generations, cfg.mask_truncated_completions,
                                        pad_id=self.tokenizer.pad_id if self.tokenizer is not None else 0)
            metrics.update(self.update(batch, step))
        self.scheduler.step()
        self.step = step
        if cfg.beta > 0 and cfg.ref_model_sync_steps and step % cfg.ref_model_sync_steps == 0:
            self.sync_reference()
        t2 = time.perf_counter()
        metrics.update(rollout_metrics(sampled, kept, cfg))
        gen_tokens = sum(len(r.completion_ids) for r in sampled)
        metrics.update(times)
        metrics.update({
            "skipped": float(not kept),
            "time/update_s": t2 - t1,
            "time/step_s": t2 - t0,
            "throughput/tokens_per_s": gen_tokens / (t2 - t0),
            "throughput/gen_tokens_per_s": gen_tokens / max(times["time/rollout_s"], 1e-9),
        })
        return metrics


# ---- checkpoints, the run -----------------------------------------------------------------------------
# Fields a resumed run may change; any other difference from the checkpoint's config is refused.
RESUME_MAY_CHANGE = {"max_steps", "save_steps", "save_total_limit", "eval_steps", "eval_problems"}
REFERENCE_DIR = "reference"


def _reference_path(run_dir: Path, step: int) -> Path:
    return run_dir / REFERENCE_DIR / f"step_{step:08d}"


def save_trainer(trainer: GRPOTrainer, run_dir: Path) -> Path:
    """A training checkpoint (train_state) of the policy, optimizer and schedule; with β > 0 and a synced
    reference, that reference's weights too (written first, so a checkpoint never names a missing one)."""
    from nanoseek.checkpoint.hf import save_pretrained
    from nanoseek.train.state import list_checkpoints, save_checkpoint

    if trainer.ref_model is not None and trainer.ref_step > 0:
        ref_dir = _reference_path(run_dir, trainer.ref_step)
        if not ref_dir.exists():
            tmp = ref_dir.parent / f".tmp-{ref_dir.name}"
            save_pretrained(trainer.ref_model, tmp)
            tmp.rename(ref_dir)
    state = {"grpo_config": trainer.cfg.to_dict(), "task": trainer.task.name, "ref_step": trainer.ref_step}
    path = save_checkpoint(run_dir, trainer.step, trainer.model, tokenizer=trainer.tokenizer,
                           optimizer=trainer.optimizer, scheduler=trainer.scheduler, state=state,
                           keep_last=trainer.cfg.save_total_limit)
    needed = {_checkpoint_ref_step(c) for c in list_checkpoints(run_dir)}
    for old in (run_dir / REFERENCE_DIR).glob("*") if (run_dir / REFERENCE_DIR).is_dir() else []:
        if old.name.startswith(".tmp-") or int(old.name.removeprefix("step_")) not in needed:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _checkpoint_ref_step(path: Path) -> int:
    return int(json.loads((path / "trainer_state.json").read_text())["state"].get("ref_step", 0))


def resume_trainer(trainer: GRPOTrainer, checkpoint: Path) -> None:
    """Restore a run at `checkpoint`; the trainer must have been built from the run's initial model (the
    reference of a run never synced is that model)."""
    from nanoseek.checkpoint.hf import from_pretrained
    from nanoseek.train.state import load_checkpoint

    state = load_checkpoint(checkpoint, trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
    saved, now = state.get("grpo_config", {}), trainer.cfg.to_dict()
    changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k, now[k]) != now[k])
    if changed:
        raise GRPOError(f"{checkpoint} was trained with other settings for {', '.join(changed)} "
                        f"({', '.join(f'{k}={saved[k]!r}' for k in changed)}); resume with the same ones")
    if state.get("task", trainer.task.name) != trainer.task.name:
        raise GRPOError(f"{checkpoint} was trained on task {state['task']!r}, not {trainer.task.name!r}")
    trainer.step = int(state["step"])
    ref_step = int(state.get("ref_step", 0))
    if trainer.ref_model is not None and ref_step > 0:
        ref_dir = _reference_path(checkpoint.parent.parent, ref_step)
        if not ref_dir.is_dir():
            raise GRPOError(f"{checkpoint} needs the reference policy of step {ref_step}, missing from {ref_dir}")
        trainer.ref_model.load_state_dict(from_pretrained(ref_dir).state_dict())
        trainer.ref_step = ref_step
    trainer.model.eval()
    refresh = getattr(trainer.engine, "refresh_weights", None)
    if refresh is not None:
        refresh()


def train_grpo(model: torch.nn.Module, tokenizer, task, cfg: GRPOConfig, run_dir: str | Path | None = None, *,
               resume: bool = False, progress: bool = True, reward_fn: RewardFn | None = None,
               prompt_fn: Callable[[Any], str] | None = None, engine: Engine | None = None,
               on_step: Callable[[dict[str, float]], None] | None = None) -> GRPOResult:
    """Run GRPO on `model` (trained in place) until cfg.max_steps.

    run_dir: where metrics.jsonl, checkpoints/ and final/ (HF model + tokenizer) go; None keeps nothing on
    disk. resume: continue from run_dir's latest checkpoint (`model` must be the run's initial model).
    reward_fn(problems, completions) -> [.total, .accuracy, .format]: default the task's rule rewards with
    cfg.reward_weights; prompt_fn(problem) -> text: default the R1-Zero template."""
    from nanoseek.train.metrics import MetricsLogger
    from nanoseek.train.state import latest_checkpoint

    if tokenizer is None:
        raise GRPOError("GRPO needs a tokenizer: prompts and completions are text")
    trainer = GRPOTrainer(model, tokenizer, task, cfg, reward_fn=reward_fn, prompt_fn=prompt_fn, engine=engine)
    run = Path(run_dir) if run_dir is not None else None
    if resume:
        last = latest_checkpoint(run) if run is not None else None
        if last is None:
            raise GRPOError(f"nothing to resume: no checkpoint under {run}/checkpoints")
        resume_trainer(trainer, last)
    elif run is not None and latest_checkpoint(run) is not None:
        raise GRPOError(f"{run} already holds a run; pass --resume to continue it, or choose another --out")
    logger = MetricsLogger(run, resume_step=trainer.step) if run is not None else None
    history: list[dict[str, float]] = []
    checkpoint = None
    bar = tqdm(total=cfg.max_steps, initial=trainer.step, disable=not progress, desc="grpo", unit="step",
               dynamic_ncols=True)
    try:
        while trainer.step < cfg.max_steps:
            metrics = trainer.train_step()
            if cfg.eval_steps and trainer.step % cfg.eval_steps == 0:
                metrics.update(_eval_metrics(trainer))
            history.append(metrics)
            if logger is not None:
                logger.log(**metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}",
                            len=f"{metrics['completion_length/mean']:.0f}", refresh=False)
            if run is not None and cfg.save_steps and trainer.step % cfg.save_steps == 0:
                checkpoint = save_trainer(trainer, run)
            if on_step is not None:
                on_step(metrics)
        final_dir = None
        if run is not None:
            if checkpoint is None or not checkpoint.name.endswith(f"{trainer.step:08d}"):
                checkpoint = save_trainer(trainer, run)
            final_dir = _save_final(trainer, run / "final")
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    return GRPOResult(trainer.step, history, history[-1] if history else {}, run, checkpoint, final_dir)


def _eval_metrics(trainer: GRPOTrainer) -> dict[str, float]:
    from nanoseek.rl.evaluate import evaluate

    r = evaluate(trainer.engine, trainer.task, n_problems=trainer.cfg.eval_problems, temperature=0,
                 max_tokens=trainer.cfg.max_completion_length, reward_fn=trainer.reward_fn,
                 prompt_fn=trainer.prompt_fn)
    return {"eval/pass@1": r.pass_at_1, "eval/format": r.format_rate, "eval/length": r.mean_response_length}


def _save_final(trainer: GRPOTrainer, out: Path) -> Path:
    """The trained policy as a plain HF-format directory (model + tokenizer), replaced atomically."""
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(trainer.model, tmp)
    trainer.tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def rollout_metrics(sampled: list[Rollout], kept: list[Rollout], cfg: GRPOConfig) -> dict[str, float]:
    """What the rollouts say: reward, accuracy, format rate, lengths, zero-variance groups."""
    G = cfg.num_generations
    n = max(len(sampled), 1)
    rewards = torch.tensor([r.reward for r in sampled])
    lengths = [len(r.completion_ids) for r in sampled]
    groups = [sampled[i : i + G] for i in range(0, len(sampled), G)]
    return {
        "reward/total": sum(r.reward for r in sampled) / n,
        "reward/accuracy": sum(r.accuracy for r in sampled) / n,
        "reward/format": sum(r.format for r in sampled) / n,
        "reward_std": float(rewards.std()) if len(sampled) > 1 else 0.0,
        "completion_length/mean": sum(lengths) / n,
        "completion_length/max": float(max(lengths, default=0)),
        "truncated_ratio": sum(r.truncated for r in sampled) / n,
        "groups/zero_std_frac": sum(len({r.reward for r in g}) == 1 for g in groups) / max(len(groups), 1),
        "groups/sampled": float(len(groups)),
        "groups/kept": float(len(kept) // G),
    }


def hash_seed(*parts: Any) -> int:
    """A stable 63-bit seed from parts (Python's hash() of str is salted per process)."""
    return random.Random("-".join(map(str, parts))).getrandbits(63)


def _split(items: list[int], n: int) -> list[list[int]]:
    """n nearly equal consecutive chunks (none empty when len(items) >= n)."""
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (i < r)
        if end > start:
            out.append(items[start:end])
        start = end
    return out


def _default_reward_fn(task, weights: dict[str, float]) -> RewardFn:
    """The task's rule rewards (accuracy + format) with the configured weights, verified by `task` itself."""
    from nanoseek.tasks import RewardWeights, score_batch

    w = RewardWeights(**weights)
    return lambda problems, completions: score_batch(problems, completions, w, {task.name: task})


def _default_prompt_fn() -> Callable[[Any], str]:
    from nanoseek.tasks import prompt_text

    return prompt_text
