"""GRPO: Group Relative Policy Optimization (DeepSeekMath §4.1), the optimizer of DeepSeek-R1-Zero.

    result = train_grpo(model, tokenizer, get_task("arithmetic"), GRPOConfig(max_steps=200), "runs/grpo")
    nanoseek grpo --model ckpt/ --task arithmetic --out runs/grpo [--loss-type dr_grpo ...] [--resume]

One step: draw `prompts_per_step` problems from the task's train split; sample G = `num_generations`
completions of each through the engine (the G samples share one prefill); score them with rule rewards;
give every token of completion i the advantage A_i = (r_i - mean(r_group)) / std(r_group); then take
`num_iterations` (μ) passes over the batch, split into `num_minibatches`, minimizing per token

    ℓ_t = -min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε_high) A) + β KL_t,    ρ_t = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)
    KL_t = π_ref/π_θ - log(π_ref/π_θ) - 1                             (k3 estimator, in the loss, not the reward)

aggregated over tokens by `loss_type`:
    grpo     (1/N) Σ_i (1/|o_i|) Σ_t ℓ_it      per-sequence length-normalized mean (DeepSeekMath eq. 3)
    dr_grpo  (1/(N·L)) Σ_i Σ_t ℓ_it            constant normalizer, L = max_completion_length (Dr. GRPO)
    dapo     (1/Σ_i |o_i|) Σ_i Σ_t ℓ_it        token-level mean over the minibatch (DAPO eq. 8)
    gspo     as grpo, ρ_t replaced by s_i = exp((1/|o_i|) Σ_t log ρ_t), one ratio per sequence, clipped per
             sequence at ε = 3e-4, ε_high = 4e-4 by default (GSPO, Zheng et al. 2025, in its GSPO-token form)

Where this departs from the papers (each also how TRL's GRPOTrainer behaves, unless noted):
- std is the unbiased one plus 1e-4, as TRL; the papers do not say. A group whose rewards are all equal
  gets advantage exactly 0 (computing r - mean in floating point would leave ~1e-9 residues).
- `scale_rewards`: "group" is the paper; "batch" divides by the batch's std (Lite PPO); "none" is
  Dr. GRPO's. "auto" (default) means "none" with loss_type dr_grpo and "group" otherwise.
- β defaults to 0, TRL's and DAPO's choice (R1-Zero used 0.001); with β = 0 no reference model exists.
  The reference is replaced by the policy every `ref_model_sync_steps` steps (R1: every 400), a hard copy.
- Sampling at temperature T, the log-probabilities are those of logits / T, so ρ compares the policies
  that actually sampled (TRL does the same).
- π_old: with one pass over one minibatch the ratio is 1 by construction and π_old is the detached policy
  itself (no extra forward); otherwise one no-grad forward before the first update. The engine's own
  log-probs are used only when asked (`old_logprobs="engine"`, temperature 1): they come from the absorbed
  decode path and agree with the training forward to ~1e-5 (checked in tests, logged as `logprob_gap`).
- Dynamic sampling (DAPO §3.2) drops groups with equal rewards and, with `max_resample_rounds > 0`,
  samples more prompts (only as many as are missing) at most that many times; a step with no
  informative group skips the update.
- The training forward runs each prompt once per group and the G completions attend to its latents
  (our own packing; exact, a test holds it to the plain forward): prompts are not recomputed G times.
- MoE: the sequence-wise balance loss is not added; the router's correction bias moves only if
  `router_bias_update_speed` > 0 (default 0: routing is frozen during RL).
- Optimizer: AdamW (β2 = 0.99, no weight decay), gradient norm clipped to `max_grad_norm`, linear warmup.

Under torchrun each rank rolls out its share of every step's prompts and the update runs under DDP, FSDP2
(`fsdp`) or expert parallelism (`expert_parallel`), equal to one process's (distributed.py).

The pieces: config.py (GRPOConfig, GRPOError), rollout.py (Rollout, RolloutBatch, rollout metrics), loss.py
(advantages, the loss, the shared-prompt training forward), trainer.py (GRPOTrainer: one step), distributed.py
(how the ranks share a step), and this module: the run (`train_grpo`) with its checkpoints, resume and the
synced reference policy on disk.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoseek.checkpoint.hf import from_pretrained, save_pretrained
from nanoseek.engine.engine import Engine
from nanoseek.fileio import atomic_directory
from nanoseek.rl.config import GRPOConfig, GRPOError
from nanoseek.rl.evaluate import evaluate
from nanoseek.rl.trainer import GRPOTrainer
from nanoseek.tasks.rewards import RewardFn
from nanoseek.train import parallel
from nanoseek.train.metrics import MetricsLogger
from nanoseek.train.state import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


@dataclass
class GRPOResult:
    steps: int  # the step the run ended at
    history: list[dict[str, float]]  # the metrics of every step this call ran
    final: dict[str, float]  # the last step's metrics
    run_dir: Path | None = None
    checkpoint: Path | None = None  # the last checkpoint written
    final_model_dir: Path | None = None  # HF-format model + tokenizer after the last step


# ---- checkpoints, resume, the run -----------------------------------------------------------------------------
# Fields a resumed run may change; any other difference from the checkpoint's config is refused.
# Checkpoints hold full tensors whatever the sharding, so a run may resume under another one.
RESUME_MAY_CHANGE = {
    *("max_steps", "save_steps", "save_total_limit", "eval_steps", "eval_problems"),
    *("fsdp", "expert_parallel"),
}
REF_POLICY_DIR = "reference"


def reference_path(run_dir: Path, step: int) -> Path:
    """Where the reference policy synced at `step` is kept (beside the checkpoints that name it)."""
    return run_dir / REF_POLICY_DIR / f"step_{step:08d}"


def save_trainer(trainer: GRPOTrainer, run_dir: Path) -> Path:
    """A training checkpoint (train_state) of the policy, optimizer and schedule; with β > 0 and a synced
    reference, that reference's weights too (written first, so a checkpoint never names a missing one)."""
    lead = parallel.rank() == 0  # under torchrun rank 0 writes; save_checkpoint is collective
    if lead and trainer.ref_model is not None and trainer.ref_step > 0:
        ref_dir = reference_path(run_dir, trainer.ref_step)
        if not ref_dir.exists():
            with atomic_directory(ref_dir) as tmp:
                save_pretrained(trainer.ref_model, tmp)
    state = {"grpo_config": trainer.cfg.to_dict(), "task": trainer.task.name, "ref_step": trainer.ref_step}
    path = save_checkpoint(
        run_dir,
        trainer.step,
        trainer.model,
        tokenizer=trainer.tokenizer,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        state=state,
        keep_last=trainer.cfg.save_total_limit,
    )
    if not lead:
        return path
    needed = {_checkpoint_ref_step(c) for c in list_checkpoints(run_dir)}
    for old in (run_dir / REF_POLICY_DIR).glob("*") if (run_dir / REF_POLICY_DIR).is_dir() else []:
        if old.name.startswith(".tmp-") or int(old.name.removeprefix("step_")) not in needed:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _checkpoint_ref_step(path: Path) -> int:
    return int(json.loads((path / "trainer_state.json").read_text())["state"].get("ref_step", 0))


