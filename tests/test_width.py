"""Adaptive width: the width data (1..8 independent sub-expressions, chains), its ideal speedups counted by hand,
the per-width table and figure of notebook 05, and the width profile's sizes."""
import random

import pandas as pd
import pytest

from twlib import config, dataset, plots, sft, width
from twlib import format as fmt
from twlib.tasks import ExpressionParams, make_problem
from twlib.tasks.expressions import evaluate_question, independent_subexpressions
from twlib.tokenizer import build_char_tokenizer, token_counter

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _problem(k: int, repeats: int, seed: int = 0, balanced: bool = True):
    params = ExpressionParams(balanced_fraction=1.0 if balanced else 0.0, groups_min=k, groups_max=k,
                              repeats_min=repeats, repeats_max=repeats, chain_repeats_min=repeats,
                              chain_repeats_max=repeats)
    return make_problem("expressions", random.Random(seed), params)


@pytest.mark.parametrize("k", range(1, 9))
def test_width_k_problem_forks_into_k_threads(k):
    for seed in range(5):
        p = _problem(k, 3, seed)
        assert independent_subexpressions(p.question) == k
        assert width.available_width({"family": "expressions", "question": p.question}) == str(k)
        assert p.answer == str(evaluate_question(p.question))
        par, seq = fmt.parse(p.plan.parallel_text()), fmt.parse(p.plan.sequential_text())
        assert par.answer == seq.answer == p.answer
        # One sub-expression has nothing to fork: the parallel CoT is the sequential one.
        assert [len(b.threads) for b in par.blocks] == ([] if k == 1 else [k])
        assert p.shape == ("single" if k == 1 else "balanced")


def test_chains_have_width_one_and_never_fork():
    for k in (2, 5, 8):
        p = _problem(k, 2, seed=k, balanced=False)
        assert p.shape == "chain" and independent_subexpressions(p.question) == 1
        assert width.available_width({"family": "expressions", "question": p.question}) == "chain"
        assert not fmt.parse(p.plan.parallel_text()).blocks
        assert p.answer == str(evaluate_question(p.question))


def _hand_counted(k: int, r: int) -> tuple[int, int]:
    """Sequential tokens and parallel critical path of a width-``k`` problem with ``r`` additions per sub-expression,
    counted on the character tokenizer (tags and ``\\boxed{`` are one token each; EOS counts one):

    - a sub-expression: definition ``a3+b4*c2\\n`` 9, ``r`` lines ``2:3+4=7\\n`` of 8, its value ``A1\\n`` 3;
    - the join: ``A1+B6:1+6=7\\n`` 12, then ``7+C5:7+5=2\\n`` 11 per further value;
    - ``<think>\\n`` 2 at the start, ``</think>\\n\\n\\boxed{7}`` 6 and EOS 1 at the end;
    - a block's sequential part: ``<Parallel>\\n<Outlines>\\n`` 4, ``<Outline>1: A</Outline>\\n`` 7 per thread,
      ``</Outlines>\\n`` 2, ``\\n</Parallel>\\n`` 3 after the last thread; a thread adds ``<Thread>\\n1: `` 5 and
      ``</Thread>`` 1 around its sub-expression, and only the longest counts on the critical path.
    """
    sub = 9 + 8 * r + 3
    join = 0 if k == 1 else 12 + 11 * (k - 2)
    sequential = 2 + k * sub + join + 6 + 1
    critical = sequential if k == 1 else 2 + 4 + 7 * k + 2 + (5 + sub + 1) + 3 + join + 6 + 1
    return sequential, critical


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("r", [1, 5, 8])
def test_ideal_speedup_hand_counted(k, r):
    count = token_counter(build_char_tokenizer())
    p = _problem(k, r, seed=k * 10 + r)
    row = dataset.trajectory_row(p.question, p.answer, p.plan.parallel_text(), p.plan.sequential_text(), count)
    sequential, critical = _hand_counted(k, r)
    assert (row["seq_tokens"], row["par_critical_tokens"]) == (sequential, critical)
    assert row["ideal_speedup"] == pytest.approx(sequential / critical)


