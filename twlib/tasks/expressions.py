"""Arithmetic expression trees: named sub-expressions joined at the root (paper §4's synthetic analogue).

Shapes: ``balanced`` — k ≥ 2 independent sub-expressions of similar length, each evaluated in its
own thread, then joined; ``chain`` — one long sub-expression, where forking cannot help and the
parallel CoT stays sequential. Every step is local and small-valued: a line rewrites the previous
one with its first operation done (values stay in [0, max_value]), so a tiny model can learn it,
while threads of many steps keep the outline/tag overhead small next to the work they save.

Example (balanced, k=2)::

    question: A=3+4-2
              B=9-5
              A-B
    sequential CoT: A=3+4-2 / =7-2 / =5 / B=9-5 / =4 / A-B / =5-4 / =1
    parallel CoT:   block(thread 1: A=3+4-2 / =7-2 / =5, thread 2: B=9-5 / =4), then A-B / =5-4 / =1
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

from .plan import Fork, Group, Plan
from .problem import Problem


@dataclass(frozen=True)
class ExpressionParams:
    balanced_fraction: float = 0.75
    groups_min: int = 3
    groups_max: int = 4
    leaves_min: int = 7
    leaves_max: int = 8
    chain_leaves_min: int = 6
    chain_leaves_max: int = 12
    max_leaf: int = 9
    max_value: int = 9


def _chain(rng: random.Random, n_leaves: int, max_leaf: int, max_value: int) -> tuple[list[int], list[str]]:
    """Leaves and +/- ops whose running value stays in [0, max_value]."""
    leaves = [rng.randint(0, min(max_leaf, max_value))]
    ops: list[str] = []
    value = leaves[0]
    for _ in range(n_leaves - 1):
        choices = [(op, x) for x in range(max_leaf + 1) for op in "+-"
                   if 0 <= (value + x if op == "+" else value - x) <= max_value]
        op, x = rng.choice(choices)
        value = value + x if op == "+" else value - x
        leaves.append(x)
        ops.append(op)
    return leaves, ops


def _expr(terms: list[str], ops: list[str]) -> str:
    return terms[0] + "".join(op + t for op, t in zip(ops, terms[1:]))


def rewrite_lines(values: list[int], ops: list[str]) -> list[str]:
    """Left-to-right evaluation, one operation per line: ``[3,4,2],['+','-']`` → ``['=7-2', '=5']``."""
    values, ops, lines = list(values), list(ops), []
    while ops:
        a, b, op = values.pop(0), values.pop(0), ops.pop(0)
        values.insert(0, a + b if op == "+" else a - b)
        lines.append("=" + _expr([str(v) for v in values], ops))
    return lines


def _join_ops(rng: random.Random, values: list[int], max_value: int) -> list[str] | None:
    ops, acc = [], values[0]
    for v in values[1:]:
        choices = [op for op in "+-" if 0 <= (acc + v if op == "+" else acc - v) <= max_value]
        if not choices:
            return None
        op = rng.choice(choices)
        acc = acc + v if op == "+" else acc - v
        ops.append(op)
    return ops


def make_expression_problem(rng: random.Random, p: ExpressionParams) -> Problem:
    """One problem; the shape is drawn with ``balanced_fraction``."""
    balanced = rng.random() < p.balanced_fraction
    while True:
        if balanced:
            k = rng.randint(p.groups_min, p.groups_max)
            sizes = [rng.randint(p.leaves_min, p.leaves_max) for _ in range(k)]
        else:
            k, sizes = 1, [rng.randint(p.chain_leaves_min, p.chain_leaves_max)]
        names = list(string.ascii_uppercase[:k])
        groups, values, defs = [], [], []
        for name, n in zip(names, sizes):
            leaves, ops = _chain(rng, n, p.max_leaf, p.max_value)
            head = f"{name}={_expr([str(x) for x in leaves], ops)}"
            lines = rewrite_lines(leaves, ops)
            groups.append(Group(name, (head, *lines)))
            values.append(int(lines[-1][1:]) if lines else leaves[0])
            defs.append(head)
        if k == 1:
            return Problem("\n".join(defs + [names[0]]), str(values[0]), "expressions", "chain",
                           Plan((Fork(tuple(groups)),), str(values[0])))
        join_ops = _join_ops(rng, values, p.max_value)
        if join_ops is None:
            continue
        join = [_expr(names, join_ops), "=" + _expr([str(v) for v in values], join_ops)]
        join += rewrite_lines(values, join_ops)
        answer = join[-1][1:]
        question = "\n".join(defs + [join[0]])
        return Problem(question, answer, "expressions", "balanced",
                       Plan((Fork(tuple(groups)), tuple(join)), answer))
