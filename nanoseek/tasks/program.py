"""Program synthesis: write a small Python function; the answer is code, checked by running it on test
cases inside the sandbox (nanoseek.sandbox), never in this process.

    task = ProgramTask(kinds=("list", "string"), min_steps=1, max_steps=2)
    p = task.sample(random.Random(0))
    p.question   # "Write a Python function f(xs) that takes a list of integers, adds 3 to every element,
                 #  then keeps the even elements, then returns their sum. For example, f([1, 2, 3]) == 10."
    task.verify(p, "def f(xs):\\n    return sum(x + 3 for x in xs if (x + 3) % 2 == 0)")   # True

Problems are generated pipelines: a list of integers (or a string) goes through `min_steps`..`max_steps`
transformations (add/subtract/multiply by k, square, keep greater/less than k, drop equal to k, keep even
/ odd, reverse, sort, take / drop the first k; for strings reverse, upper-case, remove / replace a
letter, repeat each character k times, keep the first k) and a final result (the list, its sum, length,
largest or smallest; the string, its length, or a letter count). The parameters come from 1..max_param
and the letters from "abcde". Each problem has `n_tests` test inputs (drawn from a generator seeded by
the problem's key, one of them empty) whose expected outputs come from a reference implementation
written independently of the code templates.

An answer passes when the sandboxed program defines `f` and `repr(f(*args))` equals the expected
output's for every test, the result being built only of int, str, bool, None and lists (types count:
10.0 is not 10, True is not 1, a tuple is not a list). A ```python fence around the code
is tolerated; anything over 4000 characters is rejected unread. The sandbox only prints results; the
comparison happens here, against outputs the program never sees, so printing "all passed" earns nothing.
The worked solution writes one line of code per step, checks it on the example step by step, then
gives the whole function.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from nanoseek.sandbox.runner import SandboxConfig, run_many
from nanoseek.tasks.base import Problem, Task, TaskError

MAX_CODE_CHARS = 4000
LETTERS = "abcde"
_MARK = "@@nanoseek-results@@"


@dataclass(frozen=True)
class Op:
    text: str  # what the question says, e.g. "adds {k} to every element"
    code: str  # one line of the function body, e.g. "xs = [x + {k} for x in xs]"
    fn: Callable  # the reference: (value, k, c, d) -> value
    params: str = ""  # which of k, c, d it takes


LIST_STEPS = {
    "add": Op("adds {k} to every element", "xs = [x + {k} for x in xs]", lambda v, k, c, d: [x + k for x in v], "k"),
    "sub": Op(
        "subtracts {k} from every element", "xs = [x - {k} for x in xs]", lambda v, k, c, d: [x - k for x in v], "k"
    ),
    "mul": Op(
        "multiplies every element by {k}", "xs = [x * {k} for x in xs]", lambda v, k, c, d: [x * k for x in v], "k"
    ),
    "square": Op("squares every element", "xs = [x * x for x in xs]", lambda v, k, c, d: [x**2 for x in v]),
    "gt": Op(
        "keeps the elements greater than {k}",
        "xs = [x for x in xs if x > {k}]",
        lambda v, k, c, d: list(filter(lambda x: x > k, v)),
        "k",
    ),
    "lt": Op(
        "keeps the elements less than {k}",
        "xs = [x for x in xs if x < {k}]",
        lambda v, k, c, d: list(filter(lambda x: x < k, v)),
        "k",
    ),
    "ne": Op(
        "removes the elements equal to {k}",
        "xs = [x for x in xs if x != {k}]",
        lambda v, k, c, d: list(filter(lambda x: x != k, v)),
        "k",
    ),
    "even": Op(
        "keeps the even elements",
        "xs = [x for x in xs if x % 2 == 0]",
        lambda v, k, c, d: list(filter(lambda x: not x & 1, v)),
    ),
    "odd": Op(
        "keeps the odd elements",
        "xs = [x for x in xs if x % 2 == 1]",
        lambda v, k, c, d: list(filter(lambda x: x & 1, v)),
    ),
    "rev": Op("reverses the list", "xs = xs[::-1]", lambda v, k, c, d: list(reversed(v))),
    "sort": Op("sorts the list in increasing order", "xs = sorted(xs)", lambda v, k, c, d: sorted(v)),
    "take": Op("keeps the first {k} elements", "xs = xs[:{k}]", lambda v, k, c, d: v[:k], "k"),
    "drop": Op("drops the first {k} elements", "xs = xs[{k}:]", lambda v, k, c, d: v[k:], "k"),
}
LIST_RESULTS = {
    "list": Op("returns the list", "return xs", lambda v, k, c, d: v),
    "sum": Op("returns their sum", "return sum(xs)", lambda v, k, c, d: sum(v)),
    "len": Op("returns how many elements there are", "return len(xs)", lambda v, k, c, d: len(v)),
    "max": Op(
        "returns the largest element, or 0 if there is none",
        "return max(xs, default=0)",
        lambda v, k, c, d: max(v) if v else 0,
    ),
    "min": Op(
        "returns the smallest element, or 0 if there is none",
        "return min(xs, default=0)",
        lambda v, k, c, d: min(v) if v else 0,
    ),
}
STRING_STEPS = {
    "rev": Op("reverses it", "s = s[::-1]", lambda v, k, c, d: "".join(reversed(v))),
    "upper": Op("turns it to upper case", "s = s.upper()", lambda v, k, c, d: v.upper()),
    "remove": Op(
        "removes every '{c}'", "s = s.replace('{c}', '')", lambda v, k, c, d: "".join(ch for ch in v if ch != c), "c"
    ),
    "swap": Op(
        "replaces every '{c}' with '{d}'",
        "s = s.replace('{c}', '{d}')",
        lambda v, k, c, d: "".join(d if ch == c else ch for ch in v),
        "cd",
    ),
    "repeat": Op(
        "repeats every character {k} times",
        "s = ''.join(ch * {k} for ch in s)",
        lambda v, k, c, d: "".join(ch + ch * (k - 1) for ch in v),
        "k",
    ),
    "take": Op("keeps the first {k} characters", "s = s[:{k}]", lambda v, k, c, d: v[:k], "k"),
}
STRING_RESULTS = {
    "str": Op("returns it", "return s", lambda v, k, c, d: v),
    "len": Op("returns its length", "return len(s)", lambda v, k, c, d: len(v)),
    "count": Op(
        "returns how many times '{c}' occurs in it",
        "return s.count('{c}')",
        lambda v, k, c, d: sum(ch == c for ch in v),
        "c",
    ),
}
KINDS = {
    "list": ("xs", "a list of integers", LIST_STEPS, LIST_RESULTS),
    "string": ("s", "a string of lowercase letters", STRING_STEPS, STRING_RESULTS),
}


def _parse_key(key: str) -> tuple[str, list[tuple[str, int, str, str]], tuple[str, int, str, str]]:
    """ "list|add:3::|even:0::|sum:0::" -> (kind, steps, result); each op is (name, k, c, d)."""
    kind, *ops = key.split("|")
    parsed = [(n, int(k), c, d) for n, k, c, d in (op.split(":") for op in ops)]
    return kind, parsed[:-1], parsed[-1]


def _letters_live(ops: list[tuple[str, int, str, str]]) -> bool:
    """No string op looks for a letter that an earlier op removed or replaced (it would do nothing)."""
    gone = set()
    for name, _, c, _ in ops:
        if c and c in gone:
            return False
        if name in ("remove", "swap"):
            gone.add(c)
    return True


def _op_key(name: str, k: int, c: str, d: str) -> str:
    return f"{name}:{k}:{c}:{d}"


def reference(key: str, arg):
    """The expected output of the problem `key` on one input, from the reference functions."""
    kind, steps, (rname, *rparams) = _parse_key(key)
    _, _, step_ops, result_ops = KINDS[kind]
    for name, *params in steps:
        arg = step_ops[name].fn(arg, *params)
    return result_ops[rname].fn(arg, *rparams)


def describe(key: str) -> list[str]:
    """What each step and the result do, in words ("adds 3 to every element", ..., "returns their sum")."""
    kind, steps, result = _parse_key(key)
    _, _, step_ops, result_ops = KINDS[kind]
    return [step_ops[n].text.format(k=k, c=c, d=d) for n, k, c, d in steps] + [
        result_ops[result[0]].text.format(k=result[1], c=result[2], d=result[3])
    ]


def canonical_code(key: str) -> list[str]:
    """The reference solution, line by line."""
    kind, steps, (rname, k, c, d) = _parse_key(key)
    arg, _, step_ops, result_ops = KINDS[kind]
    body = [step_ops[n].code.format(k=k_, c=c_, d=d_) for n, k_, c_, d_ in steps]
    return [f"def f({arg}):", *("    " + line for line in body), "    " + result_ops[rname].code.format(k=k, c=c, d=d)]


def strip_fence(answer: str) -> str:
    """The code inside an optional ```python ... ``` fence."""
    s = answer.strip()
    if s.startswith("```") and s.endswith("```") and len(s) >= 6:
        s = s[3:-3]
        first, _, rest = s.partition("\n")
        s = rest if first.strip() in ("", "python", "py") else s
    return s


def harness(code: str, tests: list) -> str:
    """The program the sandbox runs: define the candidate's f in a fresh namespace, call it on every test
    input and print, on one marked line, the repr of each result made only of int, str, bool, None and
    lists (exact types; anything else, or an exception, gives None). Inputs only: the expected outputs
    never enter the sandbox. No imports, so it starts fast."""
    return (
        "def _plain(v, depth=0):\n"
        "    t = type(v)\n"
        "    if t is list and depth < 20:\n"
        "        return all(_plain(x, depth + 1) for x in v)\n"
        "    return t is int or t is str or t is bool or v is None\n"
        "def _run():\n"
        f"    tests = {tests!r}\n"
        "    ns = {'__name__': 'solution'}\n"
        f"    exec(compile({code!r}, 'solution.py', 'exec'), ns)\n"
        "    fn = ns['f']\n"
        "    out = []\n"
        "    for args in tests:\n"
        "        try:\n"
        "            r = fn(*args)\n"
        "            out.append(repr(r) if _plain(r) else None)\n"
        "        except Exception:\n"
        "            out.append(None)\n"
        "    return out\n"
        "_out = _run()\n"
        f"print('\\n{_MARK}' + repr(_out))\n"
    )


def passed(stdout: str, expected: list) -> bool:
    """Did the harness's last marked line report exactly the expected outputs (compared as reprs)?"""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(_MARK)]
    return bool(lines) and lines[-1][len(_MARK) :] == repr([repr(e) for e in expected])


