"""GRPO's rollouts: one sampled completion (`Rollout`), a step's rollouts packed as tensors with groups contiguous
(`RolloutBatch`), what a step's rollouts say (`rollout_metrics`), and the stable seeds a step draws from."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


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
class RolloutBatch:
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

    def to(self, device: torch.device) -> RolloutBatch:
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    def rows(self, groups: Sequence[int]) -> torch.Tensor:
        """Row indices of the completions of `groups`, group by group."""
        g = torch.as_tensor(list(groups), dtype=torch.long)
        return (g[:, None] * self.group_size + torch.arange(self.group_size)).flatten()

    def select(self, groups: Sequence[int]) -> RolloutBatch:
        """The sub-batch of whole groups, padding trimmed to its own longest prompt and completion."""
        g = torch.as_tensor(list(groups), dtype=torch.long)
        rows = self.rows(groups)
        tp, tc = int(self.prompt_lens[g].max()), max(int(self.lengths[rows].max()), 1)

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows, :tc]

        return RolloutBatch(
            self.prompt_ids[g, :tp],
            self.prompt_lens[g],
            self.completion_ids[rows, :tc],
            self.lengths[rows],
            self.mask[rows, :tc],
            self.advantages[rows],
            self.group_size,
            cut(self.sample_logps),
            cut(self.old_logps),
            cut(self.ref_logps),
        )

    @classmethod
    def from_rollouts(
        cls, rollouts: list[Rollout], group_size: int, mask_truncated: bool = False, pad_id: int = 0
    ) -> RolloutBatch:
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
        return cls(
            prompt_ids,
            torch.tensor([len(p) for p in prompts]),
            completion_ids,
            lengths,
            mask,
            torch.tensor([r.advantage for r in rollouts], dtype=torch.float32),
            group_size,
            sample if has_sample else None,
        )


# What the metrics and advantages need of each rollout: small enough to gather from every rank each step.
STATS = ("reward", "accuracy", "format", "length", "truncated", "loss_tokens")


def rollout_stats(rollouts: list[Rollout], mask_truncated: bool = False) -> torch.Tensor:
    """(n, len(STATS)) float64: each rollout's rewards, length, truncation and tokens in the loss."""
    rows = [
        (
            r.reward,
            r.accuracy,
            r.format,
            len(r.completion_ids),
            float(r.truncated),
            0.0 if mask_truncated and r.truncated else len(r.completion_ids),
        )
        for r in rollouts
    ]
    return torch.tensor(rows, dtype=torch.float64).view(-1, len(STATS))


def rollout_metrics(stats: torch.Tensor, kept_groups: int, G: int) -> dict[str, float]:
    """What a step's rollouts say (all of them, every rank's: `stats` from `rollout_stats`): reward, accuracy,
    format rate, lengths, zero-variance groups."""
    n = max(len(stats), 1)
    col = dict(zip(STATS, stats.T))
    rewards = col["reward"].view(-1, G) if len(stats) else torch.zeros(0, G, dtype=torch.float64)
    return {
        "reward/total": float(col["reward"].sum()) / n,
        "reward/accuracy": float(col["accuracy"].sum()) / n,
        "reward/format": float(col["format"].sum()) / n,
        "reward_std": float(col["reward"].std()) if len(stats) > 1 else 0.0,
        "completion_length/mean": float(col["length"].sum()) / n,
        "completion_length/max": float(col["length"].max()) if len(stats) else 0.0,
        "truncated_ratio": float(col["truncated"].sum()) / n,
        "groups/zero_std_frac": float((rewards == rewards[:, :1]).all(dim=1).sum()) / max(len(rewards), 1),
        "groups/sampled": float(len(rewards)),
        "groups/kept": float(kept_groups),
    }


def hash_seed(*parts: Any) -> int:
    """A stable 63-bit seed from parts (Python's hash() of str is salted per process)."""
    return random.Random("-".join(map(str, parts))).getrandbits(63)


def is_timing_metric(key: str) -> bool:
    """Metrics that depend on wall-clock time; every other one repeats exactly on a resumed run."""
    return key.startswith(("time/", "throughput/"))
