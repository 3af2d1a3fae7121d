"""Verifiable tasks: generators, exact verifiers (right, wrong, malformed, adversarial answers), worked
solutions that verify, the hash-based held-out split, the registry and the pretraining documents."""

import random
import re

import pytest

from nanoseek.checkpoint.tokenizer import BOS, EOS, R1_ZERO_PREAMBLE
from nanoseek.errors import NanoseekError
from nanoseek.sandbox.runner import SandboxConfig
from nanoseek.tasks import (
    TASKS,
    Problem,
    TaskError,
    format_response,
    get_task,
    parse_completion,
    pretraining_documents,
    prompt_text,
    split_of,
)
from nanoseek.tasks.arithmetic import ArithmeticTask, trace
from nanoseek.tasks.countdown import CountdownTask

# How many generated problems each task's generic tests check (the program task runs a sandbox per check).
N_CHECK = {"arithmetic": 400, "countdown": 200, "program": 40}


# The program task's sandbox with a shorter CPU limit: junk like 9**9**9 runs until it hits the limit.
KNOBS = {"program": {"sandbox": SandboxConfig(cpu_seconds=1, wall_seconds=20)}}


def _problems(name, n, seed=0, **knobs):
    task = get_task(name, **{**KNOBS.get(name, {}), **knobs})
    rng = random.Random(seed)
    return task, [task.sample(rng) for _ in range(n)]


# ---------------------------------------------------------------- every task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reference_answer_and_solution_verify(name):
    task, problems = _problems(name, N_CHECK.get(name, 100))
    answers = [p.answer for p in problems]
    assert all(task.verify_batch(problems, answers)), "a reference answer failed its own verifier"
    for p in problems:
        sol = task.solution(p)
        assert sol.strip() and "<think>" not in sol and "</answer>" not in sol


@pytest.mark.parametrize("name", sorted(TASKS))
def test_verifier_rejects_wrong_empty_and_junk(name):
    task, problems = _problems(name, 2 if name == "program" else 30, seed=1)
    junk = [
        "",
        " ",
        "\n",
        "None",
        "<answer>",
        "</answer>",
        "__import__('os').system('true')",
        "9**9**9",
        "(" * 500 + "1" + ")" * 500,
        "1" * 10_000,
        "٣",
        "x" * 100_000,
    ]
    for p in problems:
        others = [q.answer for q in problems if q.key != p.key and q.answer != p.answer][:3]
        bad = junk + others
        assert not any(task.verify_batch([p] * len(bad), bad)), f"{p.key}: accepted one of {bad!r}"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_split_is_by_key_not_seed(name):
    task = get_task(name)
    heldout_keys = {p.key for p in task.heldout(20, seed=0)}
    assert all(split_of(k, task.heldout_percent) == "heldout" for k in heldout_keys)
    for seed in range(3):  # training draws, whatever the seed, never hit a held-out key
        rng = random.Random(seed)
        train = [task.sample(rng, "train") for _ in range(300)]
        assert all(split_of(p.key, task.heldout_percent) == "train" for p in train)
        assert not heldout_keys & {p.key for p in train}
    # the eval set is reproducible, and distinct problems
    again = task.heldout(20, seed=0)
    assert [p.key for p in again] == [p.key for p in task.heldout(20, seed=0)]
    assert len({p.key for p in again}) == 20


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_is_seeded(name):
    _, a = _problems(name, 20, seed=5)
    _, b = _problems(name, 20, seed=5)
    assert [p.key for p in a] == [p.key for p in b] and [p.question for p in a] == [p.question for p in b]


def test_heldout_set_is_fixed_over_whole_space():
    """On a problem space small enough to enumerate (1-digit +), the held-out keys are a fixed, hash-given
    ~10% and sampling the train split from any seed never yields one."""
    task = ArithmeticTask(min_digits=1, max_digits=1, ops="+")
    space = {f"{a}+{b}" for a in range(10) for b in range(10)}
    heldout = {k for k in space if split_of(k, task.heldout_percent) == "heldout"}
    assert 2 <= len(heldout) <= 25
    for seed in (0, 1, 123):
        rng = random.Random(seed)
        seen = {task.sample(rng, "train").key for _ in range(2000)}
        assert seen == space - heldout  # the whole train side is reachable, nothing else
        assert {p.key for p in task.heldout(len(heldout), seed=seed)} == heldout