@dataclass
class ProgramTask(Task):
    """Generated function-writing problems (see the module docstring); verification runs in the sandbox
    with `sandbox` limits, `workers` at a time (default: the CPU count). `allow_unisolated=True` lets the
    answers run where the sandbox can make no namespaces (otherwise verifying raises SandboxError there);
    the runs then say UNISOLATED in their defences and the sandbox logs a warning."""

    kinds: tuple[str, ...] = ("list", "string")
    min_steps: int = 1
    max_steps: int = 2
    max_param: int = 5
    n_tests: int = 8
    sandbox: SandboxConfig = SandboxConfig()
    workers: int | None = None
    allow_unisolated: bool = False  # loud on purpose: see docs/tasks.md, "The sandbox"

    name = "program"

    def __post_init__(self):
        if not isinstance(self.allow_unisolated, bool):
            raise TaskError(f"program: allow_unisolated must be True or False, got {self.allow_unisolated!r}")
        if self.allow_unisolated and not self.sandbox.allow_unisolated:
            self.sandbox = replace(self.sandbox, allow_unisolated=True)
        if isinstance(self.kinds, str):
            self.kinds = tuple(k.strip() for k in self.kinds.split(",") if k.strip())
        self.kinds = tuple(self.kinds)
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise TaskError(f"program: kinds must be a non-empty subset of {sorted(KINDS)}, got {self.kinds!r}")
        if not 1 <= self.min_steps <= self.max_steps <= 6:
            raise TaskError(f"program: need 1 <= min_steps <= max_steps <= 6, got {self.min_steps}, {self.max_steps}")
        if not 2 <= self.max_param <= 9 or not 2 <= self.n_tests <= 50:
            raise TaskError("program: need 2 <= max_param <= 9 and 2 <= n_tests <= 50")

    # ------------------------------------------------------------ generation

    def _op(self, rng: random.Random, ops: dict[str, Op]) -> tuple[str, int, str, str]:
        name = rng.choice(sorted(ops))
        params = ops[name].params
        k = rng.randint(2 if name == "repeat" else 1, self.max_param) if "k" in params else 0
        c, d = rng.sample(LETTERS, 2) if "c" in params else ("", "")
        return name, k, c, d if "d" in params else ""

    def _input(self, rng: random.Random, kind: str, empty: bool = False):
        n = 0 if empty else rng.randint(1, 8)
        if kind == "list":
            return [rng.randint(-5, 15) for _ in range(n)]
        return "".join(rng.choice(LETTERS) for _ in range(n))

    def generate(self, rng: random.Random) -> Problem:
        for _ in range(1000):
            kind = rng.choice(self.kinds)
            _, _, step_ops, result_ops = KINDS[kind]
            steps = [self._op(rng, step_ops) for _ in range(rng.randint(self.min_steps, self.max_steps))]
            result = self._op(rng, result_ops)
            names = [s[0] for s in steps]
            if any(a == b for a, b in zip(names, names[1:])):
                continue  # the same step twice in a row
            if "upper" in names and (names[-1] != "upper" or result[0] == "count"):
                continue  # letters are lowercase: nothing may look for one after upper-casing
            if kind == "string" and not _letters_live(steps + [result]):
                continue  # a letter looked for after it was removed or replaced
            key = "|".join([kind, *(_op_key(*s) for s in steps), _op_key(*result)])
            p = self._problem(key)
            if len({json.dumps(e) for x, e in zip(p.data["tests"], p.data["expected"]) if x[0]}) < 2:
                continue  # the same output for every input: `return 1` would pass
            return p
        raise TaskError(f"program: no problem found with knobs {self.knobs()}")

    def _problem(self, key: str) -> Problem:
        kind = key.split("|", 1)[0]
        arg, what, _, _ = KINDS[kind]
        rng = random.Random(key)  # the tests belong to the problem, whatever drew it
        inputs = [self._input(rng, kind) for _ in range(self.n_tests - 1)] + [self._input(rng, kind, empty=True)]
        expected = [reference(key, x) for x in inputs]
        # the example shown in the question: the first test whose output is not empty or zero
        first = next((i for i, e in enumerate(expected) if e), 0)
        inputs.insert(0, inputs.pop(first))
        expected.insert(0, expected.pop(first))
        question = (
            f"Write a Python function f({arg}) that takes {what}, {', then '.join(describe(key))}. "
            f"For example, f({inputs[0]!r}) == {expected[0]!r}."
        )
        return Problem(
            task=self.name,
            question=question,
            answer="\n".join(canonical_code(key)),
            key=key,
            data={"kind": kind, "tests": [[x] for x in inputs], "expected": expected},
        )

    # ------------------------------------------------------------ verification

    def verify(self, problem: Problem, answer: str) -> bool:
        return self.verify_batch([problem], [answer])[0]

    def verify_batch(self, problems: Sequence[Problem], answers: Sequence[str]) -> list[bool]:
        """Run every distinct (problem, answer) once, in parallel sandboxes."""
        if len(problems) != len(answers):
            raise ValueError(f"{len(problems)} problems but {len(answers)} answers")
        jobs: dict[tuple[str, str], int] = {}
        programs, expected = [], []
        slot = []
        for p, a in zip(problems, answers):
            try:
                code = strip_fence(a) if isinstance(a, str) else ""
                tests, exp = p.data["tests"], p.data["expected"]
            except Exception:
                slot.append(None)
                continue
            if not code.strip() or len(code) > MAX_CODE_CHARS:
                slot.append(None)
                continue
            job = (p.key, code)
            if job not in jobs:
                jobs[job] = len(programs)
                programs.append(harness(code, tests))
                expected.append(exp)
            slot.append(jobs[job])
        results = run_many(programs, self.sandbox, workers=self.workers)
        ok = [r.ok and passed(r.stdout, e) for r, e in zip(results, expected)]
        return [False if s is None else ok[s] for s in slot]

    # ------------------------------------------------------------ the worked solution

    def solution(self, problem: Problem) -> str:
        key = problem.key
        kind, steps, result = _parse_key(key)
        arg, _, step_ops, result_ops = KINDS[kind]
        code = canonical_code(key)
        example = problem.data["tests"][0][0]
        lines = [
            f"f({arg}): " + "; ".join(describe(key)),
            "one line per step:",
            *(line.strip() for line in code[1:]),
            f"check f({example!r}):",
        ]
        value = example
        for n, k, c, d in steps:
            after = step_ops[n].fn(value, k, c, d)
            lines.append(f"{value!r} -> {after!r}")
            value = after
        out = result_ops[result[0]].fn(value, *result[1:])
        lines += [f"{value!r} -> {out!r}", f"{out!r} as expected", "code:", *code]
        return "\n".join(lines)
