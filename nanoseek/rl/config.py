"""The settings of a GRPO run (`GRPOConfig`) and its error (`GRPOError`); what each knob means is in grpo.py's
docstring and docs/grpo.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nanoseek.errors import NanoseekError

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "gspo")
SCALE_REWARDS = ("auto", "group", "batch", "none")
OLD_LOGPROBS = ("auto", "forward", "engine")
# (ε, ε_high) when --epsilon is not given. GSPO clips a length-normalized sequence ratio, which stays much
# closer to 1 than a token's: the GSPO paper (Zheng et al. 2025, §5.1) clips it to [1 - 3e-4, 1 + 4e-4].
DEFAULT_CLIP = {"gspo": (3e-4, 4e-4)}
TOKEN_CLIP = (0.2, None)  # PPO's ε for every token-level loss; ε_high None = ε


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
    loss_type: str = "dapo"  # grpo | dr_grpo | dapo | gspo (see grpo.py's docstring)
    scale_rewards: str = "auto"  # group | batch | none | auto (none for dr_grpo, else group)
    epsilon: float | None = None  # ε: ratio clipped to [1 - ε, 1 + ε_high]; None = 0.2, or 3e-4 for gspo
    epsilon_high: float | None = None  # ε_high (DAPO's clip-higher, 0.28); None = ε, or 4e-4 for gspo
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
    # ---- scale-out under torchrun (distributed.py); DDP when neither is set ----
    fsdp: bool = False  # the update under FSDP2: parameters, gradients and AdamW state sharded over the ranks
    expert_parallel: bool = False  # the update with each rank holding E / W of every layer's routed experts

    def __post_init__(self) -> None:
        if self.epsilon is None:  # the loss type's own clip range; stored resolved, so checkpoints compare
            self.epsilon, high = DEFAULT_CLIP.get(self.loss_type, TOKEN_CLIP)
            if self.epsilon_high is None:
                self.epsilon_high = high
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
        need(
            self.scale_rewards in SCALE_REWARDS,
            f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {self.scale_rewards!r}",
        )
        need(self.old_logprobs in OLD_LOGPROBS, f"old_logprobs must be one of {', '.join(OLD_LOGPROBS)}")
        need(
            self.num_generations >= 2,
            f"num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}",
        )
        for name in (
            "prompts_per_step",
            "max_completion_length",
            "num_iterations",
            "num_minibatches",
            "micro_batch_size",
            "max_steps",
            "eval_problems",
        ):
            need(
                isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"{name} must be a positive integer"
            )
        for name in ("ref_model_sync_steps", "max_resample_rounds", "warmup_steps", "save_steps", "eval_steps"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0")
        need(self.save_total_limit >= 1, "save_total_limit must be >= 1")
        need(
            self.num_minibatches <= self.prompts_per_step,
            "num_minibatches cannot exceed prompts_per_step (minibatches hold whole groups)",
        )
        need(self.temperature > 0, f"temperature must be > 0 for RL sampling, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.epsilon < 1 and self.clip_high >= 0, "epsilon must be in [0, 1) and epsilon_high >= 0")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.learning_rate > 0, "learning_rate must be > 0")
        need(
            self.old_logprobs != "engine" or (self.temperature == 1.0 and self.top_p == 1.0),
            "old_logprobs='engine' needs temperature 1 and top_p 1 (the engine reports untempered log-probs)",
        )
        need(
            isinstance(self.reward_weights, dict)
            and set(self.reward_weights) <= {"accuracy", "format"}
            and all(isinstance(v, (int, float)) for v in self.reward_weights.values()),
            f"reward_weights must map accuracy/format to numbers, got {self.reward_weights!r}",
        )

    @property
    def batch_size(self) -> int:
        return self.num_generations * self.prompts_per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
