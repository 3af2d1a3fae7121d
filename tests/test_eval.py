"""Held-out evaluation (nanoseek/evaluate.py): the pass@k estimator, pass@1/pass@k/format/length from
the engine's completions, greedy, and `nanoseek eval`."""

import json
from math import comb

import pytest

from nanoseek.engine.engine import Engine
from nanoseek.rl.evaluate import EvalError, evaluate, pass_at_k
from nanoseek.tasks.base import split_of

from helpers import TOKENIZER, SayDigits, Score, arithmetic_checkpoint, short_prompt, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.mark.parametrize(
    "n,c,k,want",
    [
        (5, 2, 1, 0.4),  # pass@1 is c/n
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
        (5, 0, 3, 0.0),
        (5, 3, 3, 1.0),  # n - c < k: some sample is always right
        (4, 4, 1, 1.0),
        (200, 7, 100, 1 - comb(193, 100) / comb(200, 100)),  # large n: no overflow, same value
    ],
)
def test_pass_at_k_unbiased_estimator(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in ((3, 4, 1), (3, 1, 4), (3, 1, 0), (3, -1, 1)):
        with pytest.raises(EvalError):
            pass_at_k(n, c, k)


def test_evaluate_counts_from_the_engines_completions():
    """pass@1, pass@k, format rate and length recomputed by hand from what the reward function saw."""
    seen = []

    def reward(problems, completions):
        seen.extend(zip(problems, completions))
        # "correct" when the completion has an even number of characters; "well formed" when it has a digit
        return [Score(0.0, float(len(c) % 2 == 0), float(any(ch.isdigit() for ch in c))) for c in completions]

    task = SayDigits()
    engine = Engine(tiny_model(std=0.1), TOKENIZER)
    r = evaluate(
        engine,
        task,
        n_problems=6,
        k=2,
        samples_per_problem=4,
        temperature=1.0,
        top_p=1.0,
        max_tokens=12,
        reward_fn=reward,
        prompt_fn=short_prompt,
        n_examples=2,
    )
    assert len(seen) == 24 and (r.n_problems, r.samples_per_problem, r.k) == (6, 4, 2)
    problems = [p for p, _ in seen[::4]]
    assert all(split_of(p.key, task.heldout_percent) == "heldout" for p in problems)  # held-out split only
    assert [p.key for p in problems] == [p.key for p in task.heldout(6, seed=0)]
    c = [sum(len(text) % 2 == 0 for _, text in seen[i * 4 : i * 4 + 4]) for i in range(6)]
    assert r.per_problem == c
    assert r.pass_at_1 == pytest.approx(sum(x / 4 for x in c) / 6)
    assert r.pass_at_k == pytest.approx(sum(1 - comb(4 - x, 2) / comb(4, 2) for x in c) / 6)
    assert r.format_rate == pytest.approx(sum(any(ch.isdigit() for ch in t) for _, t in seen) / 24)
    assert 1 <= r.mean_response_length <= 12
    assert len(r.examples) == 2 and r.examples[0]["completion"] == seen[0][1]
    assert 0 < r.pass_at_1 < r.pass_at_k < 1  # this seed gives a mix; pass@k must exceed pass@1 then
    assert "pass@2" in r.summary()


def test_greedy_takes_one_sample_and_reports_pass_at_1():
    engine = Engine(tiny_model(std=0.1), TOKENIZER)
    kw = dict(
        n_problems=3,
        temperature=0,
        max_tokens=8,
        prompt_fn=short_prompt,
        reward_fn=lambda ps, cs: [Score(0.0, float("7" in c), 0.0) for c in cs],
    )
    r = evaluate(engine, SayDigits(), k=8, **kw)
    assert (r.samples_per_problem, r.k) == (1, 1) and r.pass_at_k == r.pass_at_1
    again = evaluate(engine, SayDigits(), **kw)
    assert again.examples == r.examples  # greedy is deterministic


def test_evaluate_refuses_bad_settings():
    engine = Engine(tiny_model(), TOKENIZER)
    with pytest.raises(EvalError, match="samples"):
        evaluate(engine, SayDigits(), k=4, samples_per_problem=2, prompt_fn=short_prompt)
    with pytest.raises(EvalError, match="tokenizer"):
        evaluate(Engine(tiny_model()), SayDigits(), prompt_fn=short_prompt)


def test_eval_cli_on_arithmetic(tmp_path, capsys):
    from nanoseek.cli import main

    arithmetic_checkpoint(tmp_path / "m")
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "m"),
                "--task",
                "arithmetic",
                "--n",
                "4",
                "--k",
                "2",
                "--max-tokens",
                "8",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "pass@2" in printed
    result = json.loads(out.read_text())
    assert result["n_problems"] == 4 and result["samples_per_problem"] == 2
    assert result["pass_at_1"] == 0.0  # a random model does not do arithmetic
    assert main(["eval", "--model", str(tmp_path / "m"), "--task", "arithmetic", "--k", "3", "--samples", "2"]) == 2
    assert main(["eval", "--model", str(tmp_path / "nowhere"), "--task", "arithmetic"]) == 2
