"""The training plan: FLOPs per token, step time, GPU-hours and dollars at a stated MFU; memory per device for a
parallel layout (data parallel with ZeRO/FSDP sharding, tensor, pipeline and expert parallel degrees); and the
smallest layout that fits.

Layout: `count = dp · tp · pp`. Expert parallelism is carved out of the data-parallel ranks (as Megatron and
DeepSeek do), so `ep` divides `dp` and the number of routed experts; routed experts are sharded over `ep` (not
`tp`), everything else over `tp` (heads, so `tp` divides them). Pipeline stages hold contiguous runs of layers,
the first also the embedding, the last the final norm, head and MTP modules; memory is that of the fullest stage.
ZeRO stage 1 shards the optimizer state (fp32 master and Adam moments) over the data-parallel ranks, stage 2
also the gradients, stage 3 (FSDP) also the weights; routed-expert state is sharded over `dp / ep`, the ranks
that hold the same experts.

Activations per token and layer (bytes = act_bytes; fused attention, so no T x T scores are kept):
    attention  2·D + q_lora + (kv_lora + rope) + 3·H·d_qk + 2·H·d_v
    MLP        3·inter (dense) or 3·(top_k + n_shared)·moe_inter + k routing weights (MoE)
held for every layer of a stage and for `pp` micro-batches in flight (1F1B), over `micro_batch · seq / tp`
tokens (sequence parallel). Full recomputation keeps only each layer's input (D values) and one layer's set.
The fp32 logits of the last stage, `micro_batch · seq · vocab / tp · 4 · (1 + mtp_depth)`, are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from nanoseek.model.config import ModelConfig
from nanoseek.model.transformer import Transformer
from nanoseek.plan.hardware import Accelerator, PlanError
from nanoseek.train.objective import training_flops_per_token


@dataclass(frozen=True)
class Layout:
    """Parallel degrees of a training run. dp is derived from the device count when 0."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int = 1  # 0 = plain data parallel, 1 = optimizer state sharded, 2 = + gradients, 3 = FSDP (+ weights)
    dp: int = 0

    def describe(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp} ep={self.ep} zero={self.zero}"


@dataclass(frozen=True)
class Precision:
    """Bytes per value. Defaults: bf16 weights, fp32 gradients, fp32 master weights and Adam moments."""

    weight: float = 2
    grad: float = 4
    master: float = 4  # 0 when the weights are themselves fp32
    moment: float = 4  # each of Adam's two moments (DeepSeek-V3 keeps them in bf16: 2)
    act: float = 2


@dataclass(frozen=True)
class TrainPlanConfig:
    tokens: float
    count: int = 1
    seq_len: int = 4096
    global_batch: int = 1920  # sequences per optimizer step, over all devices
    micro_batch: int = 1  # sequences per device per forward
    mtp_depth: int = 0
    mfu: float = 0.4
    precision: str = "bf16"  # the peak the MFU is a fraction of: bf16 or fp8
    recompute: bool = False
    headroom: float = 0.9  # fraction of device memory a plan may fill
    layout: Layout = field(default_factory=Layout)
    bytes: Precision = field(default_factory=Precision)


@dataclass(frozen=True)
class Memory:
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class TrainPlan:
    flops_per_token: float
    total_flops: float
    peak: float
    gpu_hours: float
    wall_days: float
    dollars: float
    step_s: float
    steps: float
    layout: Layout
    memory: Memory
    fits: bool
    capacity: float


# ---- parameters by where they live -------------------------------------------------------------------
@dataclass(frozen=True)
class ParamGroups:
    """Parameter counts: per main layer (dense part, routed experts), embedding, head (norm + lm_head),
    and the MTP modules (dense, routed) that sit on the last stage."""

    layers: tuple[tuple[int, int], ...]
    embedding: int
    head: int
    mtp: tuple[int, int]


