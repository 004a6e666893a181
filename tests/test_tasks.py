"""Synthetic task families: correctness of every step, identical content in both CoTs, splits."""
import random
import re

import pytest

from twlib import format as fmt
from twlib.tasks import (
    ExpressionParams,
    ProductParams,
    TaskMix,
    check_disjoint,
    generate_splits,
    make_problem,
    split_of,
)
from twlib.tasks.expressions import INSTRUCTION, definitions, evaluate_question, group_keys, group_lines, join_lines
from twlib.tasks.products import add_line, multiplication_lines, times_digit_line

EXPR = ExpressionParams()
PROD = ProductParams()


def _content_lines(text: str) -> list[str]:
    """Reasoning lines with every tag, thread/outline number and outline removed."""
    text = re.sub(r"<Outlines>.*?</Outlines>", "", text, flags=re.S)
    text = re.sub(r"<Thread>\n\d+: ", "", text)
    for tag in fmt.TAGS:
        text = text.replace(tag, "\n")
    return [ln for ln in text.splitlines() if ln.strip()]


def test_expression_lines_hand_computed():
    assert group_lines(1, 9, 8, 3) == (["d9+e8*f3", "3:9+8=7", "2:7+8=5", "1:5+8=3", "B3"], 3)
    assert group_lines(0, 0, 5, 1) == (["a0+b5*c1", "1:0+5=5", "A5"], 5)
    assert join_lines([3, 5, 5, 9]) == ["A3+B5:3+5=8", "8+C5:8+5=3", "3+D9:3+9=2"]
    assert group_keys(7) == "vwx"
    assert evaluate_question("a9+b8*c3\nd2+e2*f2") == (9 + 24 + 2 + 4) % 10


def test_long_multiplication_hand_computed():
    assert times_digit_line(12, 7) == "12*7: 2*7=14, 1*7+1=8 so 84"
    assert add_line(84, 360) == "84+360: 4+0=4, 8+6=14, 0+3+1=4 so 444"
    assert multiplication_lines(12, 37) == ("12*7: 2*7=14, 1*7+1=8 so 84", "12*3: 2*3=6, 1*3=3 so 36",
                                            "84+360: 4+0=4, 8+6=14, 0+3+1=4 so 444", "12*37=444")
    assert multiplication_lines(7, 8) == ("7*8: 7*8=56 so 56", "7*8=56")


@pytest.mark.parametrize("x,y", [(0, 5), (99, 99), (123, 45), (1000, 7), (58, 106)])
def test_long_multiplication_lines_are_arithmetic(x, y):
    lines = multiplication_lines(x, y)
    assert lines[-1] == f"{x}*{y}={x * y}"
    for line in lines[:-1]:
        for step in re.findall(r"\d+[*+]\d+(?:\+\d+)?=\d+", line.split(": ", 1)[1]):
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs), step
        head, result = line.split(": ", 1)[0], line.rsplit(" so ", 1)[1]
        assert eval(head) == int(result), line


def _check_group(lines, label, index, previous=None):
    """Definition, a countdown of correct additions mod 10, the value; returns the value."""
    keys = group_keys(index)
    start = "([A-Z])" if previous is not None else "(\\d)"
    m = re.fullmatch(rf"{keys[0]}{start}\+{keys[1]}(\d)\*{keys[2]}(\d)", lines[0])
    assert m, lines[0]
    if previous is not None:
        assert m.group(1) == chr(ord(label) - 1)
    value = previous if previous is not None else int(m.group(1))
    step, repeats = int(m.group(2)), int(m.group(3))
    assert len(lines) == repeats + 2
    for left, line in zip(range(repeats, 0, -1), lines[1:-1]):
        assert line == f"{left}:{value}+{step}={(value + step) % 10}"
        value = (value + step) % 10
    assert lines[-1] == f"{label}{value}"
    return value


