"""Grading with math-verify, per-problem records from the orchestrator, and the docs/design.md §7 summary by hand."""
import pytest
from test_orchestrator import SEQUENTIAL, TOK, TWO_BLOCKS, ReplayEngine

from twlib import format as fmt
from twlib import trie
from twlib.evaluation import evaluate, summarize
from twlib.grading import grade
from twlib.orchestrator import Orchestrator
from twlib.tokenizer import prompt_ids


@pytest.mark.parametrize("response, gold, correct", [
    ("<think>\n</think>\n\n\\boxed{7}", "7", True),
    ("<think>\n</think>\n\n\\boxed{07}", "7", True),         # the same number
    ("<think>\n</think>\n\n\\boxed{\\frac{1}{2}}", "0.5", True),
    ("<think>\n</think>\n\n\\boxed{8}", "7", False),
    ("<think>\n\\boxed{7}\n</think>\n\nno box", "7", False),  # a box inside the reasoning does not count
    ("<think>\nnever closed \\boxed{7}", "7", False),
    ("<think>\n</think>\n\n\\boxed{}}{", "7", False),
])
def test_grade(response, gold, correct):
    assert grade(response, gold).correct is correct


def _records(wall, engine, total, critical, correct, ids):
    return [{"id": i, "gold": "1", "correct": c, "total_tokens": t, "critical_path_tokens": k, "num_blocks": int(t != k),
             "wall_seconds": w, "engine_seconds": e}
            for i, w, e, t, k, c in zip(ids, wall, engine, total, critical, correct)]


def test_summary_by_hand():
    ids = ["a", "b", "c"]
    seq = _records([3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [300, 200, 100], [300, 200, 100], [True, True, False], ids)
    par = _records([1.0, 2.0, 1.0], [0.9, 1.9, 0.95], [330, 200, 120], [150, 200, 50], [True, False, True], ids)
    s = summarize(seq, par)
    assert s["sequential_accuracy"] == pytest.approx(2 / 3) and s["parallel_accuracy"] == pytest.approx(2 / 3)
    assert s["mean_speedup"] == pytest.approx((2.0 + 1.0 + 2.0) / 3)
    assert s["speedup_of_means"] == pytest.approx(600 / 400)
    assert s["max_speedup_both_correct"] == pytest.approx(2.0)   # only problem a is right for both
    assert s["activation_ratio"] == pytest.approx(2 / 3)
    assert s["wall_clock_speedup"] == pytest.approx(6.0 / 4.0)
    assert s["parallel_efficiency"] == pytest.approx(1.5 / 1.5)
    assert s["orchestration_overhead"] == pytest.approx(1 - 3.75 / 4.0)


def test_summary_rejects_different_problem_lists():
    a = _records([1.0], [1.0], [10], [10], [True], ["a"])
    b = _records([1.0], [1.0], [10], [10], [True], ["b"])
    with pytest.raises(ValueError, match="same problems"):
        summarize(a, b)
    with pytest.raises(ValueError, match="same non-empty"):
        summarize(a, [])


def test_evaluate_records_from_replayed_trajectories():
    problems = [{"id": "p0", "question": "q1", "answer": "7", "family": "f", "shape": "two-blocks"},
                {"id": "p1", "question": "q2", "answer": "4", "family": "f", "shape": "sequential"}]
    units = []
    for p, text in zip(problems, (TWO_BLOCKS, SEQUENTIAL)):
        units += trie.units(prompt_ids(TOK, p["question"]), fmt.parse(text), TOK)
    records = evaluate(Orchestrator(ReplayEngine(units), TOK), problems, TOK)
    assert [(r["id"], r["answer"], r["correct"]) for r in records] == [("p0", "7", True), ("p1", "3", False)]
    assert records[0]["num_blocks"] == 2 and records[0]["threads_per_block"] == [2, 3]
    assert records[1]["critical_path_tokens"] == records[1]["total_tokens"]
    assert all(0 < r["engine_seconds"] <= r["wall_seconds"] for r in records)
    assert [r["format_correct"] for r in records] == [True, True]


def test_real_math_source_is_the_family_and_bad_format_is_counted():
    problems = [{"id": "aime24-0", "question": "q1", "answer": "7", "source": "aime24"}]
    units = trie.units(prompt_ids(TOK, "q1"), fmt.parse(TWO_BLOCKS), TOK)
    record = evaluate(Orchestrator(ReplayEngine(units), TOK), problems, TOK)[0]
    assert (record["family"], record["correct"], record["format_correct"]) == ("aime24", True, True)
    # A response that never closes </think> fails the strict check (and so the format-correct rate).
    from scripted_engines import END, ScriptEngine
    bad = evaluate(Orchestrator(ScriptEngine(lambda p: "<think>\nx \\boxed{7}" + END), TOK), problems, TOK)[0]
    assert bad["format_correct"] is False and not bad["flags"]
