"""Answer grading (paper §4 evaluation): the last ``\\boxed{}`` after ``</think>``, checked with math-verify.

>>> grade("<think>\\n1+2=3\\n</think>\\n\\n\\\\boxed{3}", "3")
Grade(answer='3', correct=True)
>>> grade("<think>\\nno end", "3")
Grade(answer=None, correct=False)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from math_verify import parse, verify

from . import format as fmt

_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Grade:
    answer: str | None
    correct: bool


def grade(response_text: str, gold: str, strip_commas: bool = False) -> Grade:
    """Grade a response against the gold answer; a response without a final ``\\boxed{}`` is wrong.

    ``strip_commas`` removes every comma from the answer when the gold answer is an integer, as the
    official grader can (math-verify already reads ``1,000`` as 1000; this also accepts ``1,00``).

    >>> [grade("</think>\\n\\\\boxed{1,00}", "100", strip_commas=s).correct for s in (False, True)]
    [False, True]
    """
    answer = fmt.extract_boxed(response_text)
    if answer is None:
        return Grade(None, False)
    if strip_commas and _INTEGER.fullmatch(gold.strip()):
        answer = answer.replace(",", "")
    try:
        correct = bool(verify(parse(f"{fmt.BOXED}{gold}}}"), parse(f"{fmt.BOXED}{answer}}}")))
    except Exception:  # math-verify raises on inputs it cannot parse; such an answer is not correct
        correct = False
    return Grade(answer, correct)
