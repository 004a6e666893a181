"""Arithmetic expression trees: named sub-expressions joined at the root (paper §4's synthetic analogue).

Shapes: ``balanced`` — k ≥ 2 independent sub-expressions of similar length, each evaluated in its
own thread, then joined; ``chain`` — one long sub-expression, where forking cannot help and the
parallel CoT stays sequential (so *when* to fork is learnt).

Every step is local and small-valued (values stay in [0, max_value]), so a tiny model can learn
it, while threads of many steps keep the outline and tag overhead small next to the work they
save. Two step styles:

* ``keyed`` (default): each number in the question carries a key letter unique in the question;
  a line writes the running total, then the next key and what follows it in the question::

      question: A:a3b+4c-2        thread: A:a3b+4=7 / 7c-2=5 / A=5
                B:d9e-5                   B:d9e-5=4 / B=4
                A-B               join:   A-B / =5-4 / =1

  Reading an operand is then a lookup by a unique key (copy what follows it — what small
  transformers learn first), not a copy of digit strings where every digit repeats.
* ``rewrite``: each line rewrites the previous one with its first operation done
  (``A=3+4-2 / =7-2 / =5``); kept for comparison: its copies of digit runs are slow to learn.
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
    leaves_min: int = 9
    leaves_max: int = 10
    chain_leaves_min: int = 6
    chain_leaves_max: int = 12
    max_leaf: int = 9
    max_value: int = 9
    style: str = "keyed"  # "keyed" (running total, keyed operands) or "rewrite"


def key_symbols(n_groups: int) -> str:
    """Operand keys, unique across a question: lowercase, then the uppercase letters no group uses."""
    return string.ascii_lowercase + string.ascii_uppercase[n_groups:]


def keyed_terms(leaves: list[int], ops: list[str], keys: str) -> str:
    """The question's form of a group: each number after its key, the operator in between.

    >>> keyed_terms([3, 4, 2], ["+", "-"], "abc")
    'a3b+4c-2'
    """
    return f"{keys[0]}{leaves[0]}" + "".join(f"{k}{op}{x}" for k, op, x in zip(keys[1:], ops, leaves[1:]))


def keyed_lines(name: str, leaves: list[int], ops: list[str], keys: str) -> list[str]:
    """Running total with keyed operands, one operation per line, then the group's value.

    >>> keyed_lines("A", [3, 4, 2], ["+", "-"], "abc")
    ['A:a3b+4=7', '7c-2=5', 'A=5']

    A line writes the total so far, then the next key and what follows that key in the question
    (a lookup by a unique key), then the one-digit result.
    """
    value = leaves[0]
    first = f"{name}:{keys[0]}{leaves[0]}"
    lines = []
    for i, (op, x) in enumerate(zip(ops, leaves[1:]), start=1):
        new = value + x if op == "+" else value - x
        lines.append((first if i == 1 else str(value)) + f"{keys[i]}{op}{x}={new}")
        value = new
    if not ops:
        lines.append(f"{first}={value}")
    return lines + [f"{name}={value}"]


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


def _evaluate(leaves: list[int], ops: list[str]) -> int:
    value = leaves[0]
    for op, x in zip(ops, leaves[1:]):
        value = value + x if op == "+" else value - x
    return value


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
        keys = key_symbols(k)
        if p.style == "keyed" and sum(sizes) > len(keys):
            raise ValueError(f"{sum(sizes)} numbers need more operand keys than the {len(keys)} available")
        for name, n in zip(names, sizes):
            leaves, ops = _chain(rng, n, p.max_leaf, p.max_value)
            if p.style == "keyed":
                own, keys = keys[:n], keys[n:]
                head = f"{name}:{keyed_terms(leaves, ops, own)}"
                lines = keyed_lines(name, leaves, ops, own)
                groups.append(Group(name, tuple(lines)))
            else:
                head = f"{name}={_expr([str(x) for x in leaves], ops)}"
                lines = [head] + rewrite_lines(leaves, ops)
                groups.append(Group(name, tuple(lines)))
            values.append(_evaluate(leaves, ops))
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
