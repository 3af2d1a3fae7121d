"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded).

    model = nanoseek.from_pretrained("path/to/DeepSeek-V3", device="cpu", dtype=torch.bfloat16)
    model.save_pretrained("out/")  # loads in transformers.AutoModelForCausalLM, no remote code

Weights are read from safetensors only: a directory holding only pickle files (.bin, .pt) is refused,
never unpickled. Names on disk are transformers' (`model.layers.N.mlp.experts.J.gate_proj.weight`, one
tensor per expert); in memory the routed experts are stacked (E, out, in) for grouped matmuls, and the
MTP modules sit in `mtp.K` instead of `model.layers.{num_hidden_layers + K}`. DeepSeek's FP8 release
(float8_e4m3fn weights with a `weight_scale_inv` per 128x128 block, fp32 or V3.1's power-of-two UE8M0 scales
in float8_e8m0fnu) is dequantized on load. A V3 checkpoint
whose config counts MTP layers that it does not hold (every one transformers writes: it builds none) loads
without MTP, with one warning.

A checkpoint is checked before it is trusted (`trust.py`): its config's size against the device's memory
before any module is built, every file it names for staying inside the directory and being a regular
file, and every tensor for NaN/Inf as it loads (an error unless `allow_nonfinite=True`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.checkpoint.trust import (
    INDEX_NAME,
    CheckpointError,
    check_fits,
    checked_file,
    nonfinite_message,
    read_index,
    read_json,
)
from nanoseek.fileio import atomic_write, atomic_write_json
from nanoseek.model.config import ConfigError, ModelConfig
from nanoseek.model.transformer import Transformer, build_model

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
SINGLE_NAME = "model.safetensors"


# ---- name mapping --------------------------------------------------------------------------------
_EXPERT = re.compile(r"^(layers|mtp)\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")


def _hf_layer_prefix(cfg: ModelConfig, native: str) -> str:
    """'layers.3.x' -> 'model.layers.3.x'; 'mtp.0.x' -> 'model.layers.{L}.x'."""
    kind, idx, rest = native.split(".", 2)
    layer = int(idx) + (cfg.num_hidden_layers if kind == "mtp" else 0)
    return f"model.layers.{layer}.{rest}"


# DeepSeek-V4 checkpoints keep DeepSeek's own names (transformers renames them on load and back on save): our
# module names are transformers' in-memory ones, renamed part by part.
_V4_PARTS = {
    "self_attn": "attn",
    "mlp": "ffn",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_a_proj": "wq_a",
    "q_a_norm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_proj": "wkv",
    "kv_norm": "norm",
    "gate_proj": "wgate",
    "o_a_proj": "wo_a",
    "o_b_proj": "wo_b",
    "sinks": "attn_sink",
    "position_bias": "ape",
    "e_score_correction_bias": "bias",
}
_V4_FFN = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def v4_hf_names(native: str, n_experts: int) -> list[str]:
    """DeepSeek-V4's on-disk name(s) of one native entry: `layers.0.self_attn.q_a_proj.weight` ->
    `model.layers.0.attn.wq_a.weight`, `layers.0.attn_hc.fn` -> `model.layers.0.hc_attn_fn`, stacked experts
    -> `model.layers.0.ffn.experts.J.w1.weight`, `lm_head.weight` -> `head.weight`. MTP modules keep DeepSeek's
    `mtp.K.` prefix (`mtp.0.e_proj.weight`, `mtp.0.hc_head_fn`), which transformers skips on load."""
    parts = native.split(".")
    if native == "lm_head.weight":
        return ["head.weight"]
    root = "" if parts[0] == "mtp" else "model."
    if parts[0] in ("layers", "mtp") and parts[2] in ("attn_hc", "ffn_hc"):
        return [f"{root}{parts[0]}.{parts[1]}.hc_{parts[2].removesuffix('_hc')}_{parts[3]}"]
    if parts[0] == "mtp" and parts[2] == "hc_head":
        return [f"mtp.{parts[1]}.hc_head_{parts[3].removeprefix('hc_')}"]
    table = {**_V4_PARTS, **_V4_FFN} if "experts" in native else _V4_PARTS
    name = root + ".".join(table.get(p, p) for p in parts)
    if _EXPERT.match(native):
        prefix, leaf = name.rsplit(".", 1)
        return [f"{prefix}.{j}.{leaf}.weight" for j in range(n_experts)]
    return [name]


def hf_names(cfg: ModelConfig, native: str, n_experts: int) -> list[str]:
    """The on-disk tensor name(s) behind one native state-dict entry (several for stacked experts)."""
    if cfg.model_type == "deepseek_v4":
        return v4_hf_names(native, n_experts)
    m = _EXPERT.match(native)
    if m:
        prefix = _hf_layer_prefix(cfg, f"{m[1]}.{m[2]}.mlp.experts")
        return [f"{prefix}.{j}.{m[3]}.weight" for j in range(n_experts)]
    if native.startswith(("layers.", "mtp.")):
        return [_hf_layer_prefix(cfg, native)]
    if native == "lm_head.weight":
        return [native]
    return [f"model.{native}"]


def _native_state(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict without derived entries (rope tables, tied head)."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def to_hf_state_dict(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs for the whole model, experts unstacked, MTP shared weights copied."""
    cfg = model.config
    for native, t in _native_state(model).items():
        names = hf_names(cfg, native, cfg.n_routed_experts)
        if len(names) == 1:
            yield names[0], t
        else:
            yield from zip(names, t.unbind(0))
    # Released V3 checkpoints store the (shared) embedding and head again inside each MTP layer;
    # vLLM and SGLang read them from there.
    for k in range(0 if cfg.model_type == "deepseek_v4" else len(model.mtp)):  # V4's MTP holds no copies
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        yield f"{prefix}.embed_tokens.weight", model.embed_tokens.weight.clone()
        yield f"{prefix}.shared_head.head.weight", model.lm_head.weight.clone()


# ---- reading -------------------------------------------------------------------------------------
class SafetensorsDir:
    """Lazy tensor access over the safetensors files of a checkpoint directory."""

    def __init__(self, path: Path):
        self.path = path
        # Every file is checked (inside the directory, a regular file) before safetensors opens it.
        if os.path.lexists(path / INDEX_NAME):
            weight_map = read_index(path)
            files = {fname: checked_file(path, fname, INDEX_NAME) for fname in sorted(set(weight_map.values()))}
            self.where = {name: files[fname] for name, fname in weight_map.items()}
        elif os.path.lexists(path / SINGLE_NAME):
            single = checked_file(path, SINGLE_NAME)
            self.where = {name: single for name in self._keys(single)}
        else:
            files = [checked_file(path, f.name) for f in sorted(path.glob("*.safetensors"))]
            if not files:
                pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
                if pickles:
                    raise CheckpointError(
                        f"{path} holds only pickle weights ({', '.join(pickles)}); nanoseek loads safetensors "
                        "only, because unpickling runs code from the file. Convert it with safetensors first."
                    )
                raise CheckpointError(f"no safetensors weights in {path}")
            self.where = {name: f for f in files for name in self._keys(f)}
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _keys(f: Path) -> list[str]:
        try:
            with safe_open(f, framework="pt") as h:
                return list(h.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"tensor {name} in {f.name} cannot be read ({e})") from None

    def get_weight(self, name: str, block: tuple[int, int]) -> torch.Tensor:
        """A tensor, dequantized if it is FP8 with a block-wise `weight_scale_inv` beside it."""
        t = self.get(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name.removesuffix("weight") + "weight_scale_inv"
            if scale_name not in self:
                raise CheckpointError(f"FP8 tensor {name} has no {scale_name} beside it in {self.where[name].name}")
            t = dequantize_fp8(t, self.get(scale_name), block)
        return t


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """weight (M, N) fp8 x scale_inv (ceil(M/bm), ceil(N/bn)) -> fp32: each block times its scale."""
    M, N = weight.shape
    bm, bn = block
    expected = (-(-M // bm), -(-N // bn))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"weight_scale_inv of shape {tuple(scale_inv.shape)} does not tile a {M}x{N} "
            f"weight in {bm}x{bn} blocks (expected {expected})"
        )
    scale = scale_inv.float().repeat_interleave(bm, 0)[:M].repeat_interleave(bn, 1)[:, :N]
    return weight.float() * scale


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {p} does not exist")
    return p


def _config_json(root: Path) -> Any:
    if not os.path.lexists(root / "config.json"):
        raise ConfigError(f"no config.json at {root / 'config.json'}")
    try:
        return read_json(root, "config.json")
    except CheckpointError as e:
        raise ConfigError(str(e)) from None  # every problem of config.json is a ConfigError


def _read_config(root: Path) -> tuple[ModelConfig, dict[str, Any]]:
    raw = _config_json(root)
    if not isinstance(raw, dict):
        raise ConfigError(f"{root / 'config.json'} must hold a JSON object")
    return ModelConfig.from_hf_dict(raw), raw


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The validated config of a checkpoint directory (config.json checked as every checkpoint file is)."""
    return _read_config(_resolve(path))[0]


def _fp8_block(raw: dict[str, Any]) -> tuple[int, int]:
    qc = raw.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise ConfigError(f"quantization_config must be an object, got {qc!r}")
    block = qc.get("weight_block_size") or (128, 128)
    ok = isinstance(block, (list, tuple)) and len(block) == 2
    if not ok or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 1 << 16 for b in block):
        raise ConfigError(f"quantization_config.weight_block_size must be two sizes in 1..65536, got {block!r}")
    return int(block[0]), int(block[1])


def from_pretrained(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    allow_nonfinite: bool = False,
) -> Transformer:
    """Build the model of `path/config.json` and fill it from the directory's safetensors.

    dtype: parameter dtype (default: float32, the compute dtype on CPU). The MoE correction bias
    stays float32. Every expected tensor must be present with its exact shape; unknown tensors are
    an error too, so a mismatched checkpoint never loads silently. The weights must fit the device's
    memory (checked before anything is built) and be finite: a tensor holding NaN or Inf is an error
    naming it, unless allow_nonfinite (then a warning names them).
    """
    root = _resolve(path)
    cfg, raw = _read_config(root)
    block = _fp8_block(raw)
    dtype = dtype or torch.float32
    check_fits(cfg, dtype, device)
    files = SafetensorsDir(root)
    cfg = _without_absent_mtp(cfg, files, root)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.to(dtype)
    used: set[str] = set()
    nonfinite: list[str] = []
    state = _native_state(model)
    with torch.no_grad():
        for native, param in state.items():
            names = hf_names(cfg, native, cfg.n_routed_experts)
            for name in names:
                if name not in files:
                    raise CheckpointError(f"tensor {name} is missing from the checkpoint in {root}")
            parts = [files.get_weight(n, block) for n in names]
            expected = param.shape[1:] if len(names) > 1 else param.shape
            for name, t in zip(names, parts):
                if tuple(t.shape) != tuple(expected):
                    raise CheckpointError(
                        f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(expected)} "
                        f"from config.json ({files.where[name].name})"
                    )
            for name, t in zip(names, parts):
                _check_finite(name, t, f"in {files.where[name].name}", allow_nonfinite, nonfinite)
            value = torch.stack(parts) if len(names) > 1 else parts[0]
            param.copy_(value.to(param.dtype))
            if value.is_floating_point() and torch.finfo(param.dtype).max < torch.finfo(value.dtype).max:
                _check_finite(native, param, f"cast to {param.dtype}", allow_nonfinite, nonfinite)
            used.update(names)
    _check_unexpected(cfg, files, used, root)
    if nonfinite:
        shown = ", ".join(nonfinite[:3]) + (" ..." if len(nonfinite) > 3 else "")
        warnings.warn(f"loaded {len(nonfinite)} tensor(s) holding NaN or Inf from {root} ({shown})", stacklevel=2)
    for moe in model.moe_layers():
        moe.tokens_per_expert.zero_()
    return model.eval()


def _without_absent_mtp(cfg: ModelConfig, files: SafetensorsDir, root: Path) -> ModelConfig:
    """transformers builds no MTP module, so a DeepSeek-V3 (or V4) checkpoint it writes keeps the config's
    `num_nextn_predict_layers` but has no MTP layer at all: such a checkpoint loads without MTP, with one
    warning (speculative decoding is then unavailable). An MTP layer present in part is still an error."""
    first = "mtp.0." if cfg.model_type == "deepseek_v4" else f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers == 0 or any(n.startswith(first) for n in files.where):
        return cfg
    warnings.warn(
        f"{root}: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the checkpoint has "
        f"no MTP layer ({first}*): loaded without MTP, so speculative decoding is unavailable",
        stacklevel=3,
    )
    return dataclasses.replace(cfg, num_nextn_predict_layers=0)


def _check_finite(name: str, t: torch.Tensor, where: str, allow: bool, found: list[str]) -> None:
    message = nonfinite_message(name, t, where)
    if message and not allow:
        raise CheckpointError(message)
    if message:
        found.append(name)


def _check_unexpected(cfg: ModelConfig, files: SafetensorsDir, used: set[str], root: Path) -> None:
    mtp_shared = {
        f"model.layers.{cfg.num_hidden_layers + k}.{n}"
        for k in range(cfg.num_nextn_predict_layers)
        for n in ("embed_tokens.weight", "shared_head.head.weight")
    }
    extra = [
        n
        for n in files.where
        if n not in used
        and n not in mtp_shared
        and not n.endswith(("weight_scale_inv", "rotary_emb.inv_freq"))
        and files.get(n).numel() > 0  # transformers writes zero-width shared experts when there are none
    ]
    if extra:
        shown = ", ".join(sorted(extra)[:5]) + (" ..." if len(extra) > 5 else "")
        raise CheckpointError(f"{len(extra)} tensor(s) in {root} that config.json does not account for: {shown}")


# ---- writing -------------------------------------------------------------------------------------
def save_pretrained(
    model: Transformer, path: str | os.PathLike, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3
) -> None:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes).

    Each file is written under a temporary name and renamed into place, so a kill mid-save never
    leaves a truncated file under a real name. dtype: storage dtype (default: the parameters').
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in to_hf_state_dict(model):
        if name.endswith(("e_score_correction_bias", ".gate.bias")):  # .gate.bias: V4's name for it
            t = t.float()  # must stay fp32 (HF keeps it in _keep_in_fp32_modules_strict)
        elif dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = (
            t.detach().contiguous().cpu().clone() if _shares_storage(t) else t.detach().contiguous().cpu()
        )
        size += nbytes
    for stale in list(root.glob("model*.safetensors")) + [root / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(root / SINGLE_NAME, lambda p: save_file(shards[0], str(p), metadata=meta))
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(root / fname, lambda p, s=shard: save_file(s, str(p), metadata=meta))
            weight_map.update({n: fname for n in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_json(root / INDEX_NAME, index, indent=2)
    storage = dtype or next(model.parameters()).dtype
    out_cfg = cfg.replace(torch_dtype=str(storage).replace("torch.", ""))
    atomic_write(root / "config.json", lambda p: out_cfg.to_json(p))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    atomic_write_json(root / "generation_config.json", gen, indent=2)


def _shares_storage(t: torch.Tensor) -> bool:
    # Views (unbound experts, tied/copied MTP embeddings) must own their memory for safetensors.
    return t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0


__all__ = ["from_pretrained", "save_pretrained", "load_config", "CheckpointError", "ConfigError", "dequantize_fp8"]