@pytest.mark.parametrize("seed", range(3))
def test_expression_problems_are_correct(seed):
    rng = random.Random(seed)
    orders, shapes = set(), set()
    for _ in range(80):
        p = make_problem("expressions", rng, EXPR)
        assert p.question.split("\n")[0] == INSTRUCTION
        assert p.question.split("\n")[1:] == definitions(p.question)
        orders.add(definitions(p.question)[0][0])
        shapes.add(p.shape)
        assert p.answer == str(evaluate_question(p.question))
        assert not re.search(r"[a-zA-Z]\d", INSTRUCTION)  # nothing in it reads like a key
        keys = re.findall(r"[a-z]", "".join(definitions(p.question)))
        assert len(keys) == len(set(keys))  # every number is read after a key used once
        k = len(definitions(p.question))
        assert EXPR.groups_min <= k <= EXPR.groups_max
        if p.shape == "chain":
            (lines,) = p.plan.steps
            bounds = [i + 1 for i, ln in enumerate(lines) if re.fullmatch(r"[A-Z]\d", ln)]
            chunks = [lines[a:b] for a, b in zip([0] + bounds[:-1], bounds)]
            assert len(chunks) == k and sorted(definitions(p.question)) == sorted(c[0] for c in chunks)
            value = None
            for i, chunk in enumerate(chunks):
                value = _check_group(chunk, chr(ord("A") + i), i, value)
                if i == 0:
                    assert re.fullmatch(r"a\d.*", chunk[0])
            assert p.answer == str(value)
            assert p.plan.parallel_text() == p.plan.sequential_text() and "<Parallel>" not in p.plan.parallel_text()
        else:
            groups = p.plan.steps[0].groups
            values = [_check_group(g.lines, g.label, i) for i, g in enumerate(groups)]
            assert sorted(definitions(p.question)) == sorted(g.lines[0] for g in groups)
            assert p.answer == str(sum(values) % 10)
            assert p.plan.steps[1] == tuple(join_lines(values))
            traj = fmt.parse(p.plan.parallel_text())
            assert [len(b.threads) for b in traj.blocks] == [k]
            assert [o.body for o in traj.blocks[0].outlines] == [f" {g.label}" for g in groups]
    assert orders >= {"a", "d", "g"} and shapes == {"balanced", "chain"}


@pytest.mark.parametrize("bad,match", [({"groups_max": 9}, "groups_max <= 8"), ({"groups_min": 0}, "1 <= groups_min"),
                                       ({"repeats_max": 10}, "repeats_max <= 9"),
                                       ({"chain_repeats_min": 0}, "1 <= chain_repeats_min"),
                                       ({"balanced_fraction": 1.5}, "balanced_fraction")])
def test_expression_params_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        ExpressionParams(**bad)


@pytest.mark.parametrize("family,params", [("expressions", EXPR), ("products", PROD),
                                           ("products", ProductParams(factors_min=5, factors_max=8))])
def test_both_cots_share_content_and_answer(family, params):
    rng = random.Random(7)
    for _ in range(80):
        p = make_problem(family, rng, params)
        seq, par = fmt.parse(p.plan.sequential_text()), fmt.parse(p.plan.parallel_text())
        assert seq.answer == par.answer == p.answer
        assert _content_lines(p.plan.sequential_text()) == _content_lines(p.plan.parallel_text())
        assert not seq.blocks


def test_product_problems_reduce_pairwise():
    rng = random.Random(3)
    shapes = set()
    for _ in range(100):
        p = make_problem("products", rng, ProductParams(factors_min=2, factors_max=8))
        factors = [int(x) for x in p.question.split("*")]
        prod = 1
        for f in factors:
            prod *= f
        assert p.answer == str(prod)
        traj = fmt.parse(p.plan.parallel_text())
        # level sizes: 8 factors → forks of 4 and 2 pairs, then one sequential pair
        level, expected = len(factors), []
        while level > 1:
            if level // 2 >= 2:
                expected.append(level // 2)
            level = level // 2 + level % 2
        assert [len(b.threads) for b in traj.blocks] == expected
        shapes.add(p.shape)
    assert shapes == {"pair", "tree"}


def test_splits_are_disjoint_and_sized():
    mix = TaskMix(["expressions", "products"], [0.5, 0.5], {"expressions": EXPR, "products": PROD})
    sizes = {"train": 120, "validation": 20, "test": 30}
    out = generate_splits(mix, sizes, seed=11)
    assert {s: len(v) for s, v in out.items()} == sizes
    check_disjoint({s: [p.question for p in v] for s, v in out.items()})
    again = generate_splits(mix, sizes, seed=11)
    assert [p.question for p in again["test"]] == [p.question for p in out["test"]]
    fractions = tuple(sizes[s] / 170 for s in ("train", "validation", "test"))
    for split, items in out.items():
        assert all(split_of(p.question, fractions) == split for p in items)


def test_check_disjoint_raises_on_overlap():
    with pytest.raises(ValueError, match="appears in train and test"):
        check_disjoint({"train": ["q1", "q2"], "test": ["q2"]})


def test_too_few_distinct_problems_is_a_clear_error():
    tiny = ExpressionParams(balanced_fraction=0.0, groups_min=2, groups_max=2, chain_repeats_min=1, chain_repeats_max=1)
    mix = TaskMix(["expressions"], [1.0], {"expressions": tiny})
    with pytest.raises(ValueError, match="could not draw enough distinct problems"):
        generate_splits(mix, {"train": 2000, "validation": 5, "test": 5}, seed=0, max_tries_factor=5)  # 1620 exist


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown task family 'sudoku'"):
        TaskMix(["sudoku"], [1.0])
