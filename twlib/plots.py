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


def figure_axes(figsize=(7, 4)):
    """A figure with one axes, in the kit's style."""
    plt, _ = _setup()
    return plt.subplots(figsize=figsize)


def _plain_log_axis(axis) -> None:
    """Tick labels of a log axis as plain numbers (``4`` rather than ``4 × 10⁰``)."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain)


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


def _speedup_hist(df, column: str, xlabel: str, title: str):
    plt, sns = _setup()
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.histplot(x=df[column], hue=_group(df), bins=30, element="step", ax=ax)
    ax.axvline(1.0, ls="--", c="grey", lw=1)
    ax.set(xlabel=xlabel, ylabel="problems", title=title)
    fig.tight_layout()
    return fig


def ideal_speedup_hist(df):
    """Per-problem ideal speedup (sequential tokens / parallel critical path) by family and shape."""
    return _speedup_hist(df, "ideal_speedup", "ideal speedup (seq tokens / par critical path)",
                         "Per-problem ideal speedup")


def trie_masks(corrected, official, start: int = 0, stop: int | None = None):
    """Ancestor-only attention mask of one flattened trie under both objectives, side by side.

    Cells: 0 blocked, 1 allowed, 2 allowed in a row whose output carries loss. The mask is the same;
    the objectives differ in which rows are trained and what they predict.
    """
    import numpy as np

    plt, sns = _setup()
    stop = len(corrected) if stop is None else stop
    n = stop - start
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    for ax, packed, title in ((axes[0], corrected, "corrected: each token once, from its trie parent"),
                              (axes[1], official, "official: flat-order labels, threads 2..K twice")):
        grid = np.zeros((n, n))
        for qi in range(n):
            q = start + qi
            trained_row = packed.labels[q] != -100
            for ki in range(qi + 1):
                k = start + ki
                if k <= q <= packed.exit[k]:
                    grid[qi, ki] = 2 if trained_row else 1
        sns.heatmap(grid, ax=ax, cmap=sns.color_palette(["white", "#9ecae1", "#08519c"], as_cmap=True),
                    cbar=False, square=True, xticklabels=False, yticklabels=False)
        ax.set(title=title, xlabel=f"key (flat index {start}..{stop - 1})", ylabel="query")
    fig.tight_layout()
    return fig


def loss_curves(histories: dict):
    """Training loss and learning rate per step for each model (``{"name": loss_history DataFrame}``)."""
    plt, sns = _setup()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, df in histories.items():
        if len(df):
            sns.lineplot(x=df["step"], y=df["loss"], ax=ax1, label=name)
            sns.lineplot(x=df["step"], y=df["learning_rate"], ax=ax2, label=name)
    ax1.set(yscale="log", xlabel="step", ylabel="training loss (nats/token)", title="SFT loss")
    _plain_log_axis(ax1.yaxis)
    ax2.set(xlabel="step", ylabel="learning rate", title="Schedule")
    fig.tight_layout()
    return fig


def speedup_hist(frame):
    """Per-problem token-latency speedup of the parallel model over the sequential baseline."""
    return _speedup_hist(frame, "speedup", "speedup (sequential tokens / parallel critical path)",
                         "Per-problem token-latency speedup")


def accuracy_vs_latency(table):
    """Accuracy against mean token latency for both models, one point per family/shape (paper's Pareto view)."""
    import pandas as pd

    plt, sns = _setup()
    points = pd.concat([
        pd.DataFrame({"model": "sequential", "group": table.family + "/" + table["shape"],
                      "latency": table.seq_latency, "accuracy": table.seq_accuracy}),
        pd.DataFrame({"model": "parallel", "group": table.family + "/" + table["shape"],
                      "latency": table.par_latency, "accuracy": table.par_accuracy})])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sns.scatterplot(data=points, x="latency", y="accuracy", hue="group", style="model", s=90, ax=ax)
    for group, g in points.groupby("group"):
        ax.plot(g.latency, g.accuracy, c="grey", lw=0.8, alpha=0.6)
    ax.set(xlabel="mean token latency (critical-path tokens)", ylabel="accuracy", title="Accuracy vs latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def thread_counts(frame):
    """How many threads the parallel model opened per block (problems without a block are left out)."""
    import pandas as pd

    plt, sns = _setup()
    counts = pd.Series([k for ks in frame["threads_per_block"] for k in ks], name="threads", dtype="int64")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if len(counts):
        sns.countplot(x=counts, ax=ax, color="tab:blue")
    ax.set(xlabel="threads in a block", ylabel="blocks", title="Thread-count distribution")
    fig.tight_layout()
    return fig


def rl_curves(histories: dict, window: int = 5):
    """Per-step RL statistics of several runs (``{name: pgrpo.history(...)}``), smoothed over ``window`` steps."""
    import pandas as pd

    plt, sns = _setup()
    panels = [("reward", "reward"), ("accuracy", "accuracy (sampled)"), ("acceleration_ratio", "acceleration ratio"),
              ("critical_path_tokens", "critical-path tokens"), ("total_tokens", "total tokens"),
              ("activation_ratio", "activation ratio"), ("threads_per_block", "threads per block"),
              ("guard_hit_ratio", "rollouts hitting a guard")]
    frames = []
    for name, df in histories.items():
        smooth = df.set_index("step").drop(columns=["loss"], errors="ignore").rolling(window, min_periods=1).mean()
        frames.append(smooth.reset_index().assign(run=name))
    data = pd.concat(frames, ignore_index=True)
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5), sharex=True)
    for ax, (column, title) in zip(axes.flat, panels):
        sns.lineplot(data=data, x="step", y=column, hue="run", ax=ax, legend=ax is axes.flat[0])
        ax.set(title=title, ylabel="", xlabel="RL step")
    fig.suptitle(f"RL rollouts per step (moving mean over {window} steps)")
    fig.tight_layout()
    return fig


