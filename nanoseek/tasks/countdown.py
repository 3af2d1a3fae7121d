"""Countdown: reach a target from given numbers with + - * / and parentheses (TinyZero's R1-Zero task).

    task = CountdownTask(min_count=3, max_count=4, max_number=25, max_target=100)
    p = task.sample(random.Random(0))   # "Make 34 from the numbers 3 24 13 with + - * / and ..."
    task.verify(p, "(24+13)-3")         # True
    print(task.solution(p))             # the search trace below

The rule is the Countdown game's: **each given number at most once** (TinyZero asks for exactly once;
we accept any sub-multiset, so a shorter correct expression is correct). Generated problems always have
a solution, and the target is never one of the numbers.

The verifier never evaluates text as Python. It bounds the length (200 characters), allows only ASCII
digits, `+ - * /` (also `×`, `÷`, `−`), parentheses and spaces, bounds the nesting depth (16), parses with
`ast.parse(mode="eval")` and walks the tree accepting only integer literals and the four binary
operations (no unary minus, no `**`, `//`, names, calls or attributes), computing in exact fractions: a
division by zero, an intermediate or literal beyond 10**12, or a literal that is not one of the unused
given numbers rejects the answer. An optional "= target" suffix is allowed.

The worked solution is the depth-first search that found the answer, one line per try. Each line shows
the numbers in hand, the operation tried and the numbers after it; a dead end (one number left, not the
target) ends in "x", and going back is visible as a line starting again from an earlier set:

    make 38 from 23 3 7 19
    23 3 7 19: 23+19=42 -> 3 7 42
    3 7 42: 42-3=39 -> 7 39
    7 39: 39-7=32 -> 32 x
    7 39: 39+7=46 -> 46 x
    7 39: 39*7=273 -> 273 x
    3 7 42: 42-7=35 -> 3 35
    3 35: 35+3=38 -> 38 done
    so ((23+19)-7)+3=38

Only integer steps are tried (a - b and a / b with a >= b, exact division, no *1 or /1), the larger
number first; the answer is the found expression, parenthesized.

Tries are ordered by how close their result is to the target, and a set of numbers already searched is
not searched again. The search is also how problems are chosen: a generated problem whose search takes
more than `max_search_steps` tries is drawn again, so traces stay short enough to learn from.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from nanoseek.tasks.base import Problem, Task, TaskError

MAX_ANSWER_CHARS = 200
MAX_DEPTH = 16  # parentheses nesting
MAX_VALUE = 10**12  # any literal, numerator or denominator beyond this is rejected
_ALLOWED = re.compile(r"[0-9+\-*/() ]*")  # ASCII digits only
_UNICODE_OPS = str.maketrans({"×": "*", "÷": "/", "−": "-"})
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class _Reject(Exception):
    pass


def _evaluate(node: ast.AST, literals: list[int]) -> Fraction:
    """Exact value of a +,-,*,/ tree of integer literals; raises _Reject on anything else."""
    if isinstance(node, ast.Constant) and type(node.value) is int:  # not bool, float, complex or str
        if node.value > MAX_VALUE:
            raise _Reject
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _evaluate(node.left, literals), _evaluate(node.right, literals)
        if isinstance(node.op, ast.Div) and b == 0:
            raise _Reject
        v = _BINOPS[type(node.op)](a, b)
        if abs(v.numerator) > MAX_VALUE or v.denominator > MAX_VALUE:
            raise _Reject
        return v
    raise _Reject


def evaluate_expression(text: str, numbers: list[int]) -> Fraction | None:
    """The exact value of `text` if it is an allowed expression over a sub-multiset of `numbers`, else None.
    An "= N" suffix is checked against the value (so "1+2=4" is None)."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    expr, _, claimed = text.translate(_UNICODE_OPS).partition("=")
    if not _ALLOWED.fullmatch(expr) or not _ALLOWED.fullmatch(claimed):
        return None
    depth = 0
    for ch in expr:
        depth += (ch == "(") - (ch == ")")
        if depth > MAX_DEPTH or depth < 0:
            return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        literals: list[int] = []
        value = _evaluate(tree.body, literals)
    except (_Reject, SyntaxError, ValueError, RecursionError, MemoryError, ZeroDivisionError):
        return None
    if Counter(literals) - Counter(numbers):  # a number not given, or used more often than given
        return None
    if claimed.strip() and (
        not claimed.strip().isdigit() or len(claimed.strip()) > 13 or Fraction(int(claimed.strip())) != value
    ):
        return None
    return value


# One line of a search trace: "23 3 7 19: 23+19=42 -> 3 7 42" (" done" or " x" may end it).
_TRY = re.compile(r"([0-9 ]+): ([0-9]+)([+\-*/])([0-9]+)=([0-9]+) -> ([0-9 ]*?)( x| done)?")
_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else None,  # a model's division by zero is a wrong step
}


# ---------------------------------------------------------------- the search behind problems and traces


