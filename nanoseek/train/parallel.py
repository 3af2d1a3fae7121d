"""Scale-out on torch.distributed: data parallel (DDP) and expert parallel (routed experts split over ranks).

    torchrun --nproc_per_node 2 -m nanoseek.cli pretrain ... [--expert-parallel]

- `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process
  group: gloo on CPU, nccl on CUDA. Without torchrun it is a no-op (world size 1).
- Data parallel is PyTorch's own `DistributedDataParallel` (every rank holds the whole model, runs its
  share of the global batch, and DDP averages the gradients), or FSDP2 (`fully_shard`: each rank holds a
  1/W shard of every parameter, gradient and optimizer state; a block's weights are all-gathered for its
  forward and backward, its gradients reduce-scattered).
- Expert parallel (DeepSeek-V3 §3.2, "EP"): rank r holds routed experts [r·E/W, (r+1)·E/W) of every MoE
  layer. `ExpertParallelExperts` replaces `MoE.experts`: the router still runs locally on every rank, the
  tokens (already sorted by expert) travel to the rank that owns their expert with one `all_to_all`, come
  back with another, and autograd runs the same exchanges in reverse. Everything else is replicated and
  data-parallel under DDP, which is told to leave the expert slices alone; their gradients are already sums
  over all ranks' tokens and only need the data-parallel 1/W.
- Checkpoints stay independent of the world size: `gather_full` turns expert slices and FSDP shards (and
  their optimizer state) back into full tensors, `local_slice` cuts a full tensor down to this rank's part.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from nanoseek.errors import NanoseekError
from nanoseek.model.moe import Experts, MoE


class DistributedError(NanoseekError):
    """A distributed setup that cannot work (expert count not divisible by the world size, ...)."""


# ---- process group ---------------------------------------------------------------------------------
def sharding_problem(fsdp: bool, expert_parallel: bool, world: int, n_routed_experts: int) -> str | None:
    """Why FSDP2 / expert parallelism cannot run as asked, or None: each needs several processes, the two do
    not combine, and expert parallelism needs routed experts that divide evenly over the ranks."""
    flags = [flag for flag, on in (("--fsdp", fsdp), ("--expert-parallel", expert_parallel)) if on]
    if not flags:
        return None
    if world == 1:
        return f"{flags[0]} needs several processes: launch with torchrun --nproc_per_node N"
    if len(flags) == 2:
        return "--fsdp and --expert-parallel do not combine: expert parallelism runs with DDP"
    if expert_parallel and (not n_routed_experts or n_routed_experts % world):
        return f"--expert-parallel: n_routed_experts ({n_routed_experts}) must divide evenly over {world} ranks"
    return None


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Start the process group when launched by torchrun; returns (rank, world_size). gloo on CPU, nccl on CUDA."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """End the process group, the launching command's last step: every rank waits for the others first, so
    none tears its connections down while another still uses them (a gloo peer would abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity on one process)."""
    if is_distributed():
        dist.all_reduce(values)
    return values


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---- expert parallel -------------------------------------------------------------------------------
class ExpertParallelExperts(Experts):
    """This rank's slice of a layer's routed experts, with the all_to_all dispatch and combine around them.

    Parameters keep `Experts`' names and layout, only E_local = E / W experts deep, so checkpoint names map
    unchanged once `gather_full` restores the full stack.
    """

    def __init__(self, full: Experts, group: dist.ProcessGroup | None = None):
        n_experts, inter_dim, dim = full.gate_proj.shape
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if n_experts % self.ep_size:
            raise DistributedError(
                f"expert parallelism needs n_routed_experts ({n_experts}) divisible by the world size ({self.ep_size})"
            )
        self.n_local = n_experts // self.ep_size
        super().__init__(self.n_local, dim, inter_dim)
        self.n_experts, self.group = n_experts, group
        self.ran = False  # has a forward run since the last `finish_expert_grads`
        lo = self.ep_rank * self.n_local
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(self, name).data = getattr(full, name).data[lo : lo + self.n_local].clone()

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (M, D) this rank's tokens sorted by global expert id; counts: (E,). Returns (M, D), same order."""
        W, El = self.ep_size, self.n_local
        self.ran = True
        send = counts.view(W, El)  # tokens for each rank's each local expert
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)  # recv[src, e]: from src, for my e
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        group = self.group or dist.group.WORLD
        x_recv = funcol.all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, group)
        # Received rows are ordered (source rank, local expert); the experts want them by local expert.
        local_expert = torch.arange(El, device=x.device).repeat(W).repeat_interleave(recv.flatten())
        order = local_expert.argsort(stable=True)
        y = super().forward(x_recv[order], recv.sum(0))
        y_recv = torch.empty_like(y).index_copy(0, order, y)
        return funcol.all_to_all_single_autograd(y_recv, send_splits, recv_splits, group)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[str]:
    """Replace every MoE layer's routed experts by this rank's slice; returns the sliced parameter names."""
    if not is_distributed():
        raise DistributedError("--expert-parallel needs several processes: launch with torchrun --nproc_per_node N")
    names = []
    for mod_name, moe in model.named_modules():
        if isinstance(moe, MoE) and not isinstance(moe.experts, ExpertParallelExperts):
            moe.experts = ExpertParallelExperts(moe.experts, group)
            names += [f"{mod_name}.experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return names


def expert_parallel_params(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """Parameter name -> owning expert-parallel module, for every sliced parameter of the (unwrapped) model."""
    out = {}
    for mod_name, mod in unwrap(model).named_modules():
        if isinstance(mod, ExpertParallelExperts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                out[f"{mod_name}.{p}"] = mod
    return out


def gather_full(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors from per-rank parts: FSDP shards (DTensors) are all-gathered, and entries named after
    expert-parallel parameters (or prefixed by such a name and '::', as optimizer state is) are gathered
    along dim 0. Collective: every rank calls it with the same names in the same order."""
    sliced = expert_parallel_params(model)
    out = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        mod = sliced.get(name.split("::")[0])
        if mod is None or t.dim() == 0:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(mod.ep_size)]
        dist.all_gather(parts, t.contiguous(), group=mod.group)
        out[name] = torch.cat(parts)
    return out


def local_slice(model: nn.Module, name: str, full: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's part of a full tensor: its expert slice if `name` (before any '::') is an expert-parallel
    parameter; a DTensor sharded as `like` if `like` is one (FSDP). No communication."""
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    mod = expert_parallel_params(model).get(name.split("::")[0])
    if mod is None or full.dim() == 0:
        return full
    return full[mod.ep_rank * mod.n_local : (mod.ep_rank + 1) * mod.n_local]


def is_sharded(model: nn.Module) -> bool:
    """Does this rank hold only part of the model (FSDP shards or expert slices)?"""
    return bool(expert_parallel_params(model)) or any(isinstance(p, DTensor) for p in unwrap(model).parameters())


def wrap_ddp(model: nn.Module, device: str = "cpu", find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel over everything but expert-parallel slices (which differ per rank).

    forward_sync_buffers=False: the MoE token counters are per-rank until `update_bias` sums them, and the
    correction bias is updated identically on every rank, so there is nothing to broadcast.
    find_unused_parameters: for a forward that leaves some parameters out (GRPO's, which skips MTP).
    """
    sliced = list(expert_parallel_params(model))
    if sliced:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sliced)
    device_ids = [torch.device(device).index or 0] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, forward_sync_buffers=False, find_unused_parameters=find_unused_parameters
    )


def apply_fsdp(root: nn.Module, blocks: list[nn.Module], reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: shard each transformer block on its own (gathered just for its forward and backward), then the
    root, which keeps the rest (embedding, final norm, head, MTP projections). `root` must be the module
    whose forward runs the training step, so its hooks gather the root parameters. Gradients are
    reduce-scattered as averages over ranks, as DDP's are. reshard_after_forward=False keeps each block
    gathered from its forward to its backward: needed when a loss leaves a block other than through its
    output (DSA's indexer KL), which FSDP's pre-backward hook, on the output, would not see coming."""
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(root)
    return root


def no_gradient_sync(wrapped: nn.Module):
    """A context for the micro-steps of gradient accumulation that skips the gradient communication."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def paused():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return paused()
    return contextlib.nullcontext()


def finish_expert_grads(model: nn.Module) -> None:
    """After backward: expert-slice gradients are sums over all W ranks' losses; DDP averages the rest, so
    divide these by W too. A slice whose layer ran but received no token gets a zero gradient, as it would in
    a single-process run where the stacked expert tensor always has one; a layer that did not run (GRPO's
    MTP module) gets none, as there."""
    for name, mod in expert_parallel_params(model).items():
        p = getattr(mod, name.rsplit(".", 1)[1])
        if not p.requires_grad or not mod.ran:  # frozen (a DSA warm-up) or unused: no gradient, no update
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.div_(mod.ep_size)
    for mod in set(expert_parallel_params(model).values()):
        mod.ran = False


def average_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over the ranks, where DDP does not (parameters
    without a gradient are skipped: every rank must hold the same ones)."""
    grads = [p.grad for p in params if p.grad is not None]
    if is_distributed() and grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world_size()
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


def clip_grad_norm(model: nn.Module, max_norm: float, params: list[nn.Parameter] | None = None) -> float:
    """Clip the global gradient norm of `params` (default: all of the model's; expert slices counted once
    over all ranks); returns the norm before clipping. max_norm <= 0 only measures."""
    sliced = {id(getattr(mod, n.rsplit(".", 1)[1])) for n, mod in expert_parallel_params(model).items()}
    params = [p for p in (model.parameters() if params is None else params) if p.grad is not None]
    if not sliced:  # replicated (DDP) or FSDP-sharded gradients: torch computes the global norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    replicated = [p.grad for p in params if id(p) not in sliced]
    local = [p.grad for p in params if id(p) in sliced]
    device = next(model.parameters()).device

    def squares(grads: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros((), device=device)

    sq = squares(local)
    all_reduce_sum(sq)  # every rank's expert slice counts once
    sq = sq + squares(replicated)
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_([p.grad for p in params], max_norm / (norm + 1e-6))
    return norm