def test_registry_and_knob_errors():
    assert set(TASKS) == {"arithmetic", "countdown", "program"}
    assert get_task("arithmetic", max_digits=5).max_digits == 5
    with pytest.raises(NanoseekError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(TaskError, match="no knob 'digitz'"):
        get_task("arithmetic", digitz=3)
    with pytest.raises(TaskError, match="min_digits"):
        get_task("arithmetic", min_digits=4, max_digits=2)
    with pytest.raises(TaskError, match="ops"):
        get_task("arithmetic", ops="/")
    with pytest.raises(TaskError, match="held-out"):
        ArithmeticTask(min_digits=1, max_digits=1, ops="+").heldout(50)


# ---------------------------------------------------------------- arithmetic

_ADD = re.compile(r"(\d)\+(\d)\+(\d)=(\d+) c(\d) \| (\d+)")
_SUB = re.compile(r"(\d)-(\d)-(\d)(?: -> 1\d-\d-\d)?=(\d) b(\d) \| (\d+)")
_MUL = re.compile(r"(\d)\*(\d)\+(\d)=(\d+) c(\d) \| (\d+)")


def _check_trace_lines(text):
    """Every column line is right and continues the one above: its carry-in is the previous carry-out and
    its digits-so-far are the previous ones with one digit put in front."""
    prev = None  # (carry_out, so_far) of the previous column line of the same block
    for line in text.splitlines():
        m = _ADD.fullmatch(line) or _MUL.fullmatch(line) or _SUB.fullmatch(line)
        if not m:
            prev = None
            continue
        x, y, c_in, s, c_out, so_far = m.groups()
        x, y, c_in, s, c_out = map(int, (x, y, c_in, s, c_out))
        if m.re is _ADD:
            assert s == x + y + c_in and c_out == s // 10, line
        elif m.re is _MUL:
            assert s == x * y + c_in and c_out == s // 10, line
        else:
            assert (x - y - c_in) % 10 == s and c_out == int(x - y - c_in < 0), line
        assert so_far[0] == str(s % 10), line
        if prev is not None:
            assert c_in == prev[0] and so_far[1:] == prev[1], line
        else:
            assert c_in == 0 and len(so_far) == 1, line
        prev = (c_out, so_far)


def test_arithmetic_trace_lines_are_each_right():
    task = ArithmeticTask(min_digits=1, max_digits=5)
    rng = random.Random(3)
    for _ in range(300):
        p = task.sample(rng)
        sol = task.solution(p)
        _check_trace_lines(sol)
        assert sol.splitlines()[-1] == f"{p.data['a']}{p.data['op']}{p.data['b']}={p.answer}"


def test_arithmetic_trace_examples():
    assert trace(4832, "+", 957).splitlines() == [
        "4832 + 957",
        "2+7+0=9 c0 | 9",
        "3+5+0=8 c0 | 89",
        "8+9+0=17 c1 | 789",
        "4+0+1=5 c0 | 5789",
        "4832+957=5789",
    ]
    assert trace(95, "+", 7).splitlines()[-2:] == ["0+0+1=1 c0 | 102", "95+7=102"]
    assert trace(1000, "-", 999).splitlines()[-1] == "1000-999=1"
    assert trace(3, "-", 10).splitlines() == [
        "3 - 10 = -(10-3)",
        "10-3",
        "0-3-0 -> 10-3-0=7 b1 | 7",
        "1-0-1=0 b0 | 07",
        "10-3=7",
        "3-10=-7",
    ]
    mul = trace(4832, "*", 57).splitlines()
    assert "4832*5=24160, shift 1: 241600" in mul and "33824+241600=275424" in mul
    assert mul[-1] == "4832*57=275424"
    assert trace(12, "*", 0) == "12*0=0"
    assert "4832*0=0" in trace(4832, "*", 507)


def test_arithmetic_verifier_rules():
    task = ArithmeticTask()
    p = task.generate(random.Random(0))
    p = type(p)(
        task="arithmetic", question="What is 12 - 30?", answer="-18", key="12-30", data={"a": 12, "op": "-", "b": 30}
    )
    for good in ["-18", " -18 ", "\n-18\n", "-018"]:
        assert task.verify(p, good), good
    for bad in [
        "18",
        "-18.0",
        "-1 8",
        "−18",
        "-18=",
        "12-30=-18",
        "-١٨",
        "-18\x00",
        "--18",
        "-0x12",
        "1e1",
        "-" + "0" * 60 + "18",
    ]:
        assert not task.verify(p, bad), bad
    assert not task.verify(type(p)(task="arithmetic", question="", answer="", key="?", data={}), "1")


def test_arithmetic_knobs():
    task = ArithmeticTask(min_digits=3, max_digits=3, ops="*")
    for p in _problems("arithmetic", 50, min_digits=3, max_digits=3, ops="*")[1]:
        assert p.data["op"] == "*" and 100 <= p.data["a"] <= 999 and 100 <= p.data["b"] <= 999
    assert task.knobs() == {"min_digits": 3, "max_digits": 3, "ops": "*"}


# ---------------------------------------------------------------- documents and the prompt


def test_prompt_is_r1_zero_template():
    p = get_task("arithmetic").generate(random.Random(0))
    assert prompt_text(p) == f"{BOS}{R1_ZERO_PREAMBLE} User: {p.question} Assistant:"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_pretraining_documents(name):
    task = get_task(name)
    docs = list(pretraining_documents(task, 40, seed=0, reasoning_fraction=0.5))
    n_reasoning, checks = 0, []
    for doc in docs:
        assert doc.startswith(BOS + R1_ZERO_PREAMBLE) and doc.endswith(EOS) and doc.count(EOS) == 1
        prompt, response = doc.split(" Assistant:", 1)
        parsed = parse_completion(response)
        assert parsed.well_formed and parsed.answer
        q = prompt.split(" User: ", 1)[1]
        p = next(p for p in _problems_for_question(task, docs) if p.question == q)
        checks.append((p, parsed.answer))
        assert split_of(p.key, task.heldout_percent) == "train"
        n_reasoning += bool(parsed.think)
        if parsed.think:
            assert parsed.think == task.solution(p)
    assert all(task.verify_batch([p for p, _ in checks], [a for _, a in checks]))
    assert 8 <= n_reasoning <= 32
    # same problems whatever the reasoning fraction; none or all reasoning at the ends
    q = [d.split(" Assistant:")[0] for d in docs]
    none = list(pretraining_documents(task, 40, seed=0, reasoning_fraction=0.0))
    assert [d.split(" Assistant:")[0] for d in none] == q
    assert all(" <think> </think> <answer> " in d for d in none)
    every = list(pretraining_documents(name, 5, seed=0))
    assert all(parse_completion(d.split(" Assistant:", 1)[1]).think for d in every)
    with pytest.raises(TaskError):
        next(pretraining_documents(task, 1, seed=0, reasoning_fraction=1.5))


_CACHE = {}


def _problems_for_question(task, docs):
    """The problems behind the documents (regenerated with the corpus's own seeding)."""
    key = (task.name, len(docs))
    if key not in _CACHE:
        rng = random.Random(f"{task.name}-corpus-train-0")
        _CACHE[key] = [task.sample(rng, "train") for _ in range(len(docs))]
    return _CACHE[key]


def test_format_response_round_trip():
    for think, answer in [("a\nb", "42"), ("", "7"), ("  x  ", " def f(x):\n    return x ")]:
        r = format_response(think, answer)
        parsed = parse_completion(r + EOS)
        assert parsed.well_formed and parsed.think == think.strip() and parsed.answer == answer.strip()
    assert format_response("", "1") == " <think> </think> <answer> 1 </answer>"


# ---------------------------------------------------------------- countdown


def _countdown(numbers, target):
    from nanoseek.tasks import Problem

    return Problem(task="countdown", question="", answer="", key="", data={"numbers": numbers, "target": target})


def test_countdown_accepts_any_correct_expression():
    task = get_task("countdown")
    p = _countdown([25, 37, 40, 12], 90)
    for good in [
        "(40+37+25)-12",
        "40+37+25-12",
        " 40 + 37 + 25 - 12 ",
        "((40+37)+25)-12 = 90",
        "25+37+40-12",
        "40 + 37 + 25 − 12",
        "(40+37+25)-12=90",
    ]:
        assert task.verify(p, good), good
    assert task.verify(_countdown([3, 4, 6], 8), "6/(3/4)")  # exact fractions in between
    assert task.verify(_countdown([3, 4, 6], 18), "6×3")  # a subset: each number at most once
    assert task.verify(_countdown([3, 4, 6], 2), "6÷3")
    assert task.verify(_countdown([5, 5, 2], 50), "5*5*2")  # a repeated number may be used as often as given


def test_countdown_rejects_wrong_malformed_and_adversarial():
    task = get_task("countdown")
    p = _countdown([25, 37, 40, 12], 90)
    bad = [
        "40+37+25-12=91",
        "40+37+25-12=90=90",
        "40+37+25",
        "40+40+10",
        "37+37+16",  # wrong / reuse / not given
        "90",
        "(40+37+25)-12)",
        "((40+37+25)-12",
        "40+37+25-12.0",
        "40+37+25-1_2",
        "-12+40+37+25",
        "40+37+25-(+12)",
        "2**5+58",
        "9**9**9",
        "40//1+50",
        "40%7",
        "__import__('os').system('echo hi')",
        "x",
        "print(90)",
        "(lambda: 90)()",
        "[90][0]",
        "40+37+25-12 if 1 else 0",
        "40+37+25-12;",
        "0x5a",
        "４０+37+25-12",
        "٤٠+37+25-12",
        "1e2-10",
        "90j",
        "True+89",
        "40 37 25 12",
        "",
        "(" * 17 + "40" + ")" * 17 + "+37+25-12",  # nesting beyond the bound
        "(" * 100_000 + ")" * 100_000,
        "1" * 100_000,
        "12" * 101,
        "40+37+25-12" + " " * 200,
        "999999999999999999999-999999999999999999909",  # enormous literals
    ]
    for b in bad:
        assert not task.verify(p, b), b
    assert not task.verify(_countdown([5, 3, 3], 5), "5/(3-3)")  # division by zero
    assert not task.verify(_countdown([1000] * 6, 1), "1000*1000*1000*1000*1000/1000")  # intermediate bound
    assert not task.verify(_countdown([5, 3, 3], 5), "5/(3-3)=5")
    assert not task.verify(_countdown([2, 3], 6), "2*3" + "=6" * 2)


def test_countdown_search_trace():
    from nanoseek.tasks.countdown import search

    lines, expr = search([23, 3, 7, 19], 38, 100)
    assert lines[0] == "23 3 7 19: 23+19=42 -> 3 7 42" and lines[-1].endswith("-> 38 done")
    assert "7 39: 39-7=32 -> 32 x" in lines and expr == "((23+19)-7)+3"
    task = get_task("countdown", max_search_steps=5)
    rng = random.Random(0)
    for _ in range(50):
        p = task.sample(rng)
        sol = task.solution(p).splitlines()
        assert len(sol) <= 5 + 2 and sol[-1] == f"so {p.answer}={p.data['target']}"
        assert p.data["target"] not in p.data["numbers"] and 3 <= len(p.data["numbers"]) <= 4


# ---------------------------------------------------------------- program (answers run in the sandbox)


def _program_problem():
    task = get_task("program", kinds="list", **KNOBS["program"])
    key = "list|add:3::|even:0::|sum:0::"
    return task, task._problem(key)


def test_program_question_tests_and_reference():
    task, p = _program_problem()
    assert p.question.startswith(
        "Write a Python function f(xs) that takes a list of integers, adds 3 to "
        "every element, then keeps the even elements, then returns their sum."
    )
    assert p.answer == (
        "def f(xs):\n    xs = [x + 3 for x in xs]\n    xs = [x for x in xs if x % 2 == 0]\n    return sum(xs)"
    )
    assert len(p.data["tests"]) == 8 and [[]] in p.data["tests"]
    for (xs,), want in zip(p.data["tests"], p.data["expected"]):
        assert want == sum(x + 3 for x in xs if (x + 3) % 2 == 0)
    assert p == task._problem(p.key) and p.data == task._problem(p.key).data  # tests belong to the key
    sol = task.solution(p).splitlines()
    assert sol[0] == "f(xs): adds 3 to every element; keeps the even elements; returns their sum"
    assert sol[-4:] == p.answer.splitlines()


def test_program_verifier_runs_answers_in_the_sandbox():
    task, p = _program_problem()
    good = [
        p.answer,
        "def f(xs):\n    return sum(x + 3 for x in xs if (x + 3) % 2 == 0)",
        "```python\ndef f(xs):\n    return sum(y for y in (x + 3 for x in xs) if y % 2 == 0)\n```",
        "import math\n\ndef helper(x):\n    return x + 3\n\ndef f(xs):\n    print('debug output is fine')\n"
        "    return sum(filter(lambda y: y % 2 == 0, map(helper, xs)))",
    ]
    bad = [
        "def f(xs):\n    return sum(x + 3 for x in xs)",  # wrong
        "def f(xs):\n    return float(sum(x + 3 for x in xs if (x + 3) % 2 == 0))",  # 10.0 is not 10
        "def g(xs):\n    return 0",  # no f
        "def f(xs):\n    return sum(",  # syntax error
        "def f(xs):\n    while True:\n        pass",  # never returns: CPU limit
        "import sys\nsys.exit(0)",  # exits before the harness reports
        'import sys\nsys.stdout.write(\'\\n@@nanoseek-results@@["0", "0"]\\n\')\nsys.exit(0)',  # forged report
        "print('all tests passed')\ndef f(xs):\n    return 0",
        "__import__('os').system('touch /tmp/nanoseek-pwned')",
        "import os\ndef f(xs):\n    os.fork()\n    return 0",
        "import socket\ndef f(xs):\n    socket.socket()\n    return 0",
        "def f(xs):\n    return open('/etc/passwd').read()",
        "x = 'a' * (10 ** 10)",  # memory
        "while True:\n    print('x' * 10000)",  # output flood
        "",
        "   ",
        "x" * 5000,
        "def f(xs): return 0\n" * 300,
    ]
    ok = task.verify_batch([p] * (len(good) + len(bad)), good + bad)
    assert ok == [True] * len(good) + [False] * len(bad), [a for a, o in zip(good + bad, ok)]
    assert not __import__("os").path.exists("/tmp/nanoseek-pwned")


def test_program_verify_batch_runs_each_distinct_answer_once(monkeypatch):
    import nanoseek.tasks.program as program

    task, p = _program_problem()
    calls = []
    real = program.run_many
    monkeypatch.setattr(program, "run_many", lambda codes, *a, **k: calls.append(len(codes)) or real(codes, *a, **k))
    wrong = "def f(xs):\n    return 0"
    assert task.verify_batch([p] * 6, [p.answer, wrong, p.answer, wrong, "", p.answer]) == [
        True,
        False,
        True,
        False,
        False,
        True,
    ]
    assert calls == [2]


# ---- trace statistics (what RL changes in the traces; the report states the rules) --------------------------
def test_countdown_trace_stats_count_tries_dead_ends_backtracks_and_checks():
    task = CountdownTask(min_count=3, max_count=3)
    p = Problem("countdown", "", "", "k", {"numbers": [11, 17, 16], "target": 12})
    trace = task.solution(p)  # 6 tries: a first branch of 3 dead ends, then the answer
    assert task.trace_stats(p, trace) == {
        "tries": 6.0,
        "right_steps": 1.0,
        "dead_ends": 3.0,
        "backtracks": 3.0,  # twice back to "16 6" after a dead end, once back to the start
        "checked_answer": 1.0,
    }
    wrong = "11 17 16: 17-11=5 -> 16 5\n16 5: 16-5=11 -> 11 x\nso 16-(17-11)=12"  # a wrong step, a wrong answer
    assert task.trace_stats(p, wrong) == {
        "tries": 2.0,
        "right_steps": 0.5,
        "dead_ends": 1.0,
        "backtracks": 0.0,
        "checked_answer": 0.0,
    }
    assert task.trace_stats(p, "no search at all")["tries"] == 0.0
    assert task.trace_stats(p, "11 17 16: 17/0=0 -> 16 0")["right_steps"] == 0.0  # a model's division by zero
    assert set(task.trace_stats(p, "")) == set(CountdownTask.trace_rules)


def test_arithmetic_trace_stats_say_whether_the_trace_restates_the_question():
    task = ArithmeticTask(min_digits=2, max_digits=2, ops="+")
    p = Problem("arithmetic", "What is 38 + 85?", "123", "38+85", {"a": 38, "op": "+", "b": 85})
    assert task.trace_stats(p, task.solution(p)) == {"restates_question": 1.0, "states_answer": 1.0}
    # right columns under a header that restates other operands (an unfaithful trace)
    unfaithful = "58 + 85\n8+5+0=13 c1 | 3\n3+8+1=12 c1 | 23\n0+0+1=1 c0 | 123\n48+85=123"
    assert task.trace_stats(p, unfaithful) == {"restates_question": 0.0, "states_answer": 0.0}
