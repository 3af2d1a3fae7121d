"""Pretraining: a DeepSeek-V3-style base model from a token dataset, resumable, on one process or under torchrun.

    from nanoseek.train import TrainConfig, pretrain
    result = pretrain(get_preset("tiny"), TrainConfig(max_steps=200, seq_len=128), "data/", "runs/tiny")
    result = pretrain(..., resume=True)      # continue from runs/tiny/checkpoints/<latest>

The command line (`nanoseek pretrain`) maps its flags onto `TrainConfig`; see docs/training.md.

One optimizer step (DeepSeek-V3 §2, §3.3 and §4.2 in miniature):
- The global batch is `batch_size · grad_accum · world_size` windows of `seq_len` tokens, drawn from the
  dataset's seeded order at the step's data position; every rank reads the same global batch and takes
  its share, so a resumed or differently-parallel run sees the same sequences per step.
- Loss = next-token cross-entropy + λ/D · Σ_k MTP cross-entropy at depth k (V3 eq. 24-25), each a mean over
  the step's valid target tokens (targets in another packed document are ignored), + the sequence-wise
  balance loss α Σ f_i P_i (V3 eq. 17-20) when α > 0. Sums are divided by the *global* token count, so
  gradient accumulation and data parallelism give the same gradient as one big batch.
- AdamW (no decay on norms and biases), linear warmup then cosine or WSD (warmup-stable-decay) to
  `min_lr_ratio · lr`, global-norm clipping, then the auxiliary-loss-free bias update b_i += γ·sign(mean
  load − load_i) from the step's token counts summed over ranks (V3 §2.1.2).
- fp32 on CPU; bf16 autocast on CUDA where bf16 is fast (parameters and optimizer state stay fp32).

Logged per step to RUN_DIR/metrics.jsonl: loss/train, loss/mtp, loss/aux, lr, grad_norm, tokens_per_s, mfu,
expert_load/<layer> (max/mean tokens per expert); loss/heldout at each evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.train import parallel
from nanoseek.model.config import ModelConfig
from nanoseek.train.data import IGNORE_INDEX, Batch, Dataset, DataError, PackedBatches, load_dataset, tokenizer_hash
from nanoseek.errors import NanoseekError
from nanoseek.train.metrics import MetricsLogger
from nanoseek.model.transformer import Transformer
from nanoseek.model.moe import update_bias
from nanoseek.train.state import latest_checkpoint, load_checkpoint, save_checkpoint

RUN_FILE = "run.json"


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
    eval_batches: int | None = None  # deprecated: eval_sequences = eval_batches x batch_size
    save_every: int = 500  # steps between checkpoints (and always at the end); 0 = end only
    keep_last: int = 3
    log_every: int = 1
    peak_flops: float | None = None  # per device, for MFU; None = estimated from the hardware

    # Settings that change the loss curve: a resumed run must keep them.
    CURVE_FIELDS = ("seq_len", "lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "weight_decay",
                    "betas", "eps", "grad_clip", "mtp_depth", "mtp_lambda", "bias_update_speed", "aux_loss_alpha",
                    "doc_mask", "seed")

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise TrainError(msg)

        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "keep_last"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in ("cosine", "wsd"), f"schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        need(0 <= self.warmup_steps < self.max_steps,
             f"warmup_steps ({self.warmup_steps}) must be less than max_steps ({self.max_steps})")
        need(0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.schedule == "wsd":
            need(self.warmup_steps <= self.max_steps * (1 - self.decay_fraction),
                 f"wsd: warmup ({self.warmup_steps} steps) overlaps the decay (last {self.decay_fraction:.0%} "
                 f"of {self.max_steps} steps)")
        need(self.grad_clip >= 0, "grad_clip must be >= 0")
        need(self.mtp_depth is None or self.mtp_depth >= 0, "mtp_depth must be >= 0")
        need(self.mtp_lambda >= 0 and self.bias_update_speed >= 0, "mtp_lambda and bias_update_speed must be >= 0")
        need(self.aux_loss_alpha is None or self.aux_loss_alpha >= 0, "aux_loss_alpha must be >= 0")
        need(self.dtype in ("auto", "fp32", "bf16"), f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        need(self.eval_every >= -1 and self.save_every >= 0, "eval_every must be >= -1 and save_every >= 0")
        need(self.eval_sequences >= 1, "eval_sequences must be >= 1")
        need(self.eval_batches is None or self.eval_batches >= 1, "eval_batches must be >= 1")

    @property
    def eval_size(self) -> int:
        """Held-out sequences per evaluation (eval_batches, the older spelling, counts batch_size each)."""
        return self.eval_sequences if self.eval_batches is None else self.eval_batches * self.batch_size

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


# ---- schedule, FLOPs ------------------------------------------------------------------------------
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


def training_flops_per_token(cfg: ModelConfig, seq_len: int, mtp_depth: int = 0) -> float:
    """Model FLOPs of one trained token: 6 per activated parameter (forward 2, backward 4) plus causal
    attention, 6 · H · (d_qk + d_v) · (T+1)/2 per layer (PaLM appendix B, halved for the causal mask).
    Activated parameters as DeepSeek counts them (`stats.model_stats`); each MTP depth adds its block
    (shared and top-k experts only) and another pass through the output head."""
    from nanoseek.model.stats import model_stats

    s = model_stats(cfg)
    params = s.active
    if mtp_depth:
        with torch.device("meta"):
            block = Transformer(cfg.replace(num_nextn_predict_layers=1)).mtp[0]
        mtp = sum(p.numel() for p in block.parameters())
        if hasattr(block.mlp, "experts"):
            routed = sum(p.numel() for p in block.mlp.experts.parameters())
            mtp -= routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
        params += mtp_depth * (mtp + cfg.vocab_size * cfg.hidden_size)
    layers = cfg.num_hidden_layers + mtp_depth
    attention = 6 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1) / 2 * layers
    return 6 * params + attention


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Nominal peak FLOP/s of one device. CPU: threads x FLOPs per cycle x base clock, where AVX2 cores with
    two 256-bit FMA pipes do 32 fp32 FLOPs a cycle (64 with AVX-512). CUDA: dense bf16/tf32 of known cards."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                 "4090": 165e12, "L4": 121e12}
        for key, bf16 in table.items():
            if key in name:
                return bf16 if dtype == torch.bfloat16 else bf16 / 2
        return None
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    if not mhz:
        return None
    per_cycle = 64 if " avx512f" in flags else 32 if (" avx2" in flags and " fma" in flags) else 16
    return torch.get_num_threads() * per_cycle * max(mhz) * 1e6


# ---- the objective -------------------------------------------------------------------------------
class PretrainObjective(nn.Module):
    """Forward of one micro-batch: summed next-token and MTP cross-entropies, and the balance loss.

    A module of its own so that DDP wraps the whole training forward (the MTP heads included)."""

    def __init__(self, model: Transformer, mtp_depth: int):
        super().__init__()
        self.model, self.mtp_depth = model, mtp_depth

    def forward(self, inputs: torch.Tensor, targets: list[torch.Tensor], mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, T); targets[k] (B, T-k) for k = 0..mtp_depth. Returns (cross-entropy sums (1+D,), aux loss)."""
        h = self.model.hidden_states(inputs, mask=mask)
        logits = [self.model.lm_head(h)]
        if self.mtp_depth:
            logits += self.model.mtp_logits(h, inputs, mask, depth=self.mtp_depth)
        sums = torch.stack([
            F.cross_entropy(lg.float().flatten(0, 1), tg.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            for lg, tg in zip(logits, targets)
        ])
        aux = self.model.aux_loss()
        return sums, aux if torch.is_tensor(aux) else h.new_zeros(())


# ---- the trainer ---------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} asked for, but CUDA is not available")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


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
        raise TrainError(f"{run_dir} already holds a run ({latest_checkpoint(run_dir).name}); pass --resume to "
                         "continue it, or choose another run directory")
    return None


def pretrain(model: ModelConfig | Transformer, cfg: TrainConfig, data: Dataset | str | os.PathLike,
             run_dir: str | os.PathLike, *, resume: bool | str | os.PathLike = False, progress: bool = True,
             log=print) -> TrainResult:
    """Train `model` (a config: fresh weights from cfg.seed; or a model to continue from) on `data` (a
    dataset or its directory), writing metrics, checkpoints and run.json under `run_dir`.

    resume: True continues from the run's latest checkpoint (a path: from that checkpoint); the model's
    weights, optimizer, schedule, data position and RNG all come from it, so the loss curve continues as
    if never interrupted. Works the same under torchrun (DDP or FSDP2, or DDP with expert parallelism).
    """
    return Trainer(model, cfg, data, run_dir, resume=resume, log=log).run(progress)


class Trainer:
    """The pieces of a pretraining run, built once: model (wrapped for the parallelism), optimizer,
    schedule, data, resume state. `run()` loops over `train_step()`."""

    def __init__(self, model: ModelConfig | Transformer, cfg: TrainConfig, data: Dataset | str | os.PathLike,
                 run_dir: str | os.PathLike, *, resume: bool | str | os.PathLike = False, log=print):
        cfg.validate()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        self.rank, self.world = parallel.init_distributed("cuda" if on_cuda else "cpu")
        self.say = log if self.rank == 0 else (lambda *a, **k: None)
        ckpt = check_run_dir(self.run_dir, resume)
        self.ds = ds = data if isinstance(data, Dataset) else load_dataset(data)
        self.device = resolve_device(cfg.device)
        amp_dtype = resolve_dtype(cfg.dtype, self.device)
        self.autocast = (torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype != torch.float32
                         else contextlib.nullcontext())
        self.model = model = self._build_model(model)
        if ckpt is not None:
            _check_resume_config(cfg, _read_run_file(ckpt), ds, self.world, ckpt)
        self.objective, self.forward = self._parallelize(model)
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(  # fused: one kernel over all parameters, on CPU as on CUDA
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))

        self.train_batches = PackedBatches(ds.train, cfg.seq_len, seed=cfg.seed)
        self.eval_batches = None
        if cfg.eval_every >= 0:
            if ds.heldout.n_tokens < 2:
                raise DataError(f"the dataset {ds.root} has no held-out tokens to evaluate on; build it with a "
                                "held-out share (--heldout-percent) or pass --eval-every -1")
            self.eval_batches = PackedBatches(ds.heldout, min(cfg.seq_len, ds.heldout.n_tokens - 1),
                                              shuffle=False, name="heldout")
        self.per_step = cfg.batch_size * cfg.grad_accum * self.world  # windows per optimizer step

        self.step, self.position, self.checkpoint = 0, 0, ckpt
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer=self.optimizer, scheduler=self.scheduler)
            self.step, self.position = state["step"], state["data_position"]
            self.say(f"resumed from {ckpt} at step {self.step} (data position {self.position})")
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_run_file(self.run_dir, cfg, model.config, ds, self.world)
        parallel.barrier()
        self.metrics = MetricsLogger(self.run_dir, resume_step=self.step if ckpt is not None else None,
                                     enabled=self.rank == 0)
        self.flops_per_token = training_flops_per_token(model.config, cfg.seq_len, self.mtp_depth)
        self.peak = cfg.peak_flops or peak_flops(self.device, amp_dtype)
        moe = set(model.moe_layers())
        self.moe_names = [n for n, m in model.named_modules() if m in moe]

    def _build_model(self, model: ModelConfig | Transformer) -> Transformer:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if isinstance(model, ModelConfig):
            with torch.device(self.device):
                model = Transformer(model)
        model = model.to(device=self.device, dtype=torch.float32).train()
        if cfg.aux_loss_alpha is not None:
            model.config = model.config.replace(aux_loss_alpha=cfg.aux_loss_alpha, seq_aux=True)
            for moe in model.moe_layers():
                moe.aux_loss_alpha = cfg.aux_loss_alpha
        self.mtp_depth = model.config.num_nextn_predict_layers if cfg.mtp_depth is None else cfg.mtp_depth
        _check_compatible(cfg, model.config, self.ds, self.mtp_depth, self.world)
        for block in model.mtp[self.mtp_depth:]:  # untrained MTP modules: frozen, so DDP expects no gradient
            block.requires_grad_(False)
        return model

    def _parallelize(self, model: Transformer) -> tuple[nn.Module, nn.Module]:
        """(the objective, wrapped for DDP / FSDP2 / expert parallelism; what runs it, maybe compiled)."""
        if self.cfg.expert_parallel:
            parallel.apply_expert_parallel(model)
        objective: nn.Module = PretrainObjective(model, self.mtp_depth)
        if self.world > 1 and self.cfg.fsdp:
            # An MTP block's shared_head.norm is called outside the block's forward, so its attention and
            # MoE are the sharded units and its small norms and eh_proj stay with the root.
            units = list(model.layers) + [m for b in model.mtp[: self.mtp_depth] for m in (b.self_attn, b.mlp)]
            objective = parallel.apply_fsdp(objective, units)
        elif self.world > 1:
            objective = parallel.wrap_ddp(objective, str(self.device))
        return objective, torch.compile(objective) if self.cfg.compile else objective

    def targets(self, b: Batch, k: int) -> torch.Tensor:
        # Without the document mask attention crosses documents, so every next token is a fair target.
        return b.targets(k) if self.cfg.doc_mask else b.tokens[:, 1 + k :]

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch at the current data position; returns its metrics."""
        cfg, D, world = self.cfg, self.mtp_depth, self.world
        t0 = time.perf_counter()
        batch = self.train_batches.get(self.position, self.per_step).to(self.device)
        # Each loss is a sum over this rank's tokens divided by the whole step's token count, times the
        # world size that DDP/FSDP divide by again: the gradient of one big batch's mean.
        counts = torch.stack([(self.targets(batch, k) != IGNORE_INDEX).sum() for k in range(1 + D)])
        denom = counts.clamp_min(1).to(torch.float32)
        weights = torch.tensor([1.0] + [cfg.mtp_lambda / max(D, 1)] * D, device=self.device)  # λ/D per MTP depth
        logged = torch.zeros(2 + D, device=self.device)
        for micro in range(cfg.grad_accum):
            lo = (micro * world + self.rank) * cfg.batch_size
            mb = Batch(batch.tokens[lo : lo + cfg.batch_size], batch.doc_ids[lo : lo + cfg.batch_size])
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if world == 1 or last else parallel.no_gradient_sync(self.objective):
                with self.autocast:
                    sums, aux = self.forward(mb.inputs, [self.targets(mb, k) for k in range(1 + D)],
                                             mb.attention_mask() if cfg.doc_mask else None)
                ((sums / denom * weights).sum() * world + aux / cfg.grad_accum).backward()
            logged += torch.cat((sums.detach(), aux.detach().reshape(1) / cfg.grad_accum))
        parallel.finish_expert_grads(self.objective)
        grad_norm = parallel.clip_grad_norm(self.model, cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        load = update_bias(self.model, cfg.bias_update_speed)  # counts summed over ranks, then b += γ sign(·)
        parallel.all_reduce_sum(logged)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step += 1
        self.position += self.per_step
        tok_s = self.per_step * cfg.seq_len / (time.perf_counter() - t0)
        losses = (logged[: 1 + D] / denom).tolist()
        if not math.isfinite(losses[0]):
            raise TrainError(f"step {self.step}: the loss is {losses[0]}; lower --lr or check the data")
        row = {"loss/train": losses[0], "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
               "epoch": self.train_batches.epoch(self.position)}
        if D:
            row["loss/mtp"] = sum(losses[1:]) / D
        if self.model.config.aux_loss_alpha > 0 and self.model.config.seq_aux:
            row["loss/aux"] = float(logged[-1]) / world
        if self.peak:
            row["mfu"] = self.mfu(tok_s)
        row.update({f"expert_load/{n}": v for n, v in zip(self.moe_names, load)})
        return row

    def mfu(self, tokens_per_s: float) -> float | None:
        return self.flops_per_token * tokens_per_s / (self.peak * self.world) if self.peak else None

    def evaluate(self) -> float:
        return evaluate(self.forward, self.eval_batches, self.cfg.eval_size, self.cfg.batch_size, self.device,
                        self.autocast, self.cfg.doc_mask)

    def save(self) -> Path:
        self.checkpoint = save_checkpoint(
            self.run_dir, self.step, self.model, tokenizer=self.ds.tokenizer, optimizer=self.optimizer,
            scheduler=self.scheduler, keep_last=self.cfg.keep_last,
            state={"data_position": self.position, "train_config": self.cfg.to_dict(), "world_size": self.world,
                   "dataset": str(self.ds.root), "tokenizer_sha256": self.ds.meta["tokenizer_sha256"]})
        return self.checkpoint

    def run(self, progress: bool = True) -> TrainResult:
        """Train to max_steps: log every step, evaluate and checkpoint on their cadence and at the end."""
        cfg = self.cfg
        bar = None
        if progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        row: dict[str, float] = {}
        heldout, throughput = None, []
        try:
            while self.step < cfg.max_steps:
                row = self.train_step()
                throughput.append(row["tokens_per_s"])
                end = self.step == cfg.max_steps
                if self.eval_batches is not None and (end or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0)):
                    heldout = row["loss/heldout"] = self.evaluate()
                if self.step % cfg.log_every == 0 or "loss/heldout" in row or end:
                    self.metrics.log(self.step, **row)
                if bar is not None:
                    post = {"loss": f"{row['loss/train']:.3f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
                    if "loss/heldout" in row:
                        post["heldout"] = f"{heldout:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if end or (cfg.save_every > 0 and self.step % cfg.save_every == 0):
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()
        if heldout is None and self.eval_batches is not None and self.step > 0:  # resumed at or past the end
            self.say(f"the run already reached max_steps={cfg.max_steps}")
            heldout = self.evaluate()
        median = sorted(throughput)[len(throughput) // 2] if throughput else 0.0
        return TrainResult(run_dir=self.run_dir, step=self.step, train_loss=row.get("loss/train", float("nan")),
                           heldout_loss=heldout, checkpoint=self.checkpoint, tokens_per_s=median,
                           mfu=self.mfu(median) if throughput else None,
                           expert_load=[v for k, v in row.items() if k.startswith("expert_load/")])


@torch.no_grad()
def evaluate(forward: nn.Module, batches: PackedBatches, n_sequences: int, batch_size: int, device: torch.device,
             autocast=contextlib.nullcontext(), doc_mask: bool = True) -> float:
    """Mean next-token cross-entropy over the first `n_sequences` windows of the held-out split: the same
    windows, so the same number, whatever the batch size and world size. Rank r takes windows r, r+W, ...;
    every rank runs the same number of forwards (FSDP and expert parallelism communicate inside them), a
    rank out of windows with one dummy window that is not counted."""
    rank, world = parallel.rank(), parallel.world_size()
    n = min(n_sequences, batches.n_windows)
    mine = list(range(rank, n, world))
    forward.train(False)
    total = torch.zeros(2, device=device)
    try:
        for f in range(math.ceil(math.ceil(n / world) / batch_size)):
            rows = mine[f * batch_size : (f + 1) * batch_size]
            mb = batches.take(rows or [0]).to(device)
            tgt = mb.targets(0) if doc_mask else mb.tokens[:, 1:]
            with autocast:
                sums, _ = forward(mb.inputs, [tgt], mb.attention_mask() if doc_mask else None)
            if rows:
                total += torch.stack((sums[0].float(), (tgt != IGNORE_INDEX).sum().float()))
    finally:
        forward.train(True)
    parallel.all_reduce_sum(total)
    return float(total[0] / total[1].clamp_min(1))


# ---- checks and the run file ---------------------------------------------------------------------
def _check_compatible(cfg: TrainConfig, model_cfg: ModelConfig, ds: Dataset, mtp_depth: int, world: int) -> None:
    if ds.tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainError(f"the dataset's tokenizer has {ds.tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size {model_cfg.vocab_size}")
    if mtp_depth > model_cfg.num_nextn_predict_layers:
        raise TrainError(f"mtp_depth {mtp_depth} asked for, but the model has {model_cfg.num_nextn_predict_layers} "
                         "MTP module(s) (num_nextn_predict_layers)")
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise TrainError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{model_cfg.max_position_embeddings}")
    if cfg.fsdp and world == 1:
        raise TrainError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
    if cfg.fsdp and cfg.expert_parallel:
        raise TrainError("--fsdp and --expert-parallel do not combine: expert parallelism runs with DDP")
    if cfg.expert_parallel and world == 1:
        raise TrainError("--expert-parallel needs several processes: launch with torchrun --nproc_per_node N")
    if cfg.expert_parallel and model_cfg.n_routed_experts % world:
        raise TrainError(f"--expert-parallel: n_routed_experts ({model_cfg.n_routed_experts}) must divide evenly "
                         f"over {world} ranks")


def _write_run_file(run_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, ds: Dataset, world: int) -> None:
    run = {"train_config": cfg.to_dict(), "model_config": model_cfg.to_hf_dict(), "dataset": str(ds.root.resolve()),
           "tokenizer_sha256": ds.meta["tokenizer_sha256"], "world_size": world}
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    os.replace(tmp, run_dir / RUN_FILE)


def _read_run_file(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"cannot read {ckpt / 'trainer_state.json'}: {e}") from None
    return meta.get("state", {})


def _check_resume_config(cfg: TrainConfig, saved: dict[str, Any], ds: Dataset, world: int, ckpt: Path) -> None:
    """A resumed run must keep what shapes its loss curve; max_steps, eval/save/log cadence may change."""
    if "train_config" not in saved:
        raise TrainError(f"{ckpt} was not written by `pretrain` (no train_config in its state)")
    old = TrainConfig.from_dict(saved["train_config"])
    diff = [f"{n}: {getattr(old, n)!r} in the run, {getattr(cfg, n)!r} now" for n in TrainConfig.CURVE_FIELDS
            if getattr(old, n) != getattr(cfg, n)]
    old_global = old.batch_size * old.grad_accum * saved.get("world_size", 1)
    new_global = cfg.batch_size * cfg.grad_accum * world
    if old_global != new_global:
        diff.append(f"global batch: {old_global} sequences in the run, {new_global} now "
                    "(batch_size x grad_accum x world size)")
    if saved.get("tokenizer_sha256") not in (None, tokenizer_hash(ds.tokenizer)):
        diff.append("dataset: its tokenizer differs from the run's")
    if diff:
        raise TrainError(f"--resume from {ckpt} with settings that change the run: " + "; ".join(diff))
