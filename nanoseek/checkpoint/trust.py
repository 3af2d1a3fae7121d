"""Checks that make a checkpoint directory from anyone safe to load: run before a file is opened or a
module is built, each failing with a CheckpointError (or the config's ConfigError) that names the file,
field or tensor.

- Size: the parameter count of config.json, by arithmetic (`model.stats.parameter_count`), times the
  bytes of the load dtype must fit the memory of the device (host RAM, capped by a cgroup limit; a GPU's
  total memory). The config's fields are bounded first (`ModelConfig.validate`), so nothing absurd is
  ever counted or built, even on the meta device.
- Paths: every file a checkpoint names (an index's shards, config.json) is a plain name inside the
  directory: no absolute path, no `..`, no symlink resolving outside it (except a Hugging Face hub cache
  snapshot's links into its own `blobs/`). Only regular files are opened: a FIFO, socket, device or
  directory under a weight file's name is refused from os.stat, which never blocks.
- The shard index is a JSON object whose `weight_map` maps tensor names to `.safetensors` file names.
- Weights are finite: `check_finite` on each tensor as it loads (after FP8 dequantization, and again
  after a cast to a narrower dtype such as float16), unless the caller allows NaN/Inf.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import torch

from nanoseek.errors import NanoseekError
from nanoseek.model.config import ModelConfig
from nanoseek.model.stats import parameter_count

INDEX_NAME = "model.safetensors.index.json"
MAX_JSON_BYTES = 256 * 1024**2  # DeepSeek-V3's index, ~91k tensors, is under 10 MiB
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
SIZE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "vocab_size",
    "n_routed_experts",
    "moe_intermediate_size",
    "intermediate_size",
    "num_attention_heads",
)


class CheckpointError(NanoseekError):
    """A checkpoint directory that cannot be loaded; the message names the file or tensor."""


# ---- size ----------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit, div in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def host_memory() -> int | None:
    """Physical memory, or the process's cgroup limit when that is lower; None if neither can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for f in CGROUP_LIMITS:
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            limits.append(int(text))
    return min(limits) if limits else None


def device_memory(device: str | torch.device) -> tuple[int | None, str]:
    """(bytes the device can hold, how to call it in a message); None where it cannot be told (meta)."""
    dev = torch.device(device)
    if dev.type == "meta":
        return None, "the meta device"
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    return host_memory(), "this machine"


def check_fits(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> None:
    """Refuse a model whose weights alone exceed the device's memory, before anything is built."""
    limit, where = device_memory(device)
    if limit is None:
        return
    n = parameter_count(cfg)
    need = n * dtype.itemsize
    if need > limit:
        shape = ", ".join(f"{f}={getattr(cfg, f):,}" for f in SIZE_FIELDS)
        raise CheckpointError(
            f"config.json describes {n:,} parameters ({shape}): the model would need {human_bytes(need)} "
            f"of {str(dtype).removeprefix('torch.')} weights; {where} has {human_bytes(limit)}"
        )


# ---- paths ---------------------------------------------------------------------------------------
def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _allowed_roots(root: Path) -> list[Path]:
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # a hub cache snapshot links its files into ../../blobs
        roots.append(real.parent.parent / "blobs")
    return roots


def checked_file(root: Path, name: Any, named_in: str | None = None) -> Path:
    """root/name after checking that `name` is a plain relative path, that it (and any symlink it is)
    resolves inside root, and that it is an existing regular file. Never opens the file."""
    where = f", named in {named_in}," if named_in else ""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{name!r}{where} is not a file name")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise CheckpointError(f"{name}{where} is an absolute path; a checkpoint names files inside its directory")
    if ".." in Path(name).parts or ".." in name.split("\\"):
        raise CheckpointError(f"{name}{where} points outside the checkpoint directory {root} ('..')")
    path = root / name
    if not os.path.lexists(path):
        raise CheckpointError(f"{name}{where} is missing from {root}")
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in _allowed_roots(root)):
        raise CheckpointError(f"{name}{where} is a link to {real}, outside the checkpoint directory {root}")
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise CheckpointError(f"{name}{where} in {root} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{name} in {root} is {_kind(mode)}, not a regular file")
    return path


def read_json(root: Path, name: str, named_in: str | None = None) -> Any:
    """A small JSON file inside the checkpoint, checked as `checked_file` checks it."""
    path = checked_file(root, name, named_in)
    size = os.stat(path).st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{name} in {root} is {human_bytes(size)}, over the {human_bytes(MAX_JSON_BYTES)} limit")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def read_index(root: Path) -> dict[str, str]:
    """The weight_map of root's shard index, every entry a tensor name -> `.safetensors` file name."""
    data = read_json(root, INDEX_NAME)
    if not isinstance(data, dict):
        raise CheckpointError(f"{INDEX_NAME} must hold a JSON object, got {type(data).__name__}")
    if "weight_map" not in data:
        raise CheckpointError(f"{INDEX_NAME} has no weight_map")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{INDEX_NAME}: weight_map must map tensor names to file names, got {type(weight_map).__name__}"
        )
    for tensor, fname in weight_map.items():
        if not tensor:
            raise CheckpointError(f"{INDEX_NAME}: weight_map has an empty tensor name")
        if not isinstance(fname, str) or not fname.endswith(".safetensors"):
            raise CheckpointError(f"{INDEX_NAME}: weight_map[{tensor!r}] = {fname!r} is not a .safetensors file name")
    return weight_map


# ---- values --------------------------------------------------------------------------------------
def nonfinite_message(name: str, t: torch.Tensor, where: str) -> str | None:
    """None if every value of t is finite; else a message naming the tensor and counting the bad values."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return (
        f"tensor {name} {where} holds {nan:,} NaN and {inf:,} infinite values (of {t.numel():,}); a model with "
        "them computes garbage. Pass allow_nonfinite=True (CLI: --allow-nonfinite-weights) to load it anyway"
    )
