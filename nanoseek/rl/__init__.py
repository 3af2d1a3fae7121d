"""Reinforcement learning from verifiable rewards: GRPO (grpo.py), the R1-Zero recipe's optimizer.

    from nanoseek.rl import GRPOConfig, train_grpo
    result = train_grpo(model, tokenizer, get_task("arithmetic"), GRPOConfig(max_steps=100), "runs/grpo")
"""

from nanoseek.rl.grpo import GRPOConfig, GRPOError, GRPOResult, LossOutput, Rollout, group_advantages, grpo_loss, train_grpo

__all__ = ["GRPOConfig", "GRPOError", "GRPOResult", "LossOutput", "Rollout", "group_advantages", "grpo_loss",
           "train_grpo"]
