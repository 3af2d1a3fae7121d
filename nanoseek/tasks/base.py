"""What every verifiable task provides: generated problems, an exact verifier, a worked solution, a fixed split.

A task is generated, never downloaded. One generator per task is shared by the pretraining corpus, GRPO
and eval, so they all see the same distribution; which problems are held out is decided by a hash of the
problem's canonical `key`, not by a seed, so no training run, whatever its seed, can draw a held-out
problem.

A task is a dataclass whose fields are its difficulty knobs (`get_task("arithmetic", max_digits=4)`).
`verify` depends only on the problem (its `data`), never on the knobs, so a problem can be checked by any
instance of its task (the rewards build a default one from `problem.task`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from nanoseek.errors import NanoseekError

Split = Literal["train", "heldout"]


class TaskError(NanoseekError):
    """A task asked for something it cannot give: an unknown task or knob, a knob out of range, too few problems."""


@dataclass(frozen=True)
class Problem:
    task: str  # the task's name
    question: str  # what the user is asked; goes into the prompt template
    answer: str  # a reference answer as text (for display and for answer-only corpus lines)
    key: str  # canonical identity: equal keys are the same problem; decides the split
    data: dict[str, Any] = field(default_factory=dict, compare=False)  # what the verifier needs (JSON-able)


def split_of(key: str, heldout_percent: float) -> Split:
    """'heldout' for a fixed `heldout_percent` of all keys, by hash: stable across seeds, runs and machines."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return "heldout" if (h % 10_000) < heldout_percent * 100 else "train"


class Task(ABC):
    """A closed, verifiable task. Subclasses are dataclasses (fields = difficulty knobs), set `name`, and
    implement `generate`, `verify` and `solution`."""

    name: ClassVar[str] = ""
    heldout_percent: ClassVar[float] = 10.0

    @abstractmethod
    def generate(self, rng: random.Random) -> Problem:
        """One problem drawn from the task's distribution (either split)."""

    @abstractmethod
    def verify(self, problem: Problem, answer: str) -> bool:
        """Is `answer` (the text inside <answer>...</answer>) exactly right? Never raises, never evals."""

    @abstractmethod
    def solution(self, problem: Problem) -> str:
        """A correct step-by-step reasoning trace (the text inside <think>...</think>) for pretraining."""

    # What `trace_stats` counts, by name: the rule, in words, for reports.
    trace_rules: ClassVar[dict[str, str]] = {}

    def trace_stats(self, problem: Problem, think: str) -> dict[str, float]:
        """Counts over one reasoning trace (the text inside <think>...</think>) by the simple rules of
        `trace_rules`, to see what RL changes in the traces; none for a task that defines no rules."""
        return {}

    def verify_batch(self, problems: Sequence[Problem], answers: Sequence[str]) -> list[bool]:
        """`verify` over many; tasks whose verifier is slow (the program task's sandbox) run them in parallel."""
        return [self.verify(p, a) for p, a in zip(problems, answers, strict=True)]

    def knobs(self) -> dict[str, Any]:
        """The difficulty knobs as a plain dict (for logs and reports)."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def sample(self, rng: random.Random, split: Split = "train") -> Problem:
        """A problem from one split; train and heldout never share a key."""
        for _ in range(100_000):
            p = self.generate(rng)
            if split_of(p.key, self.heldout_percent) == split:
                return p
        raise TaskError(f"{self.name}: could not draw a {split} problem; is the problem space too small?")

    def heldout(self, n: int, seed: int = 0) -> list[Problem]:
        """n distinct held-out problems, the same for the same (n, seed): the eval set."""
        rng, seen, out = random.Random(f"{self.name}-heldout-{seed}"), set(), []
        for _ in range(n * 100):
            p = self.sample(rng, "heldout")
            if p.key not in seen:
                seen.add(p.key)
                out.append(p)
                if len(out) == n:
                    return out
        raise TaskError(f"{self.name}: only {len(out)} distinct held-out problems at this difficulty")
