"""Pretraining: a DeepSeek-V3-style base model from a token dataset, resumable, on one process or under torchrun.

    from nanoseek.train.trainer import TrainConfig, pretrain
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
- AdamW (`nanoseek.train.optim.adamw`: no decay on norms and biases), linear warmup then cosine or WSD
  (warmup-stable-decay) to `min_lr_ratio · lr`, global-norm clipping, then the auxiliary-loss-free bias
  update b_i += γ·sign(mean load − load_i) from the step's token counts summed over ranks (V3 §2.1.2).
- fp32 on CPU; bf16 autocast on CUDA where bf16 is fast (parameters and optimizer state stay fp32).
- DeepSeek-V3.2 models (DSA, V3.2 §2.1.1), and DeepSeek-V4's CSA layers, whose indexers train the same way: the
  first `dsa_warmup_steps` steps attend densely and train the
  lightning indexers alone by their KL toward the main attention (everything else frozen: no gradient, so
  no update and no weight decay), or everything with `dsa_warmup_train_all`; then attention is sparse
  (top-k), everything trains, and the indexers' KL on the selected keys is added to the backward. Their
  input is detached, so the KL trains only the indexers and the LM loss only the rest; the two parts are
  clipped apart too, so neither's gradient norm scales the other's step.

- DeepSeek-V4 models (`build_model` picks `DeepseekV4`): the head reads the collapsed mHC streams and MTP the
  uncollapsed ones; no document mask (doc_mask must be off); the CSA indexers train by their KL as above (a
  dense warm-up attends every visible compressed entry); one process or DDP (FSDP2 and expert parallelism
  are refused).

Logged per step to RUN_DIR/metrics.jsonl: loss/train, loss/mtp, loss/aux, loss/indexer, lr, grad_norm,
grad_norm/indexer, tokens_per_s, mfu, expert_load/<layer> (max/mean tokens per expert); loss/heldout at
each evaluation.

Beside this module: the settings and schedule (`config.py`), the objective, held-out loss and FLOPs
(`objective.py`), the run-directory and resume checks (`resume.py`), checkpoints (`state.py`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from nanoseek.model.config import ModelConfig
from nanoseek.model.moe import update_bias
from nanoseek.model.transformer import Transformer, build_model
from nanoseek.model.v4 import DeepseekV4
from nanoseek.train import parallel
from nanoseek.train.config import TrainConfig, TrainError, TrainResult, dsa_warmup, lr_factor
from nanoseek.train.data import IGNORE_INDEX, Batch, DataError, Dataset, PackedBatches, load_dataset
from nanoseek.train.metrics import MetricsLogger
from nanoseek.train.objective import (
    PretrainObjective,
    dsa_layers,
    heldout_loss,
    peak_flops,
    training_flops_per_token,
)
from nanoseek.train.optim import adamw
from nanoseek.train.resume import (
    RUN_FILE,
    check_compatible,
    check_resume_config,
    check_run_dir,
    read_saved_state,
    write_run_file,
)
from nanoseek.train.state import load_checkpoint, save_checkpoint

__all__ = ["RUN_FILE", "TrainConfig", "TrainError", "TrainResult", "Trainer", "check_run_dir", "lr_factor", "pretrain"]


# ---- the trainer ---------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
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


def pretrain(
    model: ModelConfig | Transformer | DeepseekV4,
    cfg: TrainConfig,
    data: Dataset | str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    resume: bool | str | os.PathLike = False,
    progress: bool = True,
    log=print,
) -> TrainResult:
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

    def __init__(
        self,
        model: ModelConfig | Transformer | DeepseekV4,
        cfg: TrainConfig,
        data: Dataset | str | os.PathLike,
        run_dir: str | os.PathLike,
        *,
        resume: bool | str | os.PathLike = False,
        log=print,
    ):
        cfg.validate()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        self.rank, self.world = parallel.init_distributed("cuda" if on_cuda else "cpu")
        self.say = log if self.rank == 0 else (lambda *a, **k: None)
        ckpt = check_run_dir(self.run_dir, resume)
        self.ds = ds = data if isinstance(data, Dataset) else load_dataset(data)
        self.device = resolve_device(cfg.device)
        amp_dtype = resolve_dtype(cfg.dtype, self.device)
        self.autocast = (
            torch.autocast(self.device.type, dtype=amp_dtype)
            if amp_dtype != torch.float32
            else contextlib.nullcontext()
        )
        self.model = model = self._build_model(model)
        if ckpt is not None:
            check_resume_config(cfg, read_saved_state(ckpt), ds, self.world, ckpt)
        self.objective, self.forward = self._parallelize(model)
        # DSA: the lightning indexers' parameters and the rest, trained (and clipped) apart. Collected once
        # the parallelism has replaced what it shards or slices.
        indexers = {id(p) for m in dsa_layers(model) for p in m.indexer.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.indexer_params = [p for p in trainable if id(p) in indexers]
        self.main_params = [p for p in trainable if id(p) not in indexers]
        self.frozen = False  # in the dense warm-up, is all but the indexers frozen?
        self.optimizer = adamw(model, cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))

        self.train_batches = PackedBatches(ds.train, cfg.seq_len, seed=cfg.seed)
        self.eval_batches = None
        if cfg.eval_every >= 0:
            if ds.heldout.n_tokens < 2:
                raise DataError(
                    f"the dataset {ds.root} has no held-out tokens to evaluate on; build it with a "
                    "held-out share (--heldout-percent) or pass --eval-every -1"
                )
            self.eval_batches = PackedBatches(
                ds.heldout, min(cfg.seq_len, ds.heldout.n_tokens - 1), shuffle=False, name="heldout"
            )
        self.per_step = cfg.batch_size * cfg.grad_accum * self.world  # windows per optimizer step

        self.step, self.position, self.checkpoint = 0, 0, ckpt
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer=self.optimizer, scheduler=self.scheduler)
            self.step, self.position = state["step"], state["data_position"]
            self.say(f"resumed from {ckpt} at step {self.step} (data position {self.position})")
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_file(self.run_dir, cfg, model.config, ds, self.world)
        parallel.barrier()
        self.metrics = MetricsLogger(
            self.run_dir, resume_step=self.step if ckpt is not None else None, enabled=self.rank == 0
        )
        self.flops_per_token = training_flops_per_token(model.config, cfg.seq_len, self.mtp_depth)
        self.peak = cfg.peak_flops or peak_flops(self.device, amp_dtype)
        moe = set(model.moe_layers())
        self.moe_names = [n for n, m in model.named_modules() if m in moe]

    def _build_model(self, model: ModelConfig | Transformer | DeepseekV4) -> Transformer | DeepseekV4:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if isinstance(model, ModelConfig):
            with torch.device(self.device):
                model = build_model(model)
        model = model.to(device=self.device, dtype=torch.float32).train()
        if cfg.aux_loss_alpha is not None:
            model.config = model.config.replace(aux_loss_alpha=cfg.aux_loss_alpha, seq_aux=True)
            for moe in model.moe_layers():
                moe.aux_loss_alpha = cfg.aux_loss_alpha
        self.mtp_depth = model.config.num_nextn_predict_layers if cfg.mtp_depth is None else cfg.mtp_depth
        check_compatible(cfg, model.config, self.ds, self.mtp_depth, self.world)
        for block in model.mtp[self.mtp_depth :]:  # untrained MTP modules: frozen, so DDP expects no gradient
            block.requires_grad_(False)
        return model

    def _parallelize(self, model: Transformer) -> tuple[nn.Module, nn.Module]:
        """(the objective, wrapped for DDP / FSDP2 / expert parallelism; what runs it, maybe compiled)."""
        if self.cfg.expert_parallel:
            parallel.apply_expert_parallel(model)
        objective: nn.Module = PretrainObjective(model, self.mtp_depth, indexer_loss=True)
        if self.world > 1 and self.cfg.fsdp:
            # An MTP block's shared_head.norm is called outside the block's forward, so its attention and
            # MoE are the sharded units and its small norms and eh_proj stay with the root.
            units = list(model.layers) + [m for b in model.mtp[: self.mtp_depth] for m in (b.self_attn, b.mlp)]
            objective = parallel.apply_fsdp(objective, units, reshard_after_forward=not dsa_layers(model))
        elif self.world > 1:
            objective = parallel.wrap_ddp(objective, str(self.device))
        return objective, torch.compile(objective) if self.cfg.compile else objective

    def set_stage(self, step: int) -> None:
        """The DSA stage of optimizer step `step`: the dense warm-up (indexers alone trained, unless
        dsa_warmup_train_all) or sparse training. Nothing changes for a model without DSA layers."""
        if not self.indexer_params:
            return
        warm = dsa_warmup(step, self.cfg)
        self.model.set_dsa_stage(dense_attention=warm, indexer_kl=True)
        self.frozen = warm and not self.cfg.dsa_warmup_train_all
        for p in self.main_params:
            p.requires_grad_(not self.frozen)

    def targets(self, b: Batch, k: int) -> torch.Tensor:
        # Without the document mask attention crosses documents, so every next token is a fair target.
        return b.targets(k) if self.cfg.doc_mask else b.tokens[:, 1 + k :]

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch at the current data position; returns its metrics."""
        cfg, D, world = self.cfg, self.mtp_depth, self.world
        t0 = time.perf_counter()
        self.set_stage(self.step)
        # Frozen warm-up under DDP: only the indexers get gradients, which DDP (expecting every parameter's)
        # must not wait for; they are averaged over the ranks below instead. FSDP2 reduces whatever has one.
        own_sync = self.frozen and world > 1 and not cfg.fsdp
        batch = self.train_batches.get(self.position, self.per_step).to(self.device)
        # Each loss is a sum over this rank's tokens divided by the whole step's token count, times the
        # world size that DDP/FSDP divide by again: the gradient of one big batch's mean.
        counts = torch.stack([(self.targets(batch, k) != IGNORE_INDEX).sum() for k in range(1 + D)])
        denom = counts.clamp_min(1).to(torch.float32)
        weights = torch.tensor([1.0] + [cfg.mtp_lambda / max(D, 1)] * D, device=self.device)  # λ/D per MTP depth
        logged = torch.zeros(3 + D, device=self.device)  # CE sums (1+D), balance loss, indexer KL
        for micro in range(cfg.grad_accum):
            lo = (micro * world + self.rank) * cfg.batch_size
            mb = Batch(batch.tokens[lo : lo + cfg.batch_size], batch.doc_ids[lo : lo + cfg.batch_size])
            sync = world == 1 or (micro == cfg.grad_accum - 1 and not own_sync)
            with contextlib.nullcontext() if sync else parallel.no_gradient_sync(self.objective):
                with self.autocast:
                    sums, aux, kl = self.forward(
                        mb.inputs,
                        [self.targets(mb, k) for k in range(1 + D)],
                        mb.attention_mask() if cfg.doc_mask else None,
                    )
                # The KL is a mean over the micro-batch's queries, as the balance loss is over its sequences.
                loss = kl / cfg.grad_accum
                if not self.frozen:
                    loss = loss + (sums / denom * weights).sum() * world + aux / cfg.grad_accum
                loss.backward()
            side = torch.stack((aux.detach().float(), kl.detach().float())) / cfg.grad_accum
            logged += torch.cat((sums.detach(), side))
        if own_sync:
            parallel.average_grads(self.indexer_params)
        parallel.finish_expert_grads(self.objective)
        if self.indexer_params:
            grad_norm = parallel.clip_grad_norm(self.model, cfg.grad_clip, self.main_params)
            indexer_norm = parallel.clip_grad_norm(self.model, cfg.grad_clip, self.indexer_params)
        else:
            grad_norm = parallel.clip_grad_norm(self.model, cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Counts summed over ranks, then b += γ sign(·); the routing stays frozen with the rest in a DSA warm-up.
        load = update_bias(self.model, 0.0 if self.frozen else cfg.bias_update_speed)
        parallel.all_reduce_sum(logged)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step += 1
        self.position += self.per_step
        tok_s = self.per_step * cfg.seq_len / (time.perf_counter() - t0)
        losses = (logged[: 1 + D] / denom).tolist()
        if not math.isfinite(losses[0]):
            raise TrainError(f"step {self.step}: the loss is {losses[0]}; lower --lr or check the data")
        row = {
            "loss/train": losses[0],
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tok_s,
            "epoch": self.train_batches.epoch(self.position),
        }
        if D:
            row["loss/mtp"] = sum(losses[1:]) / D
        if self.model.config.aux_loss_alpha > 0 and self.model.config.seq_aux:
            row["loss/aux"] = float(logged[-2]) / world
        if self.indexer_params:
            row["loss/indexer"] = float(logged[-1]) / world
            row["grad_norm/indexer"] = indexer_norm
        if self.peak:
            row["mfu"] = self.mfu(tok_s)
        row.update({f"expert_load/{n}": v for n, v in zip(self.moe_names, load)})
        return row

    def mfu(self, tokens_per_s: float) -> float | None:
        return self.flops_per_token * tokens_per_s / (self.peak * self.world) if self.peak else None

    def heldout_loss(self) -> float:
        self.set_stage(self.step)  # the attention of the step to come: sparse once the warm-up is over
        return heldout_loss(
            self.forward,
            self.eval_batches,
            self.cfg.eval_sequences,
            self.cfg.batch_size,
            self.device,
            self.autocast,
            self.cfg.doc_mask,
        )

    def save(self) -> Path:
        self.checkpoint = save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            tokenizer=self.ds.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            keep_last=self.cfg.keep_last,
            state={
                "data_position": self.position,
                "train_config": self.cfg.to_dict(),
                "world_size": self.world,
                "dataset": str(self.ds.root),
                "tokenizer_sha256": self.ds.meta["tokenizer_sha256"],
            },
        )
        return self.checkpoint

    def run(self, progress: bool = True) -> TrainResult:
        """Train to max_steps: log every step, evaluate and checkpoint on their cadence and at the end."""
        cfg = self.cfg
        bar = None
        if progress and self.rank == 0:
            bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        row: dict[str, float] = {}
        heldout, throughput = None, []
        try:
            while self.step < cfg.max_steps:
                row = self.train_step()
                throughput.append(row["tokens_per_s"])
                end = self.step == cfg.max_steps
                if self.eval_batches is not None and (end or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0)):
                    heldout = row["loss/heldout"] = self.heldout_loss()
                if self.step % cfg.log_every == 0 or "loss/heldout" in row or end:
                    self.metrics.log(self.step, **row)
                if bar is not None:
                    post = {"loss": f"{row['loss/train']:.3f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
                    if "loss/indexer" in row:
                        post["kl"] = f"{row['loss/indexer']:.3f}"
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
            heldout = self.heldout_loss()
        if self.indexer_params:  # hand the model back as inference runs it: sparse, no KL, nothing frozen
            self.model.set_dsa_stage(dense_attention=False, indexer_kl=False)
            for p in self.main_params:
                p.requires_grad_(True)
        median = sorted(throughput)[len(throughput) // 2] if throughput else 0.0
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            train_loss=row.get("loss/train", float("nan")),
            heldout_loss=heldout,
            checkpoint=self.checkpoint,
            tokens_per_s=median,
            mfu=self.mfu(median) if throughput else None,
            expert_load=[v for k, v in row.items() if k.startswith("expert_load/")],
            indexer_loss=row.get("loss/indexer"),
        )