def model_comparison(table):
    """Accuracy (x) vs mean per-problem speedup (y) of every evaluated model (`evaluation.model_table`)."""
    plt, sns = _setup()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sns.scatterplot(x=table["accuracy"], y=table["mean_speedup"], hue=table.index.rename("model"), s=90, ax=ax)
    for name, row in table.iterrows():
        ax.annotate(name, (row["accuracy"], row["mean_speedup"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(1.0, ls="--", c="grey", lw=1)
    ax.set(xlabel="test accuracy", ylabel="mean per-problem speedup vs sequential SFT",
           title="SFT and RL models: accuracy and token-latency speedup")
    fig.tight_layout()
    return fig


def rollout_fates(records, fates):
    """Stage-2 rollouts per problem shape, stacked by fate in the order of ``fates``
    (`twlib.self_training.REASONS`: kept, guard, format, drift, incorrect, duplicate)."""
    import pandas as pd

    plt, sns = _setup()
    df = pd.DataFrame(records)
    df["shape"] = df["shape"].fillna("all")  # real-math problems have no shape (groupby would drop them)
    counts = df.groupby(["shape", "reason"]).size().unstack(fill_value=0)
    counts = counts[[r for r in fates if r in counts.columns]]
    fig, ax = plt.subplots(figsize=(7, 4))
    counts.plot.bar(stacked=True, ax=ax, color=sns.color_palette("Set2", len(counts.columns)), width=0.75)
    ax.set(xlabel="problem shape", ylabel="rollouts", title="Self-training rollouts and what the filter did")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(title="fate", fontsize=8)
    fig.tight_layout()
    return fig


def adaptive_width(table, wall_clock: bool = True):
    """Per available width (`width.width_table`, one line per model; ``chain`` first): the threads each model chose
    against the available ones, ideal and measured token speedup, accuracy against the sequential baseline and,
    with ``wall_clock`` (problems decoded one at a time, so that a record's seconds are its latency), wall clock
    per problem."""
    plt, _ = _setup()
    labels = sorted({w for _, w in table.index}, key=lambda w: 0 if w == "chain" else int(w))
    x = {w: i for i, w in enumerate(labels)}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8)) if wall_clock else plt.subplots(1, 3, figsize=(15, 4.2))
    axes = list(axes.flat)
    per_width = table.groupby(level="available width").first().reindex(labels)
    ends = range(len(labels))
    # Reference lines on top, dashed, so a model that matches them exactly leaves them visible.
    axes[0].plot(ends, [1 if w == "chain" else int(w) for w in labels], ls="--", c="grey", zorder=5, label="available")
    axes[1].plot(ends, per_width.ideal_speedup, ls="--", c="grey", zorder=5, label="ideal (the data's CoTs)")
    axes[2].plot(ends, per_width.seq_accuracy, marker="s", c="black", label="sequential baseline")
    if wall_clock:
        axes[3].plot(ends, per_width.seq_wall_seconds, marker="s", c="black", label="sequential baseline")
    for model, rows in table.groupby(level="model", sort=False):
        pos = [x[w] for w in rows.index.get_level_values("available width")]
        columns = ["threads_chosen", "token_speedup", "par_accuracy"] + (["par_wall_seconds"] if wall_clock else [])
        for ax, column in zip(axes, columns):
            ax.plot(pos, rows[column], marker="o", label=model)
    axes[1].axhline(1.0, c="black", lw=0.8)
    titles = [("threads in the widest block", "How wide each model forked"),
              ("token-latency speedup", "Sequential tokens / critical path"), ("accuracy", "Accuracy"),
              ("seconds per problem", "Wall clock per problem, one at a time")]
    for ax, (ylabel, title) in zip(axes, titles):
        ax.set(ylabel=ylabel, title=title)
        ax.set_xticks(ends, labels)
        ax.set_xlabel("available width (independent sub-expressions)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