def resume_trainer(trainer: GRPOTrainer, checkpoint: Path) -> None:
    """Restore a run at `checkpoint`; the trainer must have been built from the run's initial model (the
    reference of a run never synced is that model)."""
    state = load_checkpoint(checkpoint, trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
    saved, now = state.get("grpo_config", {}), trainer.cfg.to_dict()
    changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k, now[k]) != now[k])
    if changed:
        raise GRPOError(
            f"{checkpoint} was trained with other settings for {', '.join(changed)} "
            f"({', '.join(f'{k}={saved[k]!r}' for k in changed)}); resume with the same ones"
        )
    if state.get("task", trainer.task.name) != trainer.task.name:
        raise GRPOError(f"{checkpoint} was trained on task {state['task']!r}, not {trainer.task.name!r}")
    trainer.step = int(state["step"])
    ref_step = int(state.get("ref_step", 0))
    if trainer.ref_model is not None and ref_step > 0:
        ref_dir = reference_path(checkpoint.parent.parent, ref_step)
        if not ref_dir.is_dir():
            raise GRPOError(f"{checkpoint} needs the reference policy of step {ref_step}, missing from {ref_dir}")
        trainer.ref_model.load_state_dict(from_pretrained(ref_dir).state_dict())
        trainer.ref_step = ref_step
    trainer.model.eval()
    trainer.refresh_rollout_model()


