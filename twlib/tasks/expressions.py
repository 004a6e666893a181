"""Arithmetic expression trees in last-digit arithmetic (paper §4's synthetic analogue).

A question is a one-line instruction (as real prompts carry one) followed by one line per
sub-expression ``s + d·n`` (mod 10), in random order. A sub-expression is worked out by repeated addition, one line
per addition, counting ``n`` down.

Shapes: ``balanced`` — k ≥ 2 independent sub-expressions, each evaluated in its own thread, then
summed; ``single`` — one sub-expression, nothing to fork; ``chain`` — k ≥ 2 sub-expressions where each
starts from the previous one's value (``dA`` reads "d is A's value"), so forking cannot help and the
parallel CoT stays sequential (*when* to fork is learnt). The answer is the sum (balanced, single) or
the last value (chain).

Every number in the question follows a key letter that appears once in the question (group i
uses the keys ``3i..3i+2`` of the alphabet). A CoT line either copies what follows a key (a
one-token lookup) or works from the line just above::

    question: (instruction)
              d5+e1*f1     thread:  a3+b4*c2 / 2:3+4=7 / 1:7+4=1 / A1
              a3+b4*c2              d5+e1*f1 / 1:5+1=6 / B6
                           join:    A1+B6:1+6=7

No digit is ever found by the digit before it, which repeats and is ambiguous; group values are
written right after their group letter (``A1``) so the join reads them by key as well. (How well a
tiny model learns these lookups is measured in the README's learnability section.)
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from .plan import Fork, Group, Plan
from .problem import Problem

MODULUS = 10
KEYS_PER_GROUP = 3
MAX_GROUPS = len(string.ascii_lowercase) // KEYS_PER_GROUP  # 8
MAX_REPEATS = 9  # the countdown is one digit
# No letter in it is followed by a digit, so it never looks like a key: lookups stay unambiguous.
INSTRUCTION = "Work out each line mod ten; the answer is the sum of the lines, or the last value of a chain."
DEFINITION = re.compile(r"[a-z][0-9A-Z]\+[a-z][0-9]\*[a-z][0-9]")


@dataclass(frozen=True)
class ExpressionParams:
    balanced_fraction: float = 0.75
    groups_min: int = 3
    groups_max: int = 4
    repeats_min: int = 6
    repeats_max: int = 9
    chain_repeats_min: int = 6
    chain_repeats_max: int = 9

    def __post_init__(self):
        if not 0.0 <= self.balanced_fraction <= 1.0:
            raise ValueError(f"balanced_fraction must be in [0, 1], got {self.balanced_fraction}")
        if not 1 <= self.groups_min <= self.groups_max <= MAX_GROUPS:
            raise ValueError(f"need 1 <= groups_min <= groups_max <= {MAX_GROUPS} "
                             f"(three key letters per group), got {self.groups_min}..{self.groups_max}")
        for lo, hi, name in ((self.repeats_min, self.repeats_max, "repeats"),
                             (self.chain_repeats_min, self.chain_repeats_max, "chain_repeats")):
            if not 1 <= lo <= hi <= MAX_REPEATS:
                raise ValueError(f"need 1 <= {name}_min <= {name}_max <= {MAX_REPEATS}, got {lo}..{hi}")


def group_keys(index: int) -> str:
    """Key letters of the group at ``index``: ``group_keys(1)`` → ``'def'``."""
    return string.ascii_lowercase[KEYS_PER_GROUP * index: KEYS_PER_GROUP * (index + 1)]


def definition(index: int, start: int | str, step: int, repeats: int) -> str:
    """The question line of a sub-expression: ``definition(1, 5, 1, 3)`` → ``'d5+e1*f3'``.

    ``start`` is a digit, or the letter of the group whose value it starts from (chains).
    """
    a, b, c = group_keys(index)
    return f"{a}{start}+{b}{step}*{c}{repeats}"


def group_lines(index: int, start: int, step: int, repeats: int,
                start_from: str | None = None) -> tuple[list[str], int]:
    """The definition, one repeated addition per line counting down, then the value.

    >>> group_lines(0, 3, 4, 2)
    (['a3+b4*c2', '2:3+4=7', '1:7+4=1', 'A1'], 1)
    >>> group_lines(1, 1, 5, 1, start_from="A")[0]
    ['dA+e5*f1', '1:1+5=6', 'B6']
    """
    lines, value = [definition(index, start_from or start, step, repeats)], start
    for left in range(repeats, 0, -1):
        new = (value + step) % MODULUS
        lines.append(f"{left}:{value}+{step}={new}")
        value = new
    return lines + [f"{string.ascii_uppercase[index]}{value}"], value


def join_lines(values: list[int]) -> list[str]:
    """Running sum of the group values, each read after its group letter.

    After the reads, the line restates the two operands and adds them in the same layout as a
    countdown line (``…:1+6=7``), so the join reuses the addition the threads already practise
    instead of needing a second one for operands spaced differently.

    >>> join_lines([1, 6, 5])
    ['A1+B6:1+6=7', '7+C5:7+5=2']
    """
    names, lines, total = string.ascii_uppercase, [], values[0]
    for i, v in enumerate(values[1:], start=1):
        left = f"{names[0]}{values[0]}" if i == 1 else str(total)
        new = (total + v) % MODULUS
        lines.append(f"{left}+{names[i]}{v}:{total}+{v}={new}")
        total = new
    return lines


def make_expression_problem(rng: random.Random, p: ExpressionParams) -> Problem:
    """One problem; the shape is drawn with ``balanced_fraction``."""
    balanced = rng.random() < p.balanced_fraction
    k = rng.randint(p.groups_min, p.groups_max)
    low, high = (p.repeats_min, p.repeats_max) if balanced else (p.chain_repeats_min, p.chain_repeats_max)
    defs, groups, values = [], [], []
    for i in range(k):
        start, step = rng.randint(0, MODULUS - 1), rng.randint(1, MODULUS - 1)
        start_from = None
        if not balanced and i > 0:
            start, start_from = values[-1], string.ascii_uppercase[i - 1]
        lines, value = group_lines(i, start, step, rng.randint(low, high), start_from)
        defs.append(lines[0])
        groups.append(Group(string.ascii_uppercase[i], tuple(lines)))
        values.append(value)
    # Lines in random order: a number must be found by its key, not by where its line sits.
    question = "\n".join([INSTRUCTION] + rng.sample(defs, k))
    if not balanced and k > 1:
        answer = str(values[-1])
        chain = tuple(line for g in groups for line in g.lines)
        return Problem(question, answer, "expressions", "chain", Plan((chain,), answer))
    answer = str(sum(values) % MODULUS)
    if k == 1:  # one sub-expression: a chain of one, whichever shape was drawn
        return Problem(question, answer, "expressions", "single", Plan((groups[0].lines,), answer))
    return Problem(question, answer, "expressions", "balanced",
                   Plan((Fork(tuple(groups)), tuple(join_lines(values))), answer))


def definitions(question: str) -> list[str]:
    """The sub-expression lines of a question, in question order (the instruction is skipped).

    >>> definitions(INSTRUCTION + "\\nd5+e1*f1\\na3+b4*c2")
    ['d5+e1*f1', 'a3+b4*c2']
    """
    return [line for line in question.split("\n") if DEFINITION.fullmatch(line)]


def evaluate_question(question: str) -> int:
    """The answer computed from the question text alone (an independent check of the CoT).

    >>> evaluate_question("a3+b4*c2\\nd5+e1*f1")
    7
    >>> evaluate_question(INSTRUCTION + "\\ndA+e1*f1\\na3+b4*c2")  # a chain: B starts from A's value
    2
    """
    parsed = {}
    for line in definitions(question):
        (ka, start), (_, step), (_, repeats) = line[0:2], line[3:5], line[6:8]
        parsed[(ord(ka) - ord("a")) // KEYS_PER_GROUP] = (start, int(step), int(repeats))
    values: list[int] = []
    for i in range(len(parsed)):
        start, step, repeats = parsed[i]
        first = values[ord(start) - ord("A")] if start.isalpha() else int(start)
        values.append((first + step * repeats) % MODULUS)
    chain = any(start.isalpha() for start, _, _ in parsed.values())
    return values[-1] if chain else sum(values) % MODULUS


def independent_subexpressions(question: str) -> int:
    """How many threads the question's work can use at once: its number of sub-expressions, or 1 for a chain
    (each link waits for the one before). The width axis of the adaptive-width study (docs/design.md §9).

    >>> independent_subexpressions(INSTRUCTION + "\\nd5+e1*f1\\na3+b4*c2\\ng0+h2*i4")
    3
    >>> independent_subexpressions(INSTRUCTION + "\\ndA+e1*f1\\na3+b4*c2")  # a chain of two
    1
    """
    lines = definitions(question)
    return 1 if any(line[1].isalpha() for line in lines) else len(lines)
