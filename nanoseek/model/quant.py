"""Weight-only low-precision storage for inference: `quantize_model(model, "bf16" | "int8" | "int4")`.

Done in place at load time on a `Transformer` built from an fp32/bf16 checkpoint. Every `nn.Linear` under
`layers`, `mtp` and `lm_head` becomes a `QuantLinear` and every routed-expert stack (`moe.Experts`) a
`QuantExperts`; the embedding, the routers (`Gate`) and the norms stay fp32. A tied `lm_head` gets its own
quantized copy (the embedding stays fp32). Activations stay in the caller's dtype: each kernel casts them to
bf16 and its output back. Packed tensors are buffers whose dtypes survive `.to(dtype)`.

Formats and layouts (weight W (N, K) = (out, in); E matrices stacked for the experts):

- bf16: W in bf16, run as `F.linear(x.bfloat16(), W)`.
- int8: symmetric per output channel, q = round(W / s) in int8 (N, K), s = max|W_row| / 127 in bf16 (N,);
  W ≈ q * s. Kernel `aten._weight_int8pack_mm(x_bf16, q, s)`.
- int4: asymmetric per group of `group_size` (32, 64 or 128) input columns, torch's tinygemm convention
  (checked against the kernel): q in 0..15, scale s = (max - min) / 15, zero z = min + 8 s, both bf16 and
  stored as `scales_and_zeros` (K/g, N, 2); W ≈ (q - 8) * s + z. On CPU q is packed two a byte by
  `aten._convert_weight_to_int4pack_for_cpu` (N, K/2) and run by `aten._weight_int4pack_mm_for_cpu`; on CUDA
  by `_convert_weight_to_int4pack` / `_weight_int4pack_mm` (another layout, sm80+). A packed layout belongs
  to the device type it was packed on: quantize after moving the model (a mismatch raises).

Shapes the kernels cannot take are zero-padded, which is exact: measured with torch 2.13 on CPU,
`_weight_int8pack_mm` returns garbage or segfaults unless K % 16 == 0, so int8 pads K to 16; the int4 packer
needs N % 16 == 0 and the kernel K % group_size == 0, so int4 pads N to 16 and K to the group size. The
padded columns meet zero-padded activations, the padded rows are sliced off the output.

Measured dispatch (torch 2.13.0+cpu, a 2-core AVX-512 host, one thread, M=1 row, K=512; microseconds):

    N x K        fp32 F.linear  bf16 F.linear  bf16 upcast  int8 (x bf16)  int8 (x fp32)  int4 g64 (x bf16)
    512 x 512           15.7          29.1         34.6           10.2          189.7             9.5
    8192 x 512         487           268         1206            124          3048              124

The host reports AVX-512 with avx512_bf16 (torch's CPU capability AVX512). The fused kernels are vectorized
only for bf16 activations: with fp32 ones they run scalar, 15-60x slower, so activations go through bf16.
bf16 F.linear (oneDNN) beats upcasting W per call at every size, so bf16 keeps no fp32 copy and runs in bf16.
Emulating an AVX2 host (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) at M=1, 8192 x 512: fp32 416,
bf16 525, upcast 1138, int8 211, int4 466: int8 stays 2x faster than fp32, bf16 and int4 only save memory.
At M=16-128 rows (prefill), bf16 F.linear is 2-5x faster than the int8/int4 kernels on this host.

On CUDA (untested here): int8 uses `_weight_int8pack_mm` where this torch build registers a CUDA kernel,
else it dequantizes per call (the only place a whole matrix is dequantized per call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.mla import MLA
from nanoseek.model.moe import Experts

WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
_INT8_K_MULTIPLE = 16  # _weight_int8pack_mm is wrong or crashes for other K (measured, see above)
_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
_INT8_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CUDA")
aten = torch.ops.aten


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad2d(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dims of w to (rows, cols)."""
    return F.pad(w, (0, cols - w.shape[-1], 0, rows - w.shape[-2]))


def _pad_cols(x: torch.Tensor, cols: int) -> torch.Tensor:
    """x (M, K) zero-padded to (M, cols); x itself when no padding is needed (a decode step pays per op)."""
    return x if x.shape[-1] == cols else F.pad(x, (0, cols - x.shape[-1]))


class _KeepDtypes(nn.Module):
    """A module whose own buffers keep their dtypes (and exact values) through `.to(dtype)`, `.half()` and the
    like: only their device follows. A packed layout or a scale cast to another dtype would be garbage."""

    def _apply(self, fn, recurse=True):
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