def _tries(items: list[tuple[int, str]], target: int) -> list[tuple[int, str, str, list[tuple[int, str]]]]:
    """Every (value, shown step, expression, remaining items) one operation on two items can give, with
    integer results only, closest to the target first. Items are (value, expression)."""
    out = []
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            (a, ea), (b, eb) = sorted((items[i], items[j]), key=lambda it: -it[0])  # a >= b
            rest = [it for k, it in enumerate(items) if k not in (i, j)]
            ea, eb = (f"({e})" if not e.isdigit() else e for e in (ea, eb))
            ops = [(a + b, "+")]
            if b > 1:
                ops.append((a * b, "*"))
            if a != b:
                ops.append((a - b, "-"))
            if b > 1 and a % b == 0:
                ops.append((a // b, "/"))
            out += [(v, f"{a}{op}{b}={v}", f"{ea}{op}{eb}", rest) for v, op in ops]
    out.sort(key=lambda t: abs(t[0] - target))  # stable: ties keep generation order
    return out


def search(numbers: list[int], target: int, max_steps: int) -> tuple[list[str], str] | None:
    """Depth-first search from `numbers` to `target`: (the lines of its trace, the found expression), or
    None if it takes more than max_steps tries."""
    lines: list[str] = []
    seen: set[tuple[int, ...]] = set()

    def dfs(items):
        shown = " ".join(str(v) for v, _ in items)
        for v, step, expr, rest in _tries(items, target):
            after = tuple(sorted([x for x, _ in rest] + [v]))
            if after in seen:
                continue
            seen.add(after)
            if len(lines) >= max_steps:
                raise _Reject
            left = " ".join(str(x) for x, _ in rest + [(v, expr)])
            if v == target:
                lines.append(f"{shown}: {step} -> {left} done")
                return expr
            lines.append(f"{shown}: {step} -> {left}" + ("" if rest else " x"))
            if rest and (found := dfs(rest + [(v, expr)])):
                return found
        return None

    try:
        found = dfs([(n, str(n)) for n in numbers])
    except _Reject:
        return None
    return (lines, found) if found else None


@dataclass
class CountdownTask(Task):
    """Between `min_count` and `max_count` numbers drawn from 1..max_number, and a target in
    2..max_target that a random combination of all of them makes; problems whose search trace would be
    longer than `max_search_steps` tries are drawn again."""

    min_count: int = 3
    max_count: int = 4
    max_number: int = 25
    max_target: int = 100
    max_search_steps: int = 30

    name = "countdown"

    def __post_init__(self):
        if not 2 <= self.min_count <= self.max_count <= 6:
            raise TaskError(f"countdown: need 2 <= min_count <= max_count <= 6, got {self.min_count}, {self.max_count}")
        if not 2 <= self.max_number <= 1000 or not 2 <= self.max_target <= 100_000:
            raise TaskError("countdown: need 2 <= max_number <= 1000 and 2 <= max_target <= 100000")
        if self.max_search_steps < 1:
            raise TaskError("countdown: max_search_steps must be at least 1")

    def _target(self, rng: random.Random, numbers: list[int]) -> int:
        """The value of a random integer-valued combination of all the numbers."""
        pool = list(numbers)
        while len(pool) > 1:
            a, b = sorted((pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))), reverse=True)
            ops = [a + b, a * b] + ([a - b] if a != b else []) + ([a // b] if b > 1 and a % b == 0 else [])
            pool.append(rng.choice(ops))
        return pool[0]

    def generate(self, rng: random.Random) -> Problem:
        for _ in range(10_000):
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(self.min_count, self.max_count))]
            target = self._target(rng, numbers)
            if not 2 <= target <= self.max_target or target in numbers:
                continue
            found = search(numbers, target, self.max_search_steps)
            if found is None:
                continue
            shown = " ".join(map(str, numbers))
            return Problem(
                task=self.name,
                answer=found[1],
                question=f"Make {target} from the numbers {shown} with + - * / and parentheses, "
                f"using each number at most once.",
                key=f"{' '.join(map(str, sorted(numbers)))}->{target}",
                data={"numbers": numbers, "target": target},
            )
        raise TaskError(f"countdown: no problem found with knobs {self.knobs()}")

    trace_rules: ClassVar[dict[str, str]] = {
        "tries": "lines of the form `numbers: a<op>b=v -> numbers` (one operation tried)",
        "right_steps": "share of the tries whose `a<op>b=v` is true arithmetic (intermediate results checked)",
        "dead_ends": "tries that end in ` x` (one number left, not the target)",
        "backtracks": "tries that start from other numbers than the previous try left (a step back in the search)",
        "checked_answer": "the trace ends with `so E=target` and E, over the given numbers, makes the target",
    }

    def trace_stats(self, problem: Problem, think: str) -> dict[str, float]:
        lines = think.strip().splitlines()
        tries = [m for m in map(_TRY.fullmatch, (line.strip() for line in lines)) if m]
        right = [_OPS[op](int(a), int(b)) == int(v) for _, a, op, b, v, _, _ in (m.groups() for m in tries)]
        back = sum(cur.group(1).split() != prev.group(6).split() for prev, cur in zip(tries, tries[1:]))
        last = lines[-1].strip() if lines else ""
        checked = last.startswith("so ") and self.verify(problem, last[3:])
        return {
            "tries": float(len(tries)),
            "right_steps": sum(right) / len(right) if right else 0.0,
            "dead_ends": float(sum(m.group(7) == " x" for m in tries)),
            "backtracks": float(back),
            "checked_answer": float(checked),
        }

    def verify(self, problem: Problem, answer: str) -> bool:
        try:
            d = problem.data
            value = evaluate_expression(answer, list(d["numbers"]))
            return value is not None and value == d["target"]
        except Exception:  # a malformed problem is a wrong answer, never a crash of the reward loop
            return False

    def solution(self, problem: Problem) -> str:
        d = problem.data
        numbers, target = d["numbers"], d["target"]
        lines, expr = search(numbers, target, 10**6)
        return "\n".join([f"make {target} from {' '.join(map(str, numbers))}", *lines, f"so {expr}={target}"])
