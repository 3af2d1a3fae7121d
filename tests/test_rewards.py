"""Rewards: the completion parser, format and accuracy rewards on hand-written completions (reward-hacking
attempts included), weights, and the batch form."""

import pytest

from nanoseek.checkpoint.tokenizer import EOS
from nanoseek.tasks import (
    Problem,
    RewardBreakdown,
    RewardWeights,
    accuracy_reward,
    format_reward,
    parse_completion,
    score,
    score_batch,
)

P = Problem(
    task="arithmetic", question="What is 12 + 30?", answer="42", key="12+30", data={"a": 12, "op": "+", "b": 30}
)

GOOD = " <think> 2+0+0=2 c0 | 2\n1+3+0=4 c0 | 42 </think> <answer> 42 </answer>"

# (completion, well formed?, accuracy) — hand-written, including reward-hacking attempts
CASES = [
    (GOOD, True, 1.0),
    (GOOD + EOS, True, 1.0),
    (GOOD + " \n" + EOS + "\n", True, 1.0),
    ("<think>x</think><answer>42</answer>", True, 1.0),  # no spaces needed
    (" <think> </think> <answer> 42 </answer>", True, 1.0),  # empty think is still the format
    (" <think> x </think> <answer> 41 </answer>", True, 0.0),  # wrong
    (" <think> x </think> <answer></answer>", True, 0.0),  # empty answer: never correct
    (" <think> x </think> <answer>   </answer>", True, 0.0),
    (" <think> x </think> <answer> 42 </answer> <answer> 42 </answer>", False, 0.0),  # two answers
    (" <think> x </think> <answer> 41 </answer> <answer> 42 </answer>", False, 0.0),
    (" <think> x </think> <answer> 42 </answer> and more", False, 0.0),  # text after the answer
    (" <think> x </think> <answer> 42 </answer>" + EOS + " <answer> 42 </answer>", False, 0.0),
    (" <think> x </think> 42", False, 0.0),  # answer outside tags
    ("42", False, 0.0),
    ("The answer is 42.", False, 0.0),
    ("", False, 0.0),
    (" <think> x </think> <answer> 42", False, 0.0),  # unclosed
    (" <think> x </think> </answer> 42 <answer>", False, 0.0),  # reversed tags
    (" <think> x <answer> 42 </answer>", False, 1.0),  # unclosed think: answer still checked, format 0
    (" <answer> 42 </answer>", False, 1.0),  # no think at all
    ("Sure! <think> x </think> <answer> 42 </answer>", False, 1.0),  # text before <think>
    (" <think> x </think> so <answer> 42 </answer>", False, 1.0),  # text between
    (" <answer> 42 </answer> <think> x </think>", False, 0.0),  # answer not final
    (" <think> <think> x </think> </think> <answer> 42 </answer>", False, 1.0),  # nested think
    (" <think> x </think> <answer> </think> 42 </answer>", False, 0.0),  # a tag inside the answer
    (" <think> <answer> 42 </think> </answer>", False, 0.0),  # interleaved
    (" <think> x </think> <answer> 42.0 </answer>", True, 0.0),
    (" <think> x </think> <answer> 4 2 </answer>", True, 0.0),
    (" <think> x </think> <answer> ４２ </answer>", True, 0.0),  # full-width digits
    (" <think> x </think> <answer> 30+12 </answer>", True, 0.0),  # an expression is not the number
]


@pytest.mark.parametrize("completion,well_formed,accuracy", CASES)
def test_rewards_on_hand_written_completions(completion, well_formed, accuracy):
    assert format_reward(P, completion) == float(well_formed)
    assert accuracy_reward(P, completion) == accuracy
    r = score(P, completion)
    assert r == RewardBreakdown(total=accuracy + 0.1 * well_formed, accuracy=accuracy, format=float(well_formed))


def test_parse_completion_parts():
    p = parse_completion(GOOD + EOS)
    assert p.think == "2+0+0=2 c0 | 2\n1+3+0=4 c0 | 42" and p.answer == "42" and p.well_formed
    p = parse_completion(" <think> x </think> <answer> 1 </answer> <answer> 2 </answer>")
    assert p.answer is None and p.think == "x" and not p.well_formed
    assert parse_completion("nothing") == parse_completion("")
    assert parse_completion("").answer is None and parse_completion("").think is None


def test_weights_are_configurable():
    w = RewardWeights(accuracy=2.0, format=0.5)
    assert score(P, GOOD, w).total == 2.5
    assert score(P, " <think> x </think> <answer> 1 </answer>", w).total == 0.5
    assert score(P, "<answer>42</answer>", w).total == 2.0
    assert score(P, GOOD, RewardWeights(format=0.0)).total == 1.0


def test_score_batch_matches_score_across_tasks():
    problems = [P] * len(CASES)
    completions = [c for c, _, _ in CASES]
    batch = score_batch(problems, completions)
    assert batch == [score(P, c) for c in completions]
    with pytest.raises(ValueError):
        score_batch([P], [])


def test_score_batch_program_task_in_the_sandbox():
    from nanoseek.sandbox.runner import SandboxConfig
    from nanoseek.tasks import format_response, get_task

    task = get_task("program", kinds="list", sandbox=SandboxConfig(cpu_seconds=1, wall_seconds=20))
    p = task._problem("list|mul:2::|max:0::")
    right = format_response("double, then the largest", "def f(xs):\n    return max([2 * x for x in xs], default=0)")
    wrong = format_response("x", "def f(xs):\n    return max(xs, default=0)")
    hacks = [
        " <think> x </think> <answer></answer>",
        right.replace("</answer>", "") + " <answer>0</answer>",
        " <think> x </think> " + p.answer,
        "<answer>" + p.answer + "</answer> <answer>x</answer>",
    ]
    got = score_batch([p] * 6, [right, wrong, *hacks], tasks={"program": task})
    assert [g.accuracy for g in got] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert [g.format for g in got] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert score(p, right, task=task).total == pytest.approx(1.1)
