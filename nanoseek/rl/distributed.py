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
- Or sharded, for a policy whose training state outgrows one device: `fsdp` (FSDP2, each transformer block
  its own unit; gradients reduce-scattered as averages, as DDP's) or `expert_parallel` (each rank holds E / W
  routed experts of every MoE layer, tokens sent to them by all_to_all; DDP for the rest). Both communicate
  inside every forward, so every rank runs as many micro-batches as the busiest one (stand-ins with a zero
  loss). The engine then samples from a full copy of the policy, refreshed after every optimizer step by
  gathering the shards (`gather_full`): the weight sync between a trainer and its inference engine.
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


def check_world(cfg: GRPOConfig, world: int, model_cfg) -> None:
    """A group never spans ranks: each rank rolls out prompts_per_step / W prompts. Sharding is refused as
    pretraining refuses it (`parallel.sharding_problem`), and for DeepSeek-V4 (sharded as V3's modules)."""
    if cfg.prompts_per_step % world:
        raise GRPOError(
            f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the world size ({world}): each rank "
            f"rolls out prompts_per_step / WORLD_SIZE whole groups of num_generations completions"
        )
    problem = parallel.sharding_problem(cfg.fsdp, cfg.expert_parallel, world, model_cfg.n_routed_experts)
    if problem:
        raise GRPOError(problem)
    if (cfg.fsdp or cfg.expert_parallel) and model_cfg.model_type == "deepseek_v4":
        flag = "--fsdp" if cfg.fsdp else "--expert-parallel"
        raise GRPOError(f"{flag} is not supported for DeepSeek-V4 models: use DDP (torchrun without it)")


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


def _reduce_device() -> torch.device | None:
    """Where a small tensor to all-reduce must live: NCCL reduces CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (identity on one process)."""
    if not parallel.is_distributed():
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=_reduce_device())
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


def policy_forward(model: nn.Module, cfg: GRPOConfig) -> nn.Module:
    """The training forward of `model`, under DDP, FSDP2 or expert parallelism when several processes run
    (`model` is sharded in place). find_unused_parameters: the MTP module (and a DSA model's indexers) take
    no part in GRPO's loss; under FSDP2 the MTP module stays with the root unit, gathered but unused."""
    policy = PolicyLogprobs(model)
    if not parallel.is_distributed():
        return policy
    if cfg.fsdp:
        return parallel.apply_fsdp(policy, list(model.layers))
    if cfg.expert_parallel:
        parallel.apply_expert_parallel(model)
    device = str(next(model.parameters()).device)
    return parallel.wrap_ddp(policy, device, find_unused_parameters=True)


def max_over_ranks(n: int) -> int:
    """The largest of the ranks' n (n itself on one process)."""
    if not parallel.is_distributed():
        return n
    t = torch.tensor([n], device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


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
