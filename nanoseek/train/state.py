"""Training-state checkpoints: a Hugging Face model directory plus everything needed to resume exactly.

    path = save_checkpoint(run_dir, step, model, tokenizer=tok, optimizer=opt, scheduler=sched,
                           state={"data_position": 4096}, keep_last=3)
    path = latest_checkpoint(run_dir)                 # None when there is none
    state = load_checkpoint(path, model, optimizer=opt, scheduler=sched)   # state["step"], state["data_position"]

Layout of `run_dir/checkpoints/step_00000100/`:
    config.json, model.safetensors, generation_config.json   the model (nanoseek.from_pretrained and
    tokenizer.json, tokenizer_config.json                     transformers both load the directory as is)
    optimizer.safetensors    optimizer state tensors, named "<parameter name>::<key>" (exp_avg, ...)
    rng.safetensors          torch RNG state of every rank (and CUDA's), numpy's
    trainer_state.json       step, the caller's `state`, param groups, scheduler, Python RNG; written last

Atomic (`nanoseek.fileio.atomic_directory`): everything goes into `checkpoints/.tmp-step_00000100-<pid>/`,
each file fsynced, then one `os.rename` makes the directory appear whole; a process killed at any point
leaves either the previous checkpoints only, or the new one complete. `latest_checkpoint` ignores `.tmp-*`
leftovers (the next save removes them). Nothing is pickled: tensors go to safetensors, the rest to JSON.

Checkpoints do not depend on the world size: FSDP shards and expert-parallel slices, and their optimizer
state, are gathered to full tensors before writing and cut to this rank's part again on load. Under
torch.distributed every rank calls `save_checkpoint` (the gathers are collective); rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nanoseek.checkpoint.hf import CheckpointError, from_pretrained, save_pretrained
from nanoseek.fileio import atomic_directory
from nanoseek.model.transformer import build_model
from nanoseek.train import parallel

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
PREFIX = "step_"
FORMAT_VERSION = 1


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and foreign directories ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / STATE_FILE).exists():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---- save ----------------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    *,
    tokenizer=None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    state: dict[str, Any] | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write checkpoint `step` of `run_dir` atomically and keep only the newest `keep_last` (None: all).

    `state` is the caller's own JSON-serializable resume state (data position, config, ...).
    Returns the checkpoint directory. Under torch.distributed: collective, rank 0 writes, all get the path.
    """
    if state is not None:
        _check_json(state)
    plain = parallel.unwrap(model)
    final = checkpoint_path(run_dir, step)
    model_tensors = parallel.gather_full(plain, dict(plain.state_dict()))
    optim_tensors, groups = _optimizer_tensors(plain, optimizer) if optimizer is not None else ({}, None)
    optim_tensors = {k: v.cpu().contiguous() for k, v in parallel.gather_full(plain, optim_tensors).items()}
    rng_tensors = _rng_tensors()
    if parallel.rank() == 0:
        root = final.parent
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # leftovers of a killed save
            shutil.rmtree(stale, ignore_errors=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "state": state or {},
            "optimizer": groups,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "python_rng": _python_rng_state(),
            "world_size": parallel.world_size(),
        }
        _check_json(meta)
        # Re-saving a step (after a resume) replaces the old directory; a kill leaves .tmp-* behind.
        with atomic_directory(final) as tmp:
            _write_model(plain, model_tensors, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if optim_tensors:
                save_file(optim_tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
            save_file(rng_tensors, str(tmp / RNG_FILE), metadata={"format": "pt"})
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if keep_last is not None:
            for old in list_checkpoints(run_dir)[: -max(keep_last, 1)]:
                shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return final


def _write_model(plain: nn.Module, full_state: dict[str, torch.Tensor], out: Path) -> None:
    """save_pretrained of the model with its full (gathered) weights."""
    if not parallel.is_sharded(plain):
        save_pretrained(plain, out)
        return
    with torch.device("meta"):
        full = build_model(plain.config)
    full.load_state_dict(full_state, assign=True)
    full.tie_weights()
    save_pretrained(full, out)


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Optimizer state as {"<param name>::<key>": tensor} plus JSON param groups naming their parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [names[id(p)] for p in group["params"]]
        groups.append(g)
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    value = torch.tensor(value)
                tensors[f"{names[id(p)]}::{key}"] = value.detach()
    return tensors, groups


def _rng_tensors() -> dict[str, torch.Tensor]:
    """torch's CPU RNG of every rank (gathered), CUDA's of this device, numpy's global state."""
    cpu = torch.get_rng_state()
    out = {}
    if parallel.is_distributed():
        parts = [torch.empty_like(cpu) for _ in range(parallel.world_size())]
        torch.distributed.all_gather(parts, cpu)
        out.update({f"torch_cpu.rank{r}": t for r, t in enumerate(parts)})
    else:
        out["torch_cpu.rank0"] = cpu
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"torch_cuda.rank{parallel.rank()}"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    out["numpy.rest"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy.gauss"] = torch.tensor([gauss], dtype=torch.float64)
    return out


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


# ---- load ----------------------------------------------------------------------------------------
def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore model weights (and the MoE correction biases), optimizer, scheduler and RNG state from a
    checkpoint directory. Returns the saved `state` with "step" added."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    meta_file = path / STATE_FILE
    if not meta_file.exists():
        raise CheckpointError(
            f"{path} is not a training checkpoint (no {STATE_FILE}); "
            "a plain model directory can only initialize a run, not resume one"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is not valid JSON: {e}") from None
    plain = parallel.unwrap(model)
    saved = from_pretrained(path)  # validates every tensor against config.json
    if _shape_fields(saved.config) != _shape_fields(plain.config):
        raise CheckpointError(f"{path} holds a model of a different config than the one being trained")
    with torch.no_grad():
        own = plain.state_dict()
        for name, value in saved.state_dict().items():
            if name in own:
                own[name].copy_(parallel.local_slice(plain, name, value.to(own[name].dtype), like=own[name]))
    del saved
    if optimizer is not None:
        _load_optimizer(path, plain, optimizer, meta.get("optimizer"))
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng:
        _restore_rng(path, meta)
    return {**meta.get("state", {}), "step": int(meta["step"])}


def _load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, groups) -> None:
    file = path / OPTIMIZER_FILE
    if groups is None or not file.exists():
        raise CheckpointError(f"{path} has no optimizer state to resume from")
    params = dict(model.named_parameters())
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{path} has {len(groups)} optimizer param groups, the optimizer {len(optimizer.param_groups)}"
        )
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            name, _, field = key.partition("::")
            if name not in params:
                raise CheckpointError(f"optimizer state for unknown parameter {name} in {file}")
            value = f.get_tensor(key)
            value = parallel.local_slice(model, name, value, like=params[name] if value.dim() else None)
            # Optimizer.load_state_dict moves each value to its parameter's device (and keeps "step" where
            # the optimizer wants it).
            state.setdefault(index[id(params[name])], {})[field] = value
    param_groups = []
    for g, live in zip(groups, optimizer.param_groups):
        if [id(params[n]) for n in g["params"]] != [id(p) for p in live["params"]]:
            raise CheckpointError(f"{path}: optimizer parameter groups do not match the model's parameters")
        g = dict(g, params=[index[id(params[n])] for n in g["params"]])
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        param_groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _restore_rng(path: Path, meta: dict) -> None:
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    file = path / RNG_FILE
    if not file.exists():
        return
    with safe_open(file, framework="pt") as f:
        keys = set(f.keys())
        own = f"torch_cpu.rank{parallel.rank()}"
        if own in keys:
            torch.set_rng_state(f.get_tensor(own))
        cuda = f"torch_cuda.rank{parallel.rank()}"
        if cuda in keys and torch.cuda.is_available():
            torch.cuda.set_rng_state(f.get_tensor(cuda))
        if "numpy.keys" in keys:
            pos, has_gauss = f.get_tensor("numpy.rest").tolist()
            np.random.set_state(
                (
                    "MT19937",
                    f.get_tensor("numpy.keys").numpy().astype(np.uint32),
                    pos,
                    has_gauss,
                    float(f.get_tensor("numpy.gauss")[0]),
                )
            )


# ---- helpers -------------------------------------------------------------------------------------
def _shape_fields(cfg) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for k in ("extra", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id"):
        d.pop(k)
    return d


def _check_json(obj: Any) -> None:
    try:
        json.dumps(obj)
    except TypeError as e:
        raise CheckpointError(f"checkpoint state must be JSON-serializable: {e}") from None
