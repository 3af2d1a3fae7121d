"""The task registry: every verifiable task by name, built with its difficulty knobs.

    task = get_task("arithmetic", max_digits=4)
    sorted(TASKS)        # ['arithmetic', 'countdown', 'program']

A knob the task does not have, or of the wrong type, is a `TaskError` naming it.
"""

from __future__ import annotations

import dataclasses

from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.base import Task, TaskError
from nanoseek.tasks.countdown import CountdownTask
from nanoseek.tasks.program import ProgramTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ArithmeticTask, CountdownTask, ProgramTask)}


def get_task(name: str, **knobs) -> Task:
    """The task called `name` with the given difficulty knobs (the rest at their defaults)."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(knobs) - set(known))
    if unknown:
        raise TaskError(f"task {name!r} has no knob {', '.join(map(repr, unknown))}; knobs: {', '.join(known)}")
    return cls(**knobs)
