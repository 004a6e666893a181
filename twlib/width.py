"""Adaptive width (paper §3.3 and §4: the model learns *when* and *how wide* to fork), per available width.

A problem's available width is how many threads its work can use at once: ``k`` independent sub-expressions that
are summed give ``k``; a chain (each link starts from the one before) gives 1, and is kept apart as ``chain``.
Per width, `width_table` sets what the parallel model chose (the threads of its widest block, 1 where it did not
fork) beside the ideal token speedup of the data's own two CoTs and the measured one, both models' accuracy, and the
wall clock per problem. Example: a test set with two 4-wide problems, where the model forked into 4 and 3 threads,
reads ``threads_chosen`` 3.5 in its row ``4``.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from .tasks.expressions import definitions, independent_subexpressions

CHAIN = "chain"


def available_width(problem: dict) -> str | None:
    """``'1'``..``'8'`` for an expression problem's independent sub-expressions, ``'chain'`` for a chain, None for
    other families (their width is not known from the question).

    >>> q = "Work out ...\\na3+b4*c2\\nd5+e1*f1"
    >>> available_width({"family": "expressions", "question": q}), available_width({"family": "products"})
    ('2', None)
    >>> available_width({"family": "expressions", "question": "a3+b4*c2\\ndA+e1*f1"})
    'chain'
    """
    if problem.get("family") != "expressions":
        return None
    question = problem["question"]
    width = independent_subexpressions(question)
    return CHAIN if width == 1 and len(definitions(question)) > 1 else str(width)


def _order(label: str) -> int:
    return 0 if label == CHAIN else int(label)


def _one_model(frame: pd.DataFrame, problems: Sequence[dict]) -> pd.DataFrame:
    widths = [available_width(problems[k]) for k in frame["problem"]]
    rows = frame.assign(width=widths,
                        ideal_speedup=[problems[k].get("ideal_speedup", float("nan")) for k in frame["problem"]],
                        threads_chosen=[max(t) if len(t) else 1 for t in frame["threads_per_block"]],
                        forked=frame["num_blocks"] > 0).dropna(subset=["width"])
    table = rows.groupby("width").agg(
        problems=("problem", "nunique"), seq_accuracy=("seq_correct", "mean"), par_accuracy=("par_correct", "mean"),
        threads_chosen=("threads_chosen", "mean"), forked=("forked", "mean"), ideal_speedup=("ideal_speedup", "mean"),
        token_speedup=("speedup", "mean"), seq_wall_seconds=("seq_wall_seconds", "mean"),
        par_wall_seconds=("par_wall_seconds", "mean"))
    table["wall_speedup"] = table.seq_wall_seconds / table.par_wall_seconds
    return table.loc[sorted(table.index, key=_order)]


def width_table(frames: dict[str, pd.DataFrame], problems: Sequence[dict]) -> pd.DataFrame:
    """One row per model and available width (``chain`` first, then 1, 2, …) of notebook 05's paired records
    (``{model: evaluation.paired_frame(baseline, model)}``; the ``problem`` column indexes ``problems``, rows of
    notebook 01's test split with ``question`` and ``ideal_speedup``). Expression problems only; empty when there
    are none.

    Columns: ``problems``; ``seq_accuracy`` (the baseline's) and ``par_accuracy`` (the model's); ``threads_chosen``
    (mean threads of the widest block, 1 for an answer without one); ``forked`` (share of answers with a block);
    ``ideal_speedup`` (mean of the data's sequential tokens / parallel critical path) and ``token_speedup`` (mean
    measured, per answer, against the baseline's tokens); the mean wall clock per problem of the baseline and the
    model and their ratio ``wall_speedup``.
    """
    tables = {name: _one_model(frame, problems) for name, frame in frames.items()}
    tables = {name: t for name, t in tables.items() if len(t)}
    if not tables:
        return pd.DataFrame()
    table = pd.concat(tables, names=["model", "available width"])
    return table.round(3)