def test_hand_counted_ideal_speedups_grow_with_width():
    # Two 1-addition sub-expressions are slower in parallel (the outlines cost more than a thread saves);
    # eight of eight additions: 695 / 234 = 2.97x.
    assert _hand_counted(2, 1) == (61, 70)
    assert _hand_counted(8, 8) == (695, 234)
    ideal = [s / c for s, c in map(lambda k: _hand_counted(k, 6), range(1, 9))]
    assert ideal[0] == 1.0 and all(b > a for a, b in zip(ideal, ideal[1:]))


def _frame(rows):
    return pd.DataFrame([{"problem": i, "seq_correct": s, "par_correct": c, "speedup": x, "num_blocks": len(t),
                          "threads_per_block": t, "seq_wall_seconds": ws, "par_wall_seconds": wp}
                         for i, (s, c, x, t, ws, wp) in enumerate(rows)])


def test_width_table_hand_computed():
    q2, q4, chain = "a1+b1*c1\nd1+e1*f1", "a1+b1*c1\nd1+e1*f1\ng1+h1*i1\nj1+k1*l1", "a1+b1*c1\ndA+e1*f1"
    problems = [{"family": "expressions", "question": q, "ideal_speedup": x}
                for q, x in ((q4, 2.0), (q2, 1.2), (q4, 2.2), (chain, 1.0))] + [{"family": "products", "question": "3*4"}]
    frame = _frame([(True, True, 1.8, [4], 2.0, 1.0), (True, False, 1.0, [], 1.0, 1.0),
                    (True, True, 1.4, [3], 2.0, 1.5), (False, True, 1.0, [], 1.0, 0.5), (True, True, 1.0, [], 1.0, 1.0)])
    table = width.width_table({"m": frame}, problems)
    assert list(table.index) == [("m", "chain"), ("m", "2"), ("m", "4")]  # chains first; products left out
    four = table.loc[("m", "4")]
    assert four.problems == 2 and four.threads_chosen == 3.5 and four.forked == 1.0
    assert four.ideal_speedup == 2.1 and four.token_speedup == 1.6 and four.par_accuracy == 1.0
    assert four.seq_wall_seconds == 2.0 and four.par_wall_seconds == 1.25 and four.wall_speedup == 1.6
    two = table.loc[("m", "2")]
    assert two.threads_chosen == 1 and two.forked == 0 and two.par_accuracy == 0
    assert table.loc[("m", "chain")].seq_accuracy == 0
    assert width.width_table({"m": frame.iloc[4:]}, problems).empty


def test_adaptive_width_figure_has_a_panel_per_view():
    problems = [{"family": "expressions", "question": "a1+b1*c1\nd1+e1*f1", "ideal_speedup": 1.2}]
    table = width.width_table({"a": _frame([(True, True, 1.1, [2], 1.0, 0.9)]),
                               "b": _frame([(True, True, 1.0, [], 1.0, 1.0)])}, problems)
    assert len(plots.adaptive_width(table).axes) == 4
    fig = plots.adaptive_width(table, wall_clock=False)
    assert len(fig.axes) == 3 and [line.get_label() for line in fig.axes[0].lines] == ["available", "a", "b"]
    assert [line.get_label() for line in fig.axes[2].lines] == ["sequential baseline", "a", "b"]


def test_width_profile_spans_one_to_eight_and_its_widest_problem_fits_a_row():
    profile = config.load_profile(ROOT / "params" / "width.yaml")
    data, sft_cfg = profile.stage_config("01_trajectories"), profile.stage_config("02_trie_sft")
    assert (data.expr_groups_min, data.expr_groups_max, data.coarse_fraction) == (1, 8, 0.0)
    assert profile.stage_config("05_evaluation").batch_size == 1
    tokenizer = build_char_tokenizer()
    widest = _problem(8, data.expr_repeats_max)
    tries = sft.trajectory_tries([{"question": widest.question, "text": widest.plan.parallel_text()}], tokenizer)
    assert len(tries[0]) <= sft_cfg.row_tokens
