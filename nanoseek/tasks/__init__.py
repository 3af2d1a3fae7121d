"""Closed, verifiable tasks for R1-Zero: generated problems with exact verifiers, worked solutions, a fixed
held-out split, the R1-Zero prompt/response format and rule-based rewards. See docs/tasks.md.

    from nanoseek.tasks import get_task, pretraining_documents, score
    task = get_task("arithmetic", max_digits=3)
    p = task.sample(random.Random(0))                    # a train-split Problem
    score(p, " <think> ... </think> <answer> 42 </answer>").total

Imports: `nanoseek.errors`, `nanoseek.checkpoint` (the tokenizer's chat template and tags) and
`nanoseek.sandbox` (the program task runs answers there).
"""

from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.base import Problem, Split, Task, TaskError, split_of
from nanoseek.tasks.countdown import CountdownTask
from nanoseek.tasks.program import ProgramTask
from nanoseek.tasks.registry import TASKS, get_task
from nanoseek.tasks.rewards import (
    RewardBreakdown,
    RewardFn,
    RewardWeights,
    accuracy_reward,
    format_reward,
    score,
    score_batch,
    task_reward_fn,
)
from nanoseek.tasks.template import Parsed, format_response, parse_completion, pretraining_documents, prompt_text

__all__ = [
    "ArithmeticTask",
    "CountdownTask",
    "Parsed",
    "ProgramTask",
    "Problem",
    "RewardBreakdown",
    "RewardFn",
    "RewardWeights",
    "Split",
    "TASKS",
    "Task",
    "TaskError",
    "accuracy_reward",
    "format_response",
    "format_reward",
    "get_task",
    "parse_completion",
    "pretraining_documents",
    "prompt_text",
    "score",
    "score_batch",
    "split_of",
    "task_reward_fn",
]