class _Stack(_KeepDtypes):
    """E weight matrices (N, K) in one low-precision layout, all as buffers. `mm(x, e)`: x (M, K) of any float
    dtype -> x @ W_e^T (M, N) in x's dtype."""

    fmt = ""
    group_size = 0  # int4's input columns per scale and zero

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.n_experts, self.n_out, self.n_in = w.shape

    def tensors(self) -> list[torch.Tensor]:
        """The buffers `stack_mm` reads, in its order for this format."""
        raise NotImplementedError

    def mm(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return stack_mm(self.fmt, self.tensors(), x, e, self.n_out, self.group_size)

    def dequantize(self, e: int = 0) -> torch.Tensor:
        """W_e in fp32 (N, K), exactly the matrix the kernel multiplies by."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.fmt}, experts={self.n_experts}, out={self.n_out}, in={self.n_in}"


class _BF16Stack(_Stack):
    fmt = "bf16"

    def __init__(self, w: torch.Tensor):
        super().__init__(w)
        self.register_buffer("w", w.to(torch.bfloat16).contiguous())

    def tensors(self) -> list[torch.Tensor]:
        return [self.w]

    def dequantize(self, e: int = 0) -> torch.Tensor:
        return self.w[e].float()


class _Int8Stack(_Stack):
    fmt = "int8"

    def __init__(self, w: torch.Tensor):
        super().__init__(w)
        w = w.float()
        # The kernel takes scales in the activations' dtype (bf16): quantize against the rounded scale.
        scale = (w.abs().amax(dim=-1) / 127).clamp_min(1e-12).to(torch.bfloat16)
        q = (w / scale.float()[..., None]).round().clamp(-128, 127).to(torch.int8)
        self.register_buffer("q", _pad2d(q, self.n_out, _round_up(self.n_in, _INT8_K_MULTIPLE)).contiguous())
        self.register_buffer("scale", scale.contiguous())

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scale]

    def dequantize(self, e: int = 0) -> torch.Tensor:
        return self.q[e, :, : self.n_in].float() * self.scale[e].float()[:, None]


class _Int4Stack(_Stack):
    fmt = "int4"

    def __init__(self, w: torch.Tensor, group_size: int):
        super().__init__(w)
        self.group_size = group_size
        self.packed_for = w.device.type
        n, k = _round_up(self.n_out, _INT4_N_MULTIPLE), _round_up(self.n_in, group_size)
        w = _pad2d(w.float(), n, k)
        q, scales_and_zeros = _int4_quantize(w, group_size)
        self.register_buffer("packed", torch.stack([_int4_pack(qe) for qe in q]))
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (E, K/g, N, 2) bf16

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_and_zeros]

    def mm(self, x: torch.Tensor, e: int) -> torch.Tensor:
        self.check_device(x)
        return super().mm(x, e)

    def check_device(self, x: torch.Tensor) -> None:
        if x.device.type != self.packed_for:
            raise RuntimeError(
                f"int4 weights were packed for {self.packed_for} and cannot run on {x.device.type}: "
                "quantize the model after moving it"
            )

    def dequantize(self, e: int = 0) -> torch.Tensor:
        # The packed layout is the kernel's own: read q back through the kernel with scale 1 and zero 8 (then
        # (q - 8) * 1 + 8 = q, exact in bf16), so this is the matrix the kernel sees whatever its layout.
        sz = self.scales_and_zeros[e]
        unit = torch.stack([torch.ones_like(sz[..., 0]), torch.full_like(sz[..., 1], 8)], dim=-1)
        eye = torch.eye(sz.shape[0] * self.group_size, dtype=torch.bfloat16, device=sz.device)
        q = _int4_mm(eye, self.packed[e], self.group_size, unit).float().T  # (N, K)
        s, z = (sz[..., i].float().repeat_interleave(self.group_size, dim=0).T for i in (0, 1))
        return ((q - 8) * s + z)[: self.n_out, : self.n_in]


def _int4_quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (E, N, K) fp32 -> q (E, N, K) int32 in 0..15 and scales_and_zeros (E, K/g, N, 2) bf16, round to nearest
    against the bf16-rounded scale and zero the kernel will use."""
    E, N, K = w.shape
    g = w.view(E, N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = ((g - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(1, 2).contiguous()  # (E, K/g, N, 2)
    return q.view(E, N, K).to(torch.int32), scales_and_zeros


def _int4_pack(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) int32 in 0..15 -> the packed layout of q's device."""
    if q.is_cuda:
        inner_k_tiles = next(t for t in (8, 4, 2) if q.shape[1] % (t * 16) == 0)
        return aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), inner_k_tiles)
    return aten._convert_weight_to_int4pack_for_cpu(q, 2)  # inner_k_tiles: only the CUDA layout uses it


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return aten._weight_int4pack_mm(x, packed, group_size, sz)
    return aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)


def stack_mm(fmt: str, t: list[torch.Tensor], x: torch.Tensor, e: int, n_out: int, group_size: int) -> torch.Tensor:
    """x (M, K) of any float dtype @ W_e^T -> (M, n_out) in x's dtype, W_e read from a stack's tensors `t` (see
    `_Stack.tensors`) in format fmt. A function of tensors, so a custom op can run it too."""
    if fmt == "bf16":
        return F.linear(x.to(torch.bfloat16), t[0][e]).to(x.dtype)
    if fmt == "int8":
        q, scale = t
        xb = _pad_cols(x.to(torch.bfloat16), q.shape[-1])
        if xb.is_cuda and not _INT8_CUDA:
            # CUDA fallback only (no int8 kernel in this build): dequantizes W_e per call.
            return F.linear(xb, q[e].to(xb.dtype) * scale[e][:, None]).to(x.dtype)
        return aten._weight_int8pack_mm(xb.contiguous(), q[e], scale[e]).to(x.dtype)
    packed, scales_and_zeros = t
    xb = _pad_cols(x.to(torch.bfloat16), group_size * scales_and_zeros.shape[1])
    y = _int4_mm(xb.contiguous(), packed[e], group_size, scales_and_zeros[e])
    return (y if y.shape[1] == n_out else y[:, :n_out]).to(x.dtype)


def _quant_experts_few(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    fmt: str,
    gate_up: list[torch.Tensor],
    down: list[torch.Tensor],
    inter_dim: int,
    group_size: int,
) -> torch.Tensor:
    """The routed experts of a few tokens (a decode step): token n runs its k experts indices[n] directly,
    weighted by weights[n]. Registered below as the custom op `quant_experts_few`, which a compiled block calls
    without a graph break (the loop reads the routing on the host, which a graph cannot)."""
    y = torch.zeros_like(x)
    for n, (ws, es) in enumerate(zip(weights.tolist(), indices.tolist())):
        xn = x[n : n + 1]
        for w, e in zip(ws, es):
            y[n : n + 1].add_(_expert(fmt, gate_up, down, inter_dim, group_size, e, xn), alpha=w)
    return y


quant_experts_few = torch.library.custom_op("nanoseek::quant_experts_few", mutates_args=())(_quant_experts_few)


@quant_experts_few.register_fake
def _(x, weights, indices, fmt, gate_up, down, inter_dim, group_size):
    return torch.empty_like(x)


def _expert(
    fmt: str, gate_up: list[torch.Tensor], down: list[torch.Tensor], inter_dim: int, group_size: int, e: int, x
):
    """Expert e on its tokens x (n, D): down(silu(gate x) * up x), gate and up one packed (2I, D) matrix."""
    gate, up = stack_mm(fmt, gate_up, x, e, 2 * inter_dim, group_size).split(inter_dim, dim=-1)
    return stack_mm(fmt, down, F.silu(gate) * up, e, x.shape[-1], group_size)


def _quant_experts_sorted(
    x: torch.Tensor,
    counts: torch.Tensor,
    fmt: str,
    gate_up: list[torch.Tensor],
    down: list[torch.Tensor],
    inter_dim: int,
    group_size: int,
) -> torch.Tensor:
    """The routed experts of many tokens sorted by expert (counts (E,) tokens each): each expert that received
    tokens runs once on its slice. A custom op for the same reason as quant_experts_few (the counts are read
    on the host)."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:  # only experts that received tokens do any work
            outs.append(_expert(fmt, gate_up, down, inter_dim, group_size, e, x[start : start + n]))
            start += n
    return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


quant_experts_sorted = torch.library.custom_op("nanoseek::quant_experts_sorted", mutates_args=())(_quant_experts_sorted)


@quant_experts_sorted.register_fake
def _(x, counts, fmt, gate_up, down, inter_dim, group_size):
    return torch.empty_like(x)


def _make_stack(w: torch.Tensor, fmt: str, group_size: int) -> _Stack:
    """w (E, N, K) -> its stack in fmt."""
    with torch.no_grad():
        if fmt == "bf16":
            return _BF16Stack(w)
        if fmt == "int8":
            return _Int8Stack(w)
        return _Int4Stack(w, group_size)


class QuantLinear(_KeepDtypes):
    """An inference-only nn.Linear with a low-precision weight: forward(x (..., in)) -> (..., out) in x's dtype.
    The bias, if any, stays fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, group_size: int = 64):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = _make_stack(weight.detach()[None], fmt, group_size)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @property
    def fmt(self) -> str:
        return self.packed.fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        y = self.packed.mm(x.reshape(-1, self.in_features), 0)
        if self.bias is not None:
            y = (y.float() + self.bias).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (out, in) exactly as the kernel sees it (for MLA's absorbed W_UK/W_UV, once)."""
        return self.packed.dequantize(0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantExperts(nn.Module):
    """`moe.Experts` with low-precision weights: the same `forward(x, counts)` and `one(e, x)`.
    gate_up stacks E matrices (2I, D) (gate's rows, then up's), down E matrices (D, I)."""

    def __init__(self, experts: Experts, fmt: str, group_size: int = 64):
        super().__init__()
        self.n_experts, self.inter_dim, self.dim = experts.gate_proj.shape
        # gate and up read the same x: one (2I, D) matrix per expert, one kernel call instead of two (a decode
        # step is a few rows, where the per-call cost is most of a small matrix's time).
        gate_up = torch.cat((experts.gate_proj.detach(), experts.up_proj.detach()), dim=1)
        self.gate_up = _make_stack(gate_up, fmt, group_size)
        self.down = _make_stack(experts.down_proj.detach(), fmt, group_size)

    @property
    def fmt(self) -> str:
        return self.down.fmt

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on its tokens x (n, D) -> (n, D): down(silu(gate x) * up x)."""
        return _expert(*self._kernel_args(x), e, x)

    def few_tokens(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x (N, D) with routing weights and indices (N, k) -> the weighted sum of each token's experts (N, D)."""
        run = quant_experts_few if torch.compiler.is_compiling() else _quant_experts_few  # as moe.Experts does
        return run(x, weights, indices, *self._kernel_args(x))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (M, D) tokens sorted by expert; counts: (E,) tokens per expert. Returns (M, D)."""
        run = quant_experts_sorted if torch.compiler.is_compiling() else _quant_experts_sorted
        return run(x, counts, *self._kernel_args(x))

    def _kernel_args(self, x: torch.Tensor) -> tuple:
        """(fmt, gate_up tensors, down tensors, inter_dim, group_size): what the expert kernels read."""
        if isinstance(self.down, _Int4Stack):
            self.down.check_device(x)
        return self.fmt, self.gate_up.tensors(), self.down.tensors(), self.inter_dim, self.down.group_size

    def dequantize_expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's (gate (I, D), up (I, D), down (D, I)) in fp32, as the kernels see them."""
        gate, up = self.gate_up.dequantize(e).split(self.inter_dim)
        return gate, up, self.down.dequantize(e)


def _check_args(model: nn.Module, fmt: str, group_size: int) -> None:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; formats: {', '.join(WEIGHT_FORMATS)}")
    if fmt == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    done = getattr(model, "weight_format", "fp32")
    if done != "fp32" and fmt != "fp32":
        raise ValueError(f"the model is already quantized to {done}; load it again to quantize to {fmt}")


def _quantize_children(parent: nn.Module, fmt: str, group_size: int) -> None:
    for name, child in list(parent.named_children()):
        if isinstance(child, nn.Linear):
            setattr(parent, name, QuantLinear(child.weight, child.bias, fmt, group_size))
        elif isinstance(child, Experts):
            setattr(parent, name, QuantExperts(child, fmt, group_size))


def quantize_model(model: nn.Module, fmt: str, group_size: int = 64) -> nn.Module:
    """Replace, in place, every nn.Linear under model.layers, model.mtp and model.lm_head by a QuantLinear and
    every routed-expert stack by a QuantExperts, in `fmt` (one of WEIGHT_FORMATS; "fp32" changes nothing).
    `group_size`: int4's input columns per scale/zero (32, 64 or 128). The fp32 originals are dropped one
    layer at a time, so peak memory is the model plus one layer. Returns the model, `weight_format` set."""
    _check_args(model, fmt, group_size)
    if fmt != "fp32":
        for root in (model.layers, model.mtp):
            # Parents only: a list holding the Linears themselves would keep every original alive to the end.
            for parent in [m for m in root.modules() if not isinstance(m, (nn.Linear, Experts))]:
                _quantize_children(parent, fmt, group_size)
        if isinstance(model.lm_head, nn.Linear):  # a tied head gets its own copy; the embedding stays fp32
            model.lm_head = QuantLinear(model.lm_head.weight, model.lm_head.bias, fmt, group_size)
        for attn in (m for m in model.modules() if isinstance(m, MLA)):
            attn.kv_b_weight()  # the dense copy absorbed decoding needs, made now rather than in a (compiled) step
    model.weight_format = fmt
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed bytes for quantized weights), shared tensors counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
