"""Pretraining settings: `TrainConfig` (what `nanoseek pretrain`'s flags map onto), the learning-rate schedule
`lr_factor`, the `TrainResult` a run returns and the `TrainError` a setup that cannot run raises."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import NanoseekError


class TrainError(NanoseekError):
    """A training setup that cannot run: conflicting settings, a run directory in the wrong state."""


@dataclass(kw_only=True)
class TrainConfig:
    """Pretraining hyper-parameters. Batch sizes are per rank; the global batch is
    batch_size · grad_accum · world_size sequences of seq_len tokens."""

    # batch and length
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    # AdamW and schedule
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule ends at min_lr_ratio · lr
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup, stable, decay)
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    # DeepSeek-V3 objectives
    mtp_depth: int | None = None  # MTP modules trained; None = all the model has, 0 = none
    mtp_lambda: float = 0.3  # λ of the MTP loss (V3: 0.3, then 0.1)
    bias_update_speed: float = 1e-3  # γ of the auxiliary-loss-free bias update; 0 = off
    aux_loss_alpha: float | None = None  # α of the sequence-wise balance loss; None = the model config's
    doc_mask: bool = True  # packed documents do not attend to each other
    # DeepSeek Sparse Attention (V3.2 models only, V3.2 §2.1.1): the first dsa_warmup_steps attend densely
    # and fit the lightning indexer to that attention by KL, with every other parameter frozen (or, with
    # dsa_warmup_train_all, trained by the LM loss too: pretraining from scratch); then sparse attention
    # over the indexer's top-k, everything trained, the indexer by its KL on the selected keys alone.
    dsa_warmup_steps: int = 0
    dsa_warmup_train_all: bool = False
    # runtime
    seed: int = 0  # model init (for a fresh model) and data order
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "fp32", or "bf16" autocast; "auto": bf16 on CUDA with bf16 support, else fp32
    compile: bool = False  # torch.compile the training forward
    expert_parallel: bool = False  # under torchrun: split the routed experts over ranks
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard) instead of DDP
    # evaluation, checkpoints, logs
    eval_every: int = 100  # steps between held-out evaluations (0 = only at the end, -1 = never)
    eval_sequences: int = 32  # held-out windows per evaluation, in total (the same set whatever the parallelism)
    save_every: int = 500  # steps between checkpoints (and always at the end); 0 = end only
    keep_last: int = 3
    log_every: int = 1
    peak_flops: float | None = None  # per device, for MFU; None = estimated from the hardware

    # Settings that change the loss curve: a resumed run must keep them.
    CURVE_FIELDS = (
        "seq_len",
        "lr",
        "min_lr_ratio",
        "warmup_steps",
        "schedule",
        "decay_fraction",
        "weight_decay",
        "betas",
        "eps",
        "grad_clip",
        "mtp_depth",
        "mtp_lambda",
        "bias_update_speed",
        "aux_loss_alpha",
        "doc_mask",
        "dsa_warmup_steps",
        "dsa_warmup_train_all",
        "seed",
    )

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise TrainError(msg)

        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "keep_last"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in ("cosine", "wsd"), f"schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        need(
            0 <= self.warmup_steps < self.max_steps,
            f"warmup_steps ({self.warmup_steps}) must be less than max_steps ({self.max_steps})",
        )
        need(0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.schedule == "wsd":
            need(
                self.warmup_steps <= self.max_steps * (1 - self.decay_fraction),
                f"wsd: warmup ({self.warmup_steps} steps) overlaps the decay (last {self.decay_fraction:.0%} "
                f"of {self.max_steps} steps)",
            )
        need(self.grad_clip >= 0, "grad_clip must be >= 0")
        need(self.mtp_depth is None or self.mtp_depth >= 0, "mtp_depth must be >= 0")
        need(self.mtp_lambda >= 0 and self.bias_update_speed >= 0, "mtp_lambda and bias_update_speed must be >= 0")
        need(self.aux_loss_alpha is None or self.aux_loss_alpha >= 0, "aux_loss_alpha must be >= 0")
        need(self.dtype in ("auto", "fp32", "bf16"), f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        need(self.eval_every >= -1 and self.save_every >= 0, "eval_every must be >= -1 and save_every >= 0")
        need(self.eval_sequences >= 1, "eval_sequences must be >= 1")
        need(self.dsa_warmup_steps >= 0, f"dsa_warmup_steps must be >= 0, got {self.dsa_warmup_steps}")
        need(
            self.dsa_warmup_steps > 0 or not self.dsa_warmup_train_all,
            "--dsa-warmup-train-all changes the dense warm-up: give its length with --dsa-warmup-steps N",
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    train_loss: float  # of the last step
    heldout_loss: float | None  # of the last evaluation
    checkpoint: Path | None
    tokens_per_s: float  # median over the steps of this process's run
    mfu: float | None
    expert_load: list[float] = field(default_factory=list)  # max/mean per MoE layer, last step
    indexer_loss: float | None = None  # DSA models: the indexer KL of the last step


def dsa_warmup(step: int, cfg: TrainConfig) -> bool:
    """Is optimizer step `step` (0-based) in the dense warm-up of a DSA model? The stage follows from the
    step alone, so a run resumed mid-warm-up continues it."""
    return step < cfg.dsa_warmup_steps


# ---- schedule ------------------------------------------------------------------------------------
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then cosine or WSD."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.schedule == "wsd":  # MiniCPM's warmup-stable-decay; DeepSeek-V3 §4.2 uses a similar staircase
        decay_start = cfg.max_steps - max(1, round(cfg.decay_fraction * cfg.max_steps))
        if step < decay_start:
            return 1.0
        t = (step - decay_start + 1) / (cfg.max_steps - decay_start)
        return 1.0 - (1.0 - lo) * min(t, 1.0)
    t = (step - cfg.warmup_steps + 1) / max(1, cfg.max_steps - cfg.warmup_steps)
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