def train_grpo(
    model: torch.nn.Module,
    tokenizer,
    task,
    cfg: GRPOConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    reward_fn: RewardFn | None = None,
    prompt_fn: Callable[[Any], str] | None = None,
    engine: Engine | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> GRPOResult:
    """Run GRPO on `model` (trained in place) until cfg.max_steps.

    run_dir: where metrics.jsonl, checkpoints/ and final/ (HF model + tokenizer) go; None keeps nothing on
    disk. resume: continue from run_dir's latest checkpoint (`model` must be the run's initial model).
    reward_fn(problems, completions) -> [.total, .accuracy, .format]: default the task's rule rewards with
    cfg.reward_weights; prompt_fn(problem) -> text: default the R1-Zero template."""
    if tokenizer is None:
        raise GRPOError("GRPO needs a tokenizer: prompts and completions are text")
    trainer = GRPOTrainer(model, tokenizer, task, cfg, reward_fn=reward_fn, prompt_fn=prompt_fn, engine=engine)
    run = Path(run_dir) if run_dir is not None else None
    if resume:
        last = latest_checkpoint(run) if run is not None else None
        if last is None:
            raise GRPOError(f"nothing to resume: no checkpoint under {run}/checkpoints")
        resume_trainer(trainer, last)
    elif run is not None and latest_checkpoint(run) is not None:
        raise GRPOError(f"{run} already holds a run; pass --resume to continue it, or choose another --out")
    parallel.barrier()  # every rank has looked for a run before rank 0 writes into one
    lead = parallel.rank() == 0  # under torchrun: rank 0 logs, evaluates and writes
    logger = MetricsLogger(run, resume_step=trainer.step) if run is not None and lead else None
    history: list[dict[str, float]] = []
    checkpoint = None
    bar = tqdm(
        total=cfg.max_steps,
        initial=trainer.step,
        disable=not (progress and lead),
        desc="grpo",
        unit="step",
        dynamic_ncols=True,
    )
    try:
        while trainer.step < cfg.max_steps:
            metrics = trainer.train_step()
            if lead and cfg.eval_steps and trainer.step % cfg.eval_steps == 0:
                metrics.update(_eval_metrics(trainer))
            history.append(metrics)
            if logger is not None:
                logger.log(**metrics)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward/total']:.3f}",
                acc=f"{metrics['reward/accuracy']:.2f}",
                len=f"{metrics['completion_length/mean']:.0f}",
                refresh=False,
            )
            if run is not None and cfg.save_steps and trainer.step % cfg.save_steps == 0:
                checkpoint = save_trainer(trainer, run)
            if on_step is not None and lead:
                on_step(metrics)
        final_dir = None
        if run is not None:
            if checkpoint is None or not checkpoint.name.endswith(f"{trainer.step:08d}"):
                checkpoint = save_trainer(trainer, run)
            final_dir = _save_final(trainer, run / "final") if lead else run / "final"
            parallel.barrier()
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    return GRPOResult(trainer.step, history, history[-1] if history else {}, run, checkpoint, final_dir)


def _eval_metrics(trainer: GRPOTrainer) -> dict[str, float]:
    r = evaluate(
        trainer.engine,
        trainer.task,
        n_problems=trainer.cfg.eval_problems,
        temperature=0,
        max_tokens=trainer.cfg.max_completion_length,
        reward_fn=trainer.reward_fn,
        prompt_fn=trainer.prompt_fn,
    )
    return {"eval/pass@1": r.pass_at_1, "eval/format": r.format_rate, "eval/length": r.mean_response_length}


def _save_final(trainer: GRPOTrainer, out: Path) -> Path:
    """The trained policy as a plain HF-format directory (model + tokenizer), replaced atomically."""
    with atomic_directory(out) as tmp:
        save_pretrained(trainer.rollout_model, tmp)  # full weights, whatever the update's sharding
        trainer.tokenizer.save_pretrained(tmp)
    return out
