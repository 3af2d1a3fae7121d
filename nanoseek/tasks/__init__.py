"""Closed, verifiable tasks: generated problems with exact verifiers (see base.py for the interface)."""

from .base import Problem, Split, Task, split_of

__all__ = ["Problem", "Split", "Task", "split_of"]
