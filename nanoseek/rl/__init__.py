"""Reinforcement learning from verifiable rewards, and the R1-Zero recipe built on it.

rl owns GRPO (config.py: GRPOConfig; rollout.py: rollouts and their packed batch; loss.py: advantages, the
clipped loss, the training forward; trainer.py: GRPOTrainer, one step; distributed.py: a step shared over
torchrun's ranks; grpo.py: train_grpo, checkpoints and resume), held-out evaluation (evaluate.py: pass@1 /
pass@k), `nanoseek zero` (zero_config.py: presets and configs; zero.py: the stages; stages.py: the resumable,
timed stage runner and model publishing shared with distill; report.py: report.md and its curves) and
`nanoseek distill` (distill.py).

Imports: nanoseek.errors, fileio, model, checkpoint, engine, tasks, train.

    from nanoseek.rl import GRPOConfig, train_grpo
    result = train_grpo(model, tokenizer, get_task("arithmetic"), GRPOConfig(max_steps=100), "runs/grpo")
"""

from nanoseek.rl.config import GRPOConfig, GRPOError
from nanoseek.rl.grpo import GRPOResult, resume_trainer, save_trainer, train_grpo
from nanoseek.rl.loss import LossOutput, group_advantages, grpo_loss, sequence_logprobs
from nanoseek.rl.rollout import Rollout, RolloutBatch
from nanoseek.rl.trainer import GRPOTrainer

__all__ = [
    "GRPOConfig",
    "GRPOError",
    "GRPOResult",
    "GRPOTrainer",
    "LossOutput",
    "Rollout",
    "RolloutBatch",
    "group_advantages",
    "grpo_loss",
    "resume_trainer",
    "save_trainer",
    "sequence_logprobs",
    "train_grpo",
]
