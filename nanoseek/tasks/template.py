"""The R1-Zero prompt and response format, defined once: prompt, response, parser, pretraining documents.

    prompt_text(problem)           # "<｜begin▁of▁sentence｜>A conversation ... User: What is 12 + 30? Assistant:"
    format_response(think, ans)    # " <think> {think} </think> <answer> {ans} </answer>"
    parse_completion(text)         # Parsed(think=..., answer=..., well_formed=...)
    pretraining_documents("arithmetic", n=1000, seed=0, reasoning_fraction=0.05)

A completion is what the model writes after the prompt. It is well formed when it is exactly
`<think>...</think>` then `<answer>...</answer>` (each tag once, in that order), with nothing but whitespace
before, between and after them, except one end-of-sentence token at the very end (R1 paper, Table 1;
the same rule as TRL's `^<think>.*?</think>\\s*<answer>.*?</answer>$`, plus the EOS).
The answer is taken only from a single `<answer>...</answer>` that ends the completion; a missing,
duplicated or trailing-text answer is no answer (so it can never be scored correct). The answer does not
depend on the think part being well formed: accuracy and format are separate rewards, as in R1-Zero.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from nanoseek.checkpoint.tokenizer import ANSWER_CLOSE, ANSWER_OPEN, EOS, THINK_CLOSE, THINK_OPEN, render_chat
from nanoseek.tasks.base import Problem, Split, Task, TaskError
from nanoseek.tasks.registry import get_task


def prompt_text(problem: Problem) -> str:
    """The R1-Zero prompt for a problem: BOS, the R1-Zero preamble, " User: {question} Assistant:"."""
    return render_chat([{"role": "user", "content": problem.question}], "r1_zero")


def format_response(think: str, answer: str) -> str:
    """The response the prompt expects: " <think> {think} </think> <answer> {answer} </answer>" (an empty
    think is written "<think> </think>"). No EOS: documents append it, the engine stops on it."""
    think, answer = think.strip(), answer.strip()
    return f" {THINK_OPEN} {think + ' ' if think else ''}{THINK_CLOSE} {ANSWER_OPEN} {answer} {ANSWER_CLOSE}"


@dataclass(frozen=True)
class Parsed:
    think: str | None  # inside the one <think>...</think> (stripped); None if missing or not unique
    answer: str | None  # inside the one final <answer>...</answer> (stripped); None if missing/duplicated
    well_formed: bool  # exactly <think>...</think> <answer>...</answer>, only whitespace (and EOS) around


def _inside(body: str, open_tag: str, close_tag: str) -> tuple[int, int] | None:
    """(start, end) of the text between the only `open_tag` and the only `close_tag` after it, else None."""
    if body.count(open_tag) != 1 or body.count(close_tag) != 1:
        return None
    i, j = body.index(open_tag) + len(open_tag), body.index(close_tag)
    return (i, j) if i <= j else None


def parse_completion(text: str) -> Parsed:
    """Split a completion into its think and answer parts and say whether it is well formed."""
    body = text.rstrip()
    if body.endswith(EOS):  # the one end-of-sentence the engine may leave at the very end
        body = body[: -len(EOS)].rstrip()
    if EOS in body:  # text after an end-of-sentence: not a single response
        return Parsed(None, None, False)
    a = _inside(body, ANSWER_OPEN, ANSWER_CLOSE)
    if a is not None and (
        body[a[1] + len(ANSWER_CLOSE) :].strip() or any(tag in body[a[0] : a[1]] for tag in (THINK_OPEN, THINK_CLOSE))
    ):
        a = None  # the answer must end the completion and hold no other tag
    t = _inside(body, THINK_OPEN, THINK_CLOSE)
    answer = body[a[0] : a[1]].strip() if a else None
    think = body[t[0] : t[1]].strip() if t else None
    well_formed = (
        a is not None
        and t is not None
        and not body[: t[0] - len(THINK_OPEN)].strip()  # nothing before <think>
        and t[1] + len(THINK_CLOSE) <= a[0] - len(ANSWER_OPEN)  # </think> before <answer>
        and not body[t[1] + len(THINK_CLOSE) : a[0] - len(ANSWER_OPEN)].strip()
    )
    return Parsed(think, answer, well_formed)


def pretraining_documents(
    task: Task | str, n: int, seed: int, reasoning_fraction: float = 1.0, split: Split = "train"
) -> Iterator[str]:
    """n corpus documents: prompt_text(problem) + format_response(think, answer) + EOS.

    A `reasoning_fraction` of the documents (drawn independently per document) carry the full worked
    solution in the think part; the others have an empty think ("<think> </think>") followed directly by
    the reference answer, so a base model trained on them mostly answers without reasoning. Problems come
    from `split` (train for any training corpus; held-out documents exist only to measure loss) and are
    the same for the same (task knobs, seed, n) whatever the reasoning_fraction.
    """
    if isinstance(task, str):
        task = get_task(task)
    if not 0.0 <= reasoning_fraction <= 1.0:
        raise TaskError(f"reasoning_fraction must be in [0, 1], got {reasoning_fraction}")
    problems = random.Random(f"{task.name}-corpus-{split}-{seed}")
    reasoning = random.Random(f"{task.name}-corpus-reasoning-{seed}")
    for _ in range(n):
        p = task.sample(problems, split)
        think = task.solution(p) if reasoning.random() < reasoning_fraction else ""
        yield prompt_text(p) + format_response(think, p.answer) + EOS
