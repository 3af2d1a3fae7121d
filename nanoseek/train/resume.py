"""The run directory and resume checks: a fresh run never overwrites another, a resumed run keeps every setting
that shapes its loss curve, and the model, dataset and parallelism fit together before any work starts.

RUN_DIR/run.json records how the run was started (train and model config, dataset, tokenizer hash, world size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nanoseek.fileio import atomic_write_json
from nanoseek.model.config import ModelConfig
from nanoseek.model.v4_config import CSA
from nanoseek.train import parallel
from nanoseek.train.config import TrainConfig, TrainError
from nanoseek.train.data import Dataset, tokenizer_hash
from nanoseek.train.state import STATE_FILE, latest_checkpoint

RUN_FILE = "run.json"


def check_run_dir(run_dir: Path, resume: bool | str | os.PathLike) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuses a fresh run over an existing one."""
    if resume:
        if not isinstance(resume, bool):
            path = Path(resume)
            if not path.is_dir():
                raise TrainError(f"resume checkpoint {path} does not exist")
            return path
        if not run_dir.is_dir():
            raise TrainError(f"cannot resume: run directory {run_dir} does not exist")
        path = latest_checkpoint(run_dir)
        if path is None:
            raise TrainError(f"cannot resume: {run_dir} holds no complete checkpoint (checkpoints/step_*)")
        return path
    if latest_checkpoint(run_dir) is not None:
        raise TrainError(
            f"{run_dir} already holds a run ({latest_checkpoint(run_dir).name}); pass --resume to "
            "continue it, or choose another run directory"
        )
    return None


def check_compatible(cfg: TrainConfig, model_cfg: ModelConfig, ds: Dataset, mtp_depth: int, world: int) -> None:
    """The model, the dataset's tokenizer and the parallelism asked for fit together."""
    if ds.tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainError(
            f"the dataset's tokenizer has {ds.tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {model_cfg.vocab_size}"
        )
    if mtp_depth > model_cfg.num_nextn_predict_layers:
        raise TrainError(
            f"mtp_depth {mtp_depth} asked for, but the model has {model_cfg.num_nextn_predict_layers} "
            "MTP module(s) (num_nextn_predict_layers)"
        )
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise TrainError(
            f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings {model_cfg.max_position_embeddings}"
        )
    dsa_flags = {"--dsa-warmup-steps": cfg.dsa_warmup_steps > 0, "--dsa-warmup-train-all": cfg.dsa_warmup_train_all}
    for flag, on in dsa_flags.items():
        has_indexer = model_cfg.dsa or (model_cfg.v4 is not None and CSA in model_cfg.v4.layer_types)
        if on and not has_indexer:
            raise TrainError(
                f"{flag} trains a lightning indexer, but the model is {model_cfg.model_type} without one: train a "
                "deepseek_v32 model (e.g. --preset tiny-v32) or a deepseek_v4 one with CSA layers (--preset tiny-v4)"
            )
    check_model_flags(cfg, model_cfg)
    problem = parallel.sharding_problem(cfg.fsdp, cfg.expert_parallel, world, model_cfg.n_routed_experts)
    if problem:
        raise TrainError(problem)


def check_model_flags(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """What DeepSeek-V4 cannot train with here (checked before any data is tokenized): a document mask (its
    compressed branches pool fixed windows of the sequence, across document boundaries), FSDP2 and expert
    parallelism (their sharding units and expert dispatch follow V3's modules). Single process and DDP work."""
    if model_cfg.model_type != "deepseek_v4":
        return
    if cfg.doc_mask:
        raise TrainError(
            "DeepSeek-V4 cannot mask packed documents from each other (its compressed attention pools fixed "
            "windows across document boundaries): pass --no-doc-mask (TrainConfig(doc_mask=False))"
        )
    for flag, on in (("--fsdp", cfg.fsdp), ("--expert-parallel", cfg.expert_parallel)):
        if on:
            raise TrainError(
                f"{flag} is not supported for DeepSeek-V4 models: train them on one process or with DDP "
                "(torchrun without --fsdp / --expert-parallel)"
            )


def write_run_file(run_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, ds: Dataset, world: int) -> None:
    run = {
        "train_config": cfg.to_dict(),
        "model_config": model_cfg.to_hf_dict(),
        "dataset": str(ds.root.resolve()),
        "tokenizer_sha256": ds.meta["tokenizer_sha256"],
        "world_size": world,
    }
    atomic_write_json(run_dir / RUN_FILE, run)


def read_saved_state(ckpt: Path) -> dict[str, Any]:
    """The `state` a checkpoint was saved with (train config, world size, dataset, tokenizer hash)."""
    try:
        meta = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"cannot read {ckpt / STATE_FILE}: {e}") from None
    return meta.get("state", {})


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any], ds: Dataset, world: int, ckpt: Path) -> None:
    """A resumed run must keep what shapes its loss curve; max_steps, eval/save/log cadence may change."""
    if "train_config" not in saved:
        raise TrainError(f"{ckpt} was not written by `pretrain` (no train_config in its state)")
    old = TrainConfig.from_dict(saved["train_config"])
    diff = [
        f"{n}: {getattr(old, n)!r} in the run, {getattr(cfg, n)!r} now"
        for n in TrainConfig.CURVE_FIELDS
        if getattr(old, n) != getattr(cfg, n)
    ]
    old_global = old.batch_size * old.grad_accum * saved.get("world_size", 1)
    new_global = cfg.batch_size * cfg.grad_accum * world
    if old_global != new_global:
        diff.append(
            f"global batch: {old_global} sequences in the run, {new_global} now (batch_size x grad_accum x world size)"
        )
    if saved.get("tokenizer_sha256") not in (None, tokenizer_hash(ds.tokenizer)):
        diff.append("dataset: its tokenizer differs from the run's")
    if diff:
        raise TrainError(f"--resume from {ckpt} with settings that change the run: " + "; ".join(diff))
