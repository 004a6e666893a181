"""Dataset rows: statistics columns against recomputation, parquet round trip, summary tables."""
import random

import pandas as pd
import pytest

from twlib import dataset
from twlib import format as fmt
from twlib.tasks import ExpressionParams, Fork, Group, Plan, Problem, ProductParams, make_problem
from twlib.tokenizer import build_char_tokenizer, prompt_ids

TOK = build_char_tokenizer()


def _hand_problem() -> Problem:
    plan = Plan((Fork((Group("A", ("A=1+2", "=3")), Group("B", ("B=4",)))), ("A+B", "=3+4", "=7")), "7")
    return Problem("A=1+2\nB=4\nA+B", "7", "expressions", "balanced", plan)


def test_row_statistics_hand_computed():
    row = dataset.problem_row(_hand_problem(), TOK, "test", 3)
    # sequential: "<think>\n" (2) + "A=1+2\n=3\nB=4\nA+B\n=3+4\n=7\n" (6+3+4+4+5+3=25) + "</think>\n\n\\boxed{7}" (6) + EOS (1)
    assert row["seq_tokens"] == 2 + 25 + 6 + 1
    # parallel: "<think>\n" 2 | block: <Parallel>\n<Outlines>\n 4, "<Outline>1: A</Outline>\n" 7 x2,
    # </Outlines> 1, "\n" 1, thread 1 "<Thread>\n1: A=1+2\n=3\n</Thread>" 15, thread 2
    # "<Thread>\n2: B=4\n</Thread>" 10, "\n</Parallel>" 2 | "\nA+B\n=3+4\n=7\n" 13 | tail 6 | EOS 1
    block = 4 + 14 + 1 + 1 + 15 + 10 + 2
    assert row["par_total_tokens"] == 2 + block + 13 + 6 + 1
    assert row["par_critical_tokens"] == 2 + (block - 10) + 13 + 6 + 1
    assert row["ideal_speedup"] == pytest.approx(34 / 59)
    assert (row["num_blocks"], row["max_threads"], row["drift_tokens"]) == (1, 2, -1)
    assert row["prompt_tokens"] == len(prompt_ids(TOK, "A=1+2\nB=4\nA+B"))
    assert row["prompt"] == [{"role": "user", "content": "A=1+2\nB=4\nA+B"}]
    assert row["id"] == "test-000003"


def test_rows_match_id_level_statistics():
    """The text-level counts equal counts from parsing the segment-wise token ids."""
    from twlib.tokenizer import segment_ids

    rng = random.Random(0)
    for family, params in [("expressions", ExpressionParams()), ("products", ProductParams())]:
        for i in range(25):
            p = make_problem(family, rng, params)
            row = dataset.problem_row(p, TOK, "train", i)
            ids = segment_ids(p.plan.parallel_trajectory(), TOK).ids
            stats = fmt.statistics(fmt.parse_ids(ids, TOK))
            assert (stats.total_tokens, stats.critical_path_tokens) == (row["par_total_tokens"],
                                                                        row["par_critical_tokens"])


def test_row_rejects_wrong_gold():
    p = _hand_problem()
    bad = Problem(p.question, "8", p.family, p.shape, p.plan)
    with pytest.raises(fmt.FormatError, match="gold is '8'"):
        dataset.problem_row(bad, TOK, "train", 0)


def test_parquet_round_trip(tmp_path):
    rng = random.Random(1)
    problems = {s: [make_problem("expressions", rng, ExpressionParams()) for _ in range(4)]
                for s in ("train", "validation", "test")}
    dsd = dataset.build_dataset_dict(problems, TOK)
    paths = dataset.save_parquet(dsd, tmp_path / "d")
    assert not list((tmp_path / "d").glob(".*partial"))
    back = dataset.load_parquet(tmp_path / "d")
    for split in dsd:
        assert back[split].to_list() == dsd[split].to_list()
        assert paths[split].endswith(f"{split}.parquet")
    with pytest.raises(dataset.DatasetError, match=r"missing/train.parquet is missing: the train split .*save_parquet"):
        dataset.load_parquet(tmp_path / "missing")


def test_rows_built_by_several_processes_equal_rows_built_here():
    rng = random.Random(2)
    problems = {"train": [make_problem("expressions", rng, ExpressionParams()) for _ in range(7)], "validation": [],
                "test": [make_problem("expressions", rng, ExpressionParams()) for _ in range(3)]}
    here = dataset.build_dataset_dict(problems, TOK, workers=1)
    counted = []
    forked = dataset.build_dataset_dict(problems, TOK, progress=counted.append, workers=2, chunk=2)
    assert {s: forked[s].to_list() for s in forked} == {s: here[s].to_list() for s in here}
    assert [r["id"] for r in forked["train"]] == [f"train-{i:06d}" for i in range(7)] and sum(counted) == 10


def test_statistics_table_and_summary():
    rng = random.Random(2)
    rows = [dataset.problem_row(make_problem("expressions", rng, ExpressionParams()), TOK, "test", i)
            for i in range(40)]
    df = pd.DataFrame(rows)
    table = dataset.statistics_table(df)
    for (family, shape), r in table.iterrows():
        sub = df[(df.family == family) & (df["shape"] == shape)]
        assert r.examples == len(sub)
        assert r.ideal_speedup == pytest.approx(sub.ideal_speedup.mean(), abs=1e-3)
        assert r.activation == (1.0 if shape == "balanced" else 0.0)
    summary = dataset.summary_metrics(df, table)
    assert summary["examples"] == {"test": 40}
    assert summary["drifted_rows"] == 0
    assert summary["ideal_speedup_mean"] == pytest.approx(df.ideal_speedup.mean())
    shown = dataset.examples(df.to_dict("records"), per_shape=1)
    assert sorted((r["family"], r["shape"]) for r in shown) == sorted(table.index)
