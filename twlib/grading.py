"""Answer grading (paper §4 evaluation): the last ``\\boxed{}`` after ``</think>``, checked with math-verify.

>>> grade("<think>\\n1+2=3\\n</think>\\n\\n\\\\boxed{3}", "3")
Grade(answer='3', correct=True)
>>> grade("<think>\\nno end", "3")
Grade(answer=None, correct=False)
"""
from __future__ import annotations

from dataclasses import dataclass

from . import format as fmt


@dataclass(frozen=True)
class Grade:
    answer: str | None
    correct: bool


def grade(response_text: str, gold: str) -> Grade:
    """Grade a response against the gold answer; a response without a final ``\\boxed{}`` is wrong."""
    from math_verify import parse, verify

    answer = fmt.extract_boxed(response_text)
    if answer is None:
        return Grade(None, False)
    try:
        correct = bool(verify(parse(f"{fmt.BOXED}{gold}}}"), parse(f"{fmt.BOXED}{answer}}}")))
    except Exception:  # math-verify raises on inputs it cannot parse; such an answer is not correct
        correct = False
    return Grade(answer, correct)
