"""Seaborn figures saved next to metrics. Each function takes a pandas DataFrame and returns a Figure.

>>> import pandas as pd
>>> df = pd.DataFrame({"seq_tokens": [10, 20], "par_critical_tokens": [8, 10], "ideal_speedup": [1.25, 2.0],
...                    "family": ["a", "a"], "shape": ["x", "y"]})
>>> type(ideal_speedup_hist(df)).__name__
'Figure'
"""
from __future__ import annotations


def _setup():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _group(df):
    return (df["family"] + "/" + df["shape"]).rename("family / shape")


def total_vs_critical(df):
    """Sequential CoT tokens (x) vs the parallel CoT's critical path (y); below the diagonal = faster."""
    plt, sns = _setup()
    fig, ax = plt.subplots(figsize=(6, 5))
    sns.scatterplot(x=df["seq_tokens"], y=df["par_critical_tokens"], hue=_group(df), alpha=0.6, s=18, ax=ax)
    hi = float(max(df["seq_tokens"].max(), df["par_critical_tokens"].max()))
    ax.plot([0, hi], [0, hi], ls="--", c="grey", lw=1, label="no speedup")
    ax.set(xlabel="sequential CoT tokens", ylabel="parallel CoT critical-path tokens",
           title="Token latency: sequential vs fork-join")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ideal_speedup_hist(df):
    """Per-problem ideal speedup (sequential tokens / parallel critical path) by family and shape."""
    plt, sns = _setup()
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.histplot(x=df["ideal_speedup"], hue=_group(df), bins=30, element="step", ax=ax)
    ax.axvline(1.0, ls="--", c="grey", lw=1)
    ax.set(xlabel="ideal speedup (seq tokens / par critical path)", ylabel="problems",
           title="Per-problem ideal speedup")
    fig.tight_layout()
    return fig
