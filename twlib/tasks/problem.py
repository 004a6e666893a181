"""The problem record every task family produces."""
from __future__ import annotations

from dataclasses import dataclass

from .plan import Plan


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    family: str
    shape: str
    plan: Plan
