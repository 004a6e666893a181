"""Products of k integers reduced by pairwise products (analogue of the official multiplication data).

Level by level, neighbouring factors are multiplied in pairs; a level with two or more pairs is a
fork (one thread per pair), a level with a single pair stays sequential. Each pairwise product is
worked out digit by digit with carries (long multiplication), so every step is a one-digit
operation read from a few tokens back.

Example: ``12*37``::

    12*7: 2*7=14, 1*7+1=8 so 84
    12*3: 2*3=6, 1*3=3 so 36
    84+360: 4+0=4, 8+6=14, 0+3+1=4 so 444
    12*37=444
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .plan import Fork, Group, Plan
from .problem import Problem


@dataclass(frozen=True)
class ProductParams:
    factors_min: int = 3
    factors_max: int = 4
    factor_min: int = 2
    factor_max: int = 20


def times_digit_line(x: int, d: int) -> str:
    """``x*d`` digit by digit: ``times_digit_line(12, 7)`` → ``'12*7: 2*7=14, 1*7+1=8 so 84'``."""
    steps, carry = [], 0
    digits = [int(c) for c in reversed(str(x))]
    for i, a in enumerate(digits):
        v = a * d + carry
        steps.append(f"{a}*{d}" + (f"+{carry}" if carry else "") + f"={v}")
        carry = v // 10
    return f"{x}*{d}: " + ", ".join(steps) + f" so {x * d}"


def add_line(a: int, b: int) -> str:
    """``a+b`` column by column: ``add_line(84, 360)`` → ``'84+360: 4+0=4, 8+6=14, 0+3+1=4 so 444'``."""
    sa, sb = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(sa), len(sb))):
        x = int(sa[i]) if i < len(sa) else 0
        y = int(sb[i]) if i < len(sb) else 0
        v = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={v}")
        carry = v // 10
    return f"{a}+{b}: " + ", ".join(steps) + f" so {a + b}"


def multiplication_lines(x: int, y: int) -> tuple[str, ...]:
    """Long multiplication of ``x*y``: one line per digit of y, then the shifted partial sums."""
    digits = [int(c) for c in reversed(str(y))]
    lines = [times_digit_line(x, d) for d in digits]
    if len(digits) > 1:
        total = x * digits[0]
        for j, d in enumerate(digits[1:], start=1):
            shifted = x * d * 10 ** j
            lines.append(add_line(total, shifted))
            total += shifted
    lines.append(f"{x}*{y}={x * y}")
    return tuple(lines)


def make_product_problem(rng: random.Random, p: ProductParams) -> Problem:
    k = rng.randint(p.factors_min, p.factors_max)
    factors = [rng.randint(p.factor_min, p.factor_max) for _ in range(k)]
    level, steps = list(factors), []
    while len(level) > 1:
        pairs = [(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        groups = tuple(Group(f"{x}*{y}", multiplication_lines(x, y)) for x, y in pairs)
        steps.append(Fork(groups))
        level = [x * y for x, y in pairs] + ([level[-1]] if len(level) % 2 else [])
    answer = str(level[0])
    shape = "tree" if any(len(s.groups) >= 2 for s in steps) else "pair"
    return Problem("*".join(map(str, factors)), answer, "products", shape, Plan(tuple(steps), answer))
