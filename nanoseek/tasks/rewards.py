"""Rule-based rewards for R1-Zero (R1 paper, section 2.2.2): accuracy from the task's exact verifier plus a
format reward for the `<think>...</think> <answer>...</answer>` layout. No learned reward model.

    score(problem, completion)                    # RewardBreakdown(total=1.1, accuracy=1.0, format=1.0)
    score_batch(problems, completions)            # the same for many; program tests run in parallel
    RewardWeights(accuracy=1.0, format=0.1)       # total = accuracy_weight * accuracy + format_weight * format

`completion` is the text the model wrote after the prompt. Each reward is a plain function
(problem, completion) -> float in {0, 1}. The answer is parsed by `template.parse_completion`: an empty,
missing, duplicated or not-final answer scores 0 accuracy whatever it contains; accuracy does not
require the think part to be well formed (format has its own reward), as in R1-Zero.
With the default weights a right, well-formed completion scores 1.1, a wrong well-formed one 0.1
(TinyZero's 1.0 / 0.1 / 0 ladder, with format and accuracy kept separate).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from nanoseek.tasks.base import Problem, Task
from nanoseek.tasks.registry import get_task
from nanoseek.tasks.template import Parsed, parse_completion

__all__ = [
    "Parsed",
    "RewardBreakdown",
    "RewardFn",
    "RewardWeights",
    "accuracy_reward",
    "format_reward",
    "parse_completion",
    "score",
    "score_batch",
    "task_reward_fn",
]

RewardFn = Callable[[Sequence[Problem], Sequence[str]], list["RewardBreakdown"]]


@dataclass(frozen=True)
class RewardWeights:
    accuracy: float = 1.0
    format: float = 0.1


@dataclass(frozen=True)
class RewardBreakdown:
    total: float  # weights.accuracy * accuracy + weights.format * format
    accuracy: float  # 1.0 if the answer verifies, else 0.0
    format: float  # 1.0 if the completion is well formed, else 0.0


def format_reward(problem: Problem, completion: str) -> float:
    """1.0 for exactly `<think>...</think> <answer>...</answer>` (then optionally EOS), else 0.0."""
    return float(parse_completion(completion).well_formed)


def accuracy_reward(problem: Problem, completion: str, task: Task | None = None) -> float:
    """1.0 if the completion's one final answer passes the task's verifier, else 0.0."""
    answer = parse_completion(completion).answer
    if not answer:
        return 0.0
    return float((task or get_task(problem.task)).verify(problem, answer))


def score(
    problem: Problem, completion: str, weights: RewardWeights = RewardWeights(), task: Task | None = None
) -> RewardBreakdown:
    """Both rewards and their weighted sum for one completion."""
    return score_batch([problem], [completion], weights, {problem.task: task} if task else None)[0]


def score_batch(
    problems: Sequence[Problem],
    completions: Sequence[str],
    weights: RewardWeights = RewardWeights(),
    tasks: Mapping[str, Task] | None = None,
) -> list[RewardBreakdown]:
    """`score` for many completions (e.g. G per prompt). Verification is batched per task through
    `Task.verify_batch`, so the program task runs its sandboxes in parallel. `tasks` maps a task name to
    the instance that verifies it (default: the task with default knobs, e.g. default sandbox limits)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    parsed = [parse_completion(c) for c in completions]
    accuracy = [0.0] * len(problems)
    by_task: dict[str, list[int]] = {}
    for i, (p, pc) in enumerate(zip(problems, parsed)):
        if pc.answer:  # empty or missing answers are never verified, never correct
            by_task.setdefault(p.task, []).append(i)
    for name, idx in by_task.items():
        task = (tasks or {}).get(name) or get_task(name)
        ok = task.verify_batch([problems[i] for i in idx], [parsed[i].answer for i in idx])
        for i, good in zip(idx, ok):
            accuracy[i] = float(good)
    return [
        RewardBreakdown(
            total=weights.accuracy * acc + weights.format * float(pc.well_formed),
            accuracy=acc,
            format=float(pc.well_formed),
        )
        for acc, pc in zip(accuracy, parsed)
    ]


def task_reward_fn(task: Task, weights: RewardWeights = RewardWeights()) -> RewardFn:
    """The reward every caller uses (GRPO, evaluation, the zero pipeline, distillation, benchmarks):
    `fn(problems, completions)` scores completions of `task`'s problems with `task` itself as the verifier
    (its knobs, e.g. sandbox limits, apply)."""
    return lambda problems, completions: score_batch(problems, completions, weights, {task.name: task})
