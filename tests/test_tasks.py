"""Synthetic task families: correctness of every step, identical content in both CoTs, splits."""
import random
import re

import pytest

from twlib import format as fmt
from twlib.tasks import (ExpressionParams, Fork, ProductParams, TaskMix, check_disjoint, generate_splits,
                         make_problem, split_of)
from twlib.tasks.expressions import rewrite_lines
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


def test_rewrite_lines_hand_computed():
    assert rewrite_lines([3, 4, 2], ["+", "-"]) == ["=7-2", "=5"]
    assert rewrite_lines([9, 9, 1], ["-", "+"]) == ["=0+1", "=1"]
    assert rewrite_lines([5], []) == []


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


def _strip_keys(text: str) -> str:
    return re.sub(r"[a-zA-Z]", "", text)


def _check_expression_steps(problem, params):
    """Every line's arithmetic is right, values stay in range; returns group name -> value."""
    values = {}
    for step in problem.plan.steps:
        for g in (step.groups if isinstance(step, Fork) else ()):
            if params.style == "rewrite":
                name, expr = g.lines[0].split("=", 1)
                current = eval(expr)
                for line in g.lines[1:]:
                    assert line.startswith("=") and eval(line[1:]) == current, (line, current)
            else:
                name = g.label
                assert g.lines[0].startswith(f"{name}:") and g.lines[-1].startswith(f"{name}=")
                running = None
                for line in g.lines[:-1]:
                    lhs, rhs = _strip_keys(line.removeprefix(f"{name}:")).split("=")
                    if running is not None:  # each line continues from the total just written
                        assert lhs.startswith(str(running)), (line, running)
                    assert eval(lhs) == int(rhs), line
                    assert 0 <= int(rhs) <= params.max_value
                    running = int(rhs)
                current = int(g.lines[-1].split("=")[1])
                assert current == running
            assert name == g.label
            values[name] = current
    return values


@pytest.mark.parametrize("style", ["keyed", "rewrite"])
@pytest.mark.parametrize("seed", range(3))
def test_expression_problems_are_correct(seed, style):
    params = ExpressionParams(style=style)
    rng = random.Random(seed)
    for _ in range(60):
        p = make_problem("expressions", rng, params)
        values = _check_expression_steps(p, params)
        defs, final = p.question.split("\n")[:-1], p.question.split("\n")[-1]
        keys = re.findall(r"[a-zA-Z]", "".join(d.split(":", 1)[1] for d in defs if ":" in d))
        assert len(keys) == len(set(keys)) == (len(keys) if style == "keyed" else 0)  # unique operand keys
        for d in defs:
            name, expr = re.split(r"[:=]", d, maxsplit=1)
            assert eval(_strip_keys(expr)) == values[name]
            assert all(0 <= int(x) <= params.max_leaf for x in re.findall(r"\d+", expr))
        gold = eval(final, {}, values)
        assert p.answer == str(gold)
        assert 0 <= gold <= params.max_value
        if p.shape == "chain":
            assert len(values) == 1 and "<Parallel>" not in p.plan.parallel_text()
            assert p.plan.parallel_text() == p.plan.sequential_text()
        else:
            assert params.groups_min <= len(values) <= params.groups_max
            k = len(values)
            traj = fmt.parse(p.plan.parallel_text())
            assert [len(b.threads) for b in traj.blocks] == [k]
            assert [o.body for o in traj.blocks[0].outlines] == [f" {n}" for n in values]


def test_keyed_lines_hand_computed():
    from twlib.tasks.expressions import keyed_lines
    assert keyed_lines("B", [9, 4, 2, 5], ["-", "+", "-"], "xyzw") == ["B:x9y-4=5", "5z+2=7", "7w-5=2", "B=2"]
    assert keyed_lines("A", [6], [], "a") == ["A:a6=6", "A=6"]


def test_keyed_style_rejects_too_many_numbers():
    p = ExpressionParams(groups_min=6, groups_max=6, leaves_min=9, leaves_max=9, balanced_fraction=1.0)
    with pytest.raises(ValueError, match="more operand keys"):
        make_problem("expressions", random.Random(0), p)


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
    tiny = ExpressionParams(balanced_fraction=0.0, chain_leaves_min=1, chain_leaves_max=1, max_leaf=2)
    mix = TaskMix(["expressions"], [1.0], {"expressions": tiny})
    with pytest.raises(ValueError, match="could not draw enough distinct problems"):
        generate_splits(mix, {"train": 50, "validation": 5, "test": 5}, seed=0, max_tries_factor=5)


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown task family 'sudoku'"):
        TaskMix(["sudoku"], [1.0])
