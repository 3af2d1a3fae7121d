"""Multi-digit arithmetic: "What is 4832 * 57?", answered with the exact integer.

    task = ArithmeticTask(min_digits=2, max_digits=4, ops="+-*")
    p = task.sample(random.Random(0))          # Problem(question="What is 4832 * 57?", answer="275424", ...)
    task.verify(p, "275424")                   # True
    print(task.solution(p))                    # the column-by-column trace below

The worked solution is the grade-school algorithm written one digit per line, built for a small
transformer to imitate: every line has the same shape, and every value on it is read off the line above
or one digit of the operands (the first line restates the question's operation as written). Digits are
taken right to left, the carry (`c`) or borrow (`b`) a line produces is the next line's last input, and
the digits written so far follow `|`, so a line's result is the previous line's result with one digit put
in front:

    4832 + 957                   4832 - 957                   4832 * 57
    2+7+0=9 c0 | 9               2-7-0 -> 12-7-0=5 b1 | 5     4832*7
    3+5+0=8 c0 | 89              3-5-1 -> 13-5-1=7 b1 | 75    2*7+0=14 c1 | 4
    8+9+0=17 c1 | 789            8-9-1 -> 18-9-1=8 b1 | 875   ... (one line per digit of 4832)
    4+0+1=5 c0 | 5789            4-0-1=3 b0 | 3875            4832*7=33824
    4832+957=5789                4832-957=3875                4832*5 ... 4832*5=24160, shift 1: 241600
                                                              33824+241600 (column addition as on the left)
                                                              4832*57=275424

Columns continue while either operand has digits or a carry is left (a missing digit is 0). A
subtraction whose result is negative is turned around first ("957 - 4832 = -(4832-957)"). A long
multiplication multiplies by each digit of the second operand (right to left; a 0 digit gives a 0
partial product that is skipped), shifts, and adds the partial products one at a time. The trace's last
line states the result, which is also the answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from nanoseek.tasks.base import Problem, Task, TaskError

OPS = "+-*"
_ANSWER = re.compile(r"[+-]?[0-9]{1,40}")  # ASCII digits only (`\d` would take other scripts' digits)


def _rev_digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def add_lines(a: int, b: int) -> list[str]:
    """Column addition of two non-negative integers, one line per column, ending with "a+b=sum"."""
    da, db = _rev_digits(a), _rev_digits(b)
    lines, carry, sofar, i = [f"{a}+{b}"], 0, "", 0
    while i < max(len(da), len(db)) or carry:
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        sofar = str(s % 10) + sofar
        lines.append(f"{x}+{y}+{carry}={s} c{s // 10} | {sofar}")
        carry, i = s // 10, i + 1
    lines.append(f"{a}+{b}={a + b}")
    return lines


def sub_lines(a: int, b: int) -> list[str]:
    """Column subtraction a-b for a >= b >= 0 with borrows, ending with "a-b=difference"."""
    da, db = _rev_digits(a), _rev_digits(b)
    lines, borrow, sofar = [f"{a}-{b}"], 0, ""
    for i, x in enumerate(da):
        y = db[i] if i < len(db) else 0
        if x - y - borrow < 0:  # borrow ten from the next column
            r = x + 10 - y - borrow
            sofar = str(r) + sofar
            lines.append(f"{x}-{y}-{borrow} -> 1{x}-{y}-{borrow}={r} b1 | {sofar}")
            borrow = 1
        else:
            r = x - y - borrow
            sofar = str(r) + sofar
            lines.append(f"{x}-{y}-{borrow}={r} b0 | {sofar}")
            borrow = 0
    lines.append(f"{a}-{b}={a - b}")  # drops the leading zeros `sofar` may have
    return lines


def mul_digit_lines(a: int, d: int) -> list[str]:
    """a times one digit d, one line per digit of a, ending with "a*d=product"."""
    da = _rev_digits(a)
    lines, carry, sofar, i = [f"{a}*{d}"], 0, "", 0
    while i < len(da) or carry:
        x = da[i] if i < len(da) else 0
        s = x * d + carry
        sofar = str(s % 10) + sofar
        lines.append(f"{x}*{d}+{carry}={s} c{s // 10} | {sofar}")
        carry, i = s // 10, i + 1
    lines.append(f"{a}*{d}={a * d}")
    return lines


def mul_lines(a: int, b: int) -> list[str]:
    """Long multiplication: partial products by each digit of b (right to left), shifted, then summed."""
    if b < 10:  # one digit: a single partial product is the whole work
        return mul_digit_lines(a, b) if b else [f"{a}*0=0"]
    lines, partials = [f"{a}*{b}"], []
    for shift, d in enumerate(_rev_digits(b)):
        if d == 0:
            lines.append(f"{a}*0=0")
            continue
        lines += mul_digit_lines(a, d)
        if shift:
            lines[-1] += f", shift {shift}: {a * d * 10**shift}"
        partials.append(a * d * 10**shift)
    total = partials[0] if partials else 0
    for p in partials[1:]:
        lines += add_lines(total, p)
        total += p
    lines.append(f"{a}*{b}={a * b}")
    return lines


def trace(a: int, op: str, b: int) -> str:
    """The worked solution of `a op b` for non-negative a, b (see the module docstring)."""
    if op == "+":
        lines = add_lines(a, b)
    elif op == "-":
        lines = sub_lines(a, b) if a >= b else [f"{a}-{b} = -({b}-{a})", *sub_lines(b, a), f"{a}-{b}={a - b}"]
    elif op == "*":
        lines = mul_lines(a, b)
    else:
        raise ValueError(f"unknown operation {op!r}")
    # The first line restates the question's "a op b" verbatim, spaces included: a small transformer
    # learns to copy text as it stands (an induction head) long before it learns to copy and reformat.
    if len(lines) > 1 and lines[0].startswith(f"{a}{op}{b}"):
        lines[0] = f"{a} {op} {b}" + lines[0][len(f"{a}{op}{b}") :]
    return "\n".join(lines)


def compute(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def parse_int(text: str, max_digits: int = 40) -> int | None:
    """An integer written in ASCII digits with an optional sign and surrounding whitespace, else None.
    Length-bounded before conversion, so an enormous "number" costs nothing."""
    s = text.strip()
    if len(s) > max_digits + 1 or not _ANSWER.fullmatch(s):
        return None
    return int(s)


@dataclass
class ArithmeticTask(Task):
    """a op b with each operand drawn with between `min_digits` and `max_digits` digits (uniform in the
    digit count, then uniform among numbers of that many digits), op drawn uniformly from `ops`."""

    min_digits: int = 1
    max_digits: int = 3
    ops: str = OPS

    name = "arithmetic"

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits <= 18:
            raise TaskError(
                f"arithmetic: need 1 <= min_digits <= max_digits <= 18, got {self.min_digits}, {self.max_digits}"
            )
        if not self.ops or any(o not in OPS for o in self.ops):
            raise TaskError(f"arithmetic: ops must be a non-empty subset of {OPS!r}, got {self.ops!r}")

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def generate(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        a, b = self._operand(rng), self._operand(rng)
        return Problem(
            task=self.name,
            question=f"What is {a} {op} {b}?",
            answer=str(compute(a, op, b)),
            key=f"{a}{op}{b}",
            data={"a": a, "op": op, "b": b},
        )

    trace_rules: ClassVar[dict[str, str]] = {
        "restates_question": "the trace's first line, spaces removed, is the question's operation as asked "
        "(`a+b` for `What is a + b?`): the operands the columns below should be read from",
        "states_answer": "some line of the trace is `a<op>b=N` with the question's operands and N the true result",
    }

    def trace_stats(self, problem: Problem, think: str) -> dict[str, float]:
        d = problem.data
        asked = f"{d['a']}{d['op']}{d['b']}"
        lines = [line.replace(" ", "") for line in think.strip().splitlines()]
        return {
            "restates_question": float(bool(lines) and lines[0] == asked),
            "states_answer": float(f"{asked}={compute(d['a'], d['op'], d['b'])}" in lines),
        }

    def verify(self, problem: Problem, answer: str) -> bool:
        try:
            got = parse_int(answer)
            d = problem.data
            return got is not None and got == compute(d["a"], d["op"], d["b"])
        except Exception:  # a malformed problem is a wrong answer, never a crash of the reward loop
            return False

    def solution(self, problem: Problem) -> str:
        d = problem.data
        return trace(d["a"], d["op"], d["b"])