def param_groups(cfg: ModelConfig, mtp_depth: int | None = None) -> ParamGroups:
    depth = cfg.num_nextn_predict_layers if mtp_depth is None else mtp_depth
    with torch.device("meta"):
        model = Transformer(cfg.replace(num_nextn_predict_layers=depth))
    layers = [[0, 0] for _ in range(cfg.num_hidden_layers)]
    embedding = head = 0
    mtp = [0, 0]
    for name, p in model.named_parameters():
        n, routed = p.numel(), int(".mlp.experts." in name)
        if name.startswith("layers."):
            layers[int(name.split(".")[1])][routed] += n
        elif name.startswith("mtp."):
            mtp[routed] += n
        elif name.startswith("embed_tokens."):
            embedding += n
        else:
            head += n
    return ParamGroups(tuple((d, r) for d, r in layers), embedding, head, (mtp[0], mtp[1]))


def stage_layers(n_layers: int, pp: int) -> list[range]:
    """Contiguous layers of each pipeline stage, as even as possible (the first stages take one more)."""
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (s < extra)
        out.append(range(start, start + n))
        start += n
    return out


# ---- layouts ----------------------------------------------------------------------------------------
def check_layout(cfg: ModelConfig, count: int, layout: Layout) -> Layout:
    """The layout with dp filled in, or a PlanError naming the degree that cannot be."""
    for name in ("tp", "pp", "ep"):
        if getattr(layout, name) < 1:
            raise PlanError(f"{name}={getattr(layout, name)}: a degree is at least 1")
    if layout.zero not in (0, 1, 2, 3):
        raise PlanError(f"zero={layout.zero}: ZeRO stages are 0, 1, 2, 3")
    if cfg.num_attention_heads % layout.tp:
        raise PlanError(f"tp={layout.tp} does not divide the {cfg.num_attention_heads} attention heads")
    if layout.pp > cfg.num_hidden_layers:
        raise PlanError(f"pp={layout.pp} is more pipeline stages than the {cfg.num_hidden_layers} layers")
    if count % (layout.tp * layout.pp):
        raise PlanError(f"tp={layout.tp} x pp={layout.pp} does not divide the {count} devices")
    dp = count // (layout.tp * layout.pp)
    if layout.dp and layout.dp != dp:
        raise PlanError(f"dp={layout.dp}: dp x tp x pp must be the {count} devices (dp would be {dp})")
    if layout.ep > 1 and cfg.n_routed_experts == 0:
        raise PlanError(f"ep={layout.ep}: the model has no routed experts")
    if cfg.n_routed_experts and cfg.n_routed_experts % layout.ep:
        raise PlanError(f"ep={layout.ep} does not divide the {cfg.n_routed_experts} routed experts")
    if dp % layout.ep:
        raise PlanError(f"ep={layout.ep} does not divide the data-parallel degree dp={dp}")
    return replace(layout, dp=dp)


