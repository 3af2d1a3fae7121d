"""GRPO under torchrun: how a step's prompts, rollout statistics, loss normalizers and metrics are shared out
over the ranks so that W processes make the same update as one.

    torchrun --nproc-per-node 2 -m nanoseek.cli grpo --model ckpt/ --task arithmetic --out runs/grpo ...

- Every rank draws the step's prompts and sampling seeds from the same per-step generator, then rolls out
  only its contiguous share of them (whole groups) through its own engine.
- The per-rollout statistics (rewards, lengths, tokens in the loss: a few numbers each) are gathered to
  every rank, so the advantages (also `scale_rewards=batch`), dynamic sampling's choice of groups and the
  loss normalizers are computed on the whole step's rollouts, exactly as one process does. Tokens stay put.
- The update runs under DDP: each rank's loss is divided by the whole minibatch's counts and multiplied by
  W, so DDP's average of the W gradients is the one-process gradient (grpo / gspo divide by the number of
  sequences, dr_grpo by sequences x max_completion_length, dapo by the tokens: all global counts).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.model.moe import MoE
from nanoseek.rl.config import GRPOConfig, GRPOError
from nanoseek.rl.loss import sequence_logprobs
from nanoseek.rl.rollout import RolloutBatch
from nanoseek.train import parallel


def check_world(cfg: GRPOConfig, world: int) -> None:
    """A group never spans ranks: each rank rolls out prompts_per_step / W prompts."""
    if cfg.prompts_per_step % world:
        raise GRPOError(
            f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the world size ({world}): each rank "
            f"rolls out prompts_per_step / WORLD_SIZE whole groups of num_generations completions"
        )


def share(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous part of n items, the first n % world ranks taking one more."""
    k, r = divmod(n, world)
    start = rank * k + min(rank, r)
    return slice(start, start + k + (rank < r))


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (any count per rank), concatenated in rank order (identity on one process)."""
    if not parallel.is_distributed():
        return rows
    parts: list = [None] * parallel.world_size()
    dist.all_gather_object(parts, rows.cpu())
    return torch.cat(parts)


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (identity on one process)."""
    if not parallel.is_distributed():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    parallel.all_reduce_sum(t)
    return dict(zip(values, t.tolist()))


@contextlib.contextmanager
def uncounted(model: nn.Module):
    """The MoE layers' routed-token counters as they were before: a stand-in forward (a rank holding none of a
    minibatch's groups) must not move the router bias (`router_bias_update_speed` > 0)."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    before = [m.tokens_per_expert.clone() for m in moes]
    yield
    for moe, counts in zip(moes, before):
        moe.tokens_per_expert.copy_(counts)


class PolicyLogprobs(nn.Module):
    """`sequence_logprobs` as a module's forward: DDP synchronizes the gradients of what runs through its
    wrapped module's forward, and the training forward is not `Transformer.forward`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: RolloutBatch, temperature: float, with_entropy: bool = False):
        return sequence_logprobs(self.model, batch, temperature, with_entropy)


def policy_forward(model: nn.Module) -> nn.Module:
    """The training forward of `model`, under DDP when several processes run. find_unused_parameters: the
    MTP module (and a DSA model's indexers) take no part in GRPO's loss."""
    policy = PolicyLogprobs(model)
    if not parallel.is_distributed():
        return policy
    device = str(next(model.parameters()).device)
    return parallel.wrap_ddp(policy, device, find_unused_parameters=True)


@dataclass
class StepShard:
    """Which of a step's K kept groups this rank's batch holds, and what the minibatch normalizers need of all K."""

    positions: list[int]  # each local group's index among the K kept groups; -1: a stand-in, never trained
    group_tokens: torch.Tensor  # (K,) tokens in the loss of each kept group, every rank's

    @classmethod
    def whole(cls, batch: RolloutBatch) -> StepShard:
        """One process: the batch is the step."""
        return cls(list(range(batch.n_groups)), batch.mask.view(batch.n_groups, -1).sum(-1).double())

    @property
    def n_groups(self) -> int:
        return len(self.group_tokens)