def activation_bytes_per_token(cfg: ModelConfig, layer: int, act: float = 2) -> float:
    """Saved activations of one token in one layer, without recomputation (see the module docstring)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    attention = 2 * D + cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim
    attention += 3 * H * cfg.qk_head_dim + 2 * H * cfg.v_head_dim
    if cfg.is_moe_layer(layer):
        mlp = 3 * (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size
        mlp += cfg.num_experts_per_tok
    else:
        mlp = 3 * cfg.intermediate_size
    return (attention + mlp) * act


def memory_per_device(cfg: ModelConfig, plan: TrainPlanConfig, groups: ParamGroups | None = None) -> Memory:
    """Bytes on the fullest device of the layout (`plan.layout` must have passed `check_layout`)."""
    lay, b = plan.layout, plan.bytes
    groups = groups or param_groups(cfg, plan.mtp_depth)
    stages = stage_layers(cfg.num_hidden_layers, lay.pp)
    best: Memory | None = None
    for s, layers in enumerate(stages):
        dense = sum(groups.layers[i][0] for i in layers)
        routed = sum(groups.layers[i][1] for i in layers)
        if s == 0:
            dense += groups.embedding
        if s == lay.pp - 1:
            dense += groups.head + groups.mtp[0]
            routed += groups.mtp[1]
        n_dense, n_routed = dense / lay.tp, routed / lay.ep
        edp = lay.dp // lay.ep  # ranks holding the same experts

        def share(stage: int, over: int) -> float:
            return over if lay.zero >= stage else 1

        weights = b.weight * (n_dense / share(3, lay.dp) + n_routed / share(3, edp))
        grads = b.grad * (n_dense / share(2, lay.dp) + n_routed / share(2, edp))
        state = b.master + 2 * b.moment
        optimizer = state * (n_dense / share(1, lay.dp) + n_routed / share(1, edp))
        tokens = plan.micro_batch * plan.seq_len / lay.tp
        per_layer = [activation_bytes_per_token(cfg, i, b.act) for i in layers]
        if s == lay.pp - 1:
            per_layer += [activation_bytes_per_token(cfg, cfg.num_hidden_layers, b.act)] * plan.mtp_depth
        if plan.recompute:
            kept = len(per_layer) * cfg.hidden_size * b.act + max(per_layer, default=0)
        else:
            kept = sum(per_layer)
        in_flight = lay.pp - s  # 1F1B: stage s holds pp - s micro-batches
        logits = plan.micro_batch * plan.seq_len * cfg.vocab_size / lay.tp * 4 * (1 + plan.mtp_depth)
        activations = tokens * kept * in_flight + (logits if s == lay.pp - 1 else 0)
        m = Memory(weights, grads, optimizer, activations)
        if best is None or m.total > best.total:
            best = m
    assert best is not None
    return best


def candidate_layouts(cfg: ModelConfig, count: int) -> list[Layout]:
    """Every layout that can exist on `count` devices, smallest model-parallel footprint first: least
    tp·pp, then least ZeRO sharding, then least ep."""
    out = []
    for tp in (d for d in range(1, count + 1) if count % d == 0):
        for pp in (d for d in range(1, count // tp + 1) if (count // tp) % d == 0):
            for ep in (d for d in range(1, count // (tp * pp) + 1) if (count // (tp * pp)) % d == 0):
                for zero in (0, 1, 2, 3):
                    try:
                        out.append(check_layout(cfg, count, Layout(tp=tp, pp=pp, ep=ep, zero=zero)))
                    except PlanError:
                        continue
    return sorted(out, key=lambda lay: (lay.tp * lay.pp, lay.zero, lay.ep, lay.tp))


def smallest_fitting_layout(cfg: ModelConfig, plan: TrainPlanConfig, device: Accelerator) -> Layout | None:
    groups = param_groups(cfg, plan.mtp_depth)
    for layout in candidate_layouts(cfg, plan.count):
        if memory_per_device(cfg, replace(plan, layout=layout), groups).total <= device.memory_bytes * plan.headroom:
            return layout
    return None


# ---- time and money ---------------------------------------------------------------------------------
def plan_training(cfg: ModelConfig, plan: TrainPlanConfig, device: Accelerator) -> TrainPlan:
    """GPU-hours = flops_per_token · tokens / (MFU · peak · 3600); dollars = GPU-hours · price."""
    if not 0 < plan.mfu <= 1:
        raise PlanError(f"mfu={plan.mfu} must be in (0, 1]")
    if plan.count < 1 or plan.tokens <= 0:
        raise PlanError("a plan needs at least one device and a positive token budget")
    layout = check_layout(cfg, plan.count, plan.layout)
    plan = replace(plan, layout=layout)
    fpt = training_flops_per_token(cfg, plan.seq_len, plan.mtp_depth)
    peak = device.peak(plan.precision)
    total = fpt * plan.tokens
    gpu_hours = total / (plan.mfu * peak * 3600)
    batch_tokens = plan.global_batch * plan.seq_len
    memory = memory_per_device(cfg, plan)
    capacity = device.memory_bytes * plan.headroom
    return TrainPlan(
        flops_per_token=fpt,
        total_flops=total,
        peak=peak,
        gpu_hours=gpu_hours,
        wall_days=gpu_hours / plan.count / 24,
        dollars=gpu_hours * device.price_per_hour,
        step_s=batch_tokens * fpt / (plan.count * peak * plan.mfu),
        steps=math.ceil(plan.tokens / batch_tokens),
        layout=layout,
        memory=memory,
        fits=memory.total <= capacity,
        capacity=capacity,
    )


def implied_mfu(flops_per_token: float, tokens: float, gpu_hours: float, peak: float) -> float:
    """MFU a reported run achieved: flops_per_token · tokens / (GPU-hours · 3600 · peak)."""
    return flops_per_token * tokens / (gpu_hours * 3600 * peak)
