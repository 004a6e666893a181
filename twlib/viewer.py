"""A fork-join trajectory as a reader should see it (paper §3.1; docs/design.md §4, §6, §7).

`trajectory_html` lays one trajectory out as HTML: sequential text, then each block with its outlines and its
threads side by side as columns, each thread's token count, the longest thread (the block's share of the
critical path) marked, and every outline linked to its thread. `timeline` draws one orchestrated run as a
Gantt chart of its engine calls (`twlib.orchestrator.CallRecord`): sequential calls on one lane, the threads
of a block on lanes of their own, concurrently, then the join. `report` writes a standalone HTML page of
such examples.

>>> from twlib.format import parse
>>> traj = parse("<think>\\n<Parallel>\\n<Outlines>\\n<Outline>1: a</Outline>\\n<Outline>2: b</Outline>\\n</Outlines>\\n"
...              "<Thread>\\n1: aa\\n</Thread><Thread>\\n2: b\\n</Thread>\\n</Parallel>\\n</think>\\n\\n\\\\boxed{1}", count=len)
>>> page = str(trajectory_html(traj))
>>> page.count('class="tw-thread'), "critical path" in page
(2, True)
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from . import format as fmt
from .files import atomic_write_text
from .plots import figure_axes
from .tokenizer import token_counter

__all__ = ["HTML", "trajectory_html", "timeline_frame", "timeline", "report"]

_CSS = """<style>
.tw-traj{font-family:ui-monospace,monospace;font-size:12px;line-height:1.35;margin:4px 0}
.tw-seq{white-space:pre-wrap;background:#f6f6f6;border-left:3px solid #999;padding:4px 8px;margin:4px 0}
.tw-block{border:1px solid #c9a66b;border-radius:4px;margin:6px 0;padding:4px}
.tw-head{color:#6b4f1d;font-weight:bold;margin:2px 4px}
.tw-outlines{margin:2px 4px 6px 4px;padding-left:18px}
.tw-cols{display:flex;gap:6px;align-items:flex-start}
.tw-thread{flex:1;min-width:0;border:1px solid #ccc;border-radius:3px;background:#fffdf7}
.tw-thread.tw-longest{border:2px solid #c0392b}
.tw-thread h4{margin:0;padding:2px 6px;font-size:11px;background:#f2e6cf}
.tw-longest h4{background:#f5c6c0}
.tw-body{white-space:pre-wrap;padding:4px 6px;margin:0}
.tw-badge{color:#c0392b;font-weight:bold}
</style>"""


class HTML(str):
    """HTML text that JupyterLab renders (``_repr_html_``) and that prints as its source anywhere else."""

    def _repr_html_(self) -> str:
        return str(self)

    def __repr__(self) -> str:  # the text a plain-text front end shows instead of the page
        return f"<HTML, {len(self)} characters: open in JupyterLab or a browser>"


def _counted(trajectory: fmt.Trajectory | str, tokenizer) -> fmt.Trajectory:
    if isinstance(trajectory, fmt.Trajectory):
        return trajectory
    return fmt.parse(trajectory, strict=False, count=token_counter(tokenizer) if tokenizer is not None else len)


def _thread_column(block_id: str, thread: fmt.Thread, outline: str, longest: bool) -> str:
    tokens = "?" if thread.n_tokens is None else thread.n_tokens
    badge = ' <span class="tw-badge">critical path</span>' if longest else ""
    return (f'<div class="tw-thread{" tw-longest" if longest else ""}" id="{block_id}-t{thread.number}">'
            f"<h4>thread {thread.number} · {tokens} tokens{badge}<br>{html.escape(outline.strip())}</h4>"
            f'<pre class="tw-body">{html.escape(thread.body.strip(chr(10)))}</pre></div>')


def _block_html(block: fmt.Block, index: int, uid: str) -> str:
    block_id = f"tw{uid}-b{index}"
    lengths = [t.n_tokens or 0 for t in block.threads]
    longest = lengths.index(max(lengths)) if lengths else -1
    outlines = {o.number: o.body for o in block.outlines}
    items = "".join(f'<li><a href="#{block_id}-t{o.number}">{o.number}:{html.escape(o.body)}</a></li>'
                    for o in block.outlines)
    columns = "".join(_thread_column(block_id, t, outlines.get(t.number, ""), k == longest)
                      for k, t in enumerate(block.threads))
    head = (f"block {index + 1}: {len(block.threads)} threads, {block.n_tokens or '?'} tokens, "
            f"longest thread {max(lengths) if lengths else 0} tokens")
    return (f'<div class="tw-block"><div class="tw-head">{head}</div><ol class="tw-outlines">{items}</ol>'
            f'<div class="tw-cols">{columns}</div></div>')


def trajectory_html(trajectory: fmt.Trajectory | str, tokenizer=None, title: str = "") -> HTML:
    """One trajectory as HTML (see the module doc). ``trajectory`` is a parsed `Trajectory` with token
    counts (`format.parse_ids`, or `format.parse(..., count=...)`) or a response text, counted with
    ``tokenizer`` (characters without one) after a lenient parse, so malformed output still shows."""
    traj = _counted(trajectory, tokenizer)
    uid = format(abs(hash((traj.render(), title))) % 10**8, "08d")
    parts, b = [], 0
    for item in traj.items:
        if isinstance(item, fmt.Block):
            parts.append(_block_html(item, b, uid))
            b += 1
        elif item.text.strip("\n"):
            parts.append(f'<div class="tw-seq">{html.escape(item.text.strip(chr(10)))}</div>')
    try:
        stats = fmt.statistics(traj)
        summary = (f"{stats.total_tokens} tokens, critical path {stats.critical_path_tokens} "
                   f"(acceleration ratio {stats.acceleration_ratio:.2f}), {stats.num_blocks} block(s)")
    except fmt.FormatError:
        summary = "token counts unknown"
    heading = f"<b>{html.escape(title)}</b> · " if title else ""
    return HTML(f'{_CSS}<div class="tw-traj"><div>{heading}{summary}</div>{"".join(parts)}</div>')


def _call_dict(call: Any) -> dict:
    return asdict(call) if is_dataclass(call) else dict(call)


def timeline_frame(calls: Sequence[Any]) -> pd.DataFrame:
    """One bar per engine call: ``lane`` (``sequential`` or ``thread N``), ``start`` and ``end`` in seconds from
    the start of the run, ``block``, ``tokens`` generated. ``calls`` are `CallRecord`s or their dicts (what the
    evaluation records keep).

    >>> from twlib.orchestrator import CallRecord
    >>> timeline_frame([CallRecord("sequential", 9, 5, "stop", 0.5),
    ...                 CallRecord("thread", 15, 3, "stop", 0.25, 0, 1, started=0.5)])[["lane", "start", "end"]].values.tolist()
    [['sequential', 0.0, 0.5], ['thread 1', 0.5, 0.75]]
    """
    rows = []
    for c in map(_call_dict, calls):
        lane = "sequential" if c["kind"] == "sequential" else f"thread {c['thread']}"
        rows.append({"lane": lane, "start": c.get("started", 0.0), "end": c.get("started", 0.0) + c["seconds"],
                     "block": c.get("block"), "tokens": c["generated_tokens"]})
    return pd.DataFrame(rows, columns=["lane", "start", "end", "block", "tokens"])


def timeline(calls: Sequence[Any], title: str = "Engine calls of one run"):
    """A Gantt chart of `timeline_frame`: sequential calls on the top lane, thread N on lane N; a block's
    threads run side by side, and the next sequential call starts after the join."""
    frame = timeline_frame(calls)
    lanes = ["sequential"] + sorted({lane for lane in frame.lane if lane != "sequential"}, key=lambda s: int(s.split()[1]))
    fig, ax = figure_axes(figsize=(8, 0.5 + 0.45 * len(lanes)))
    colours = {"sequential": "#7f8c8d"}
    for row in frame.itertuples():
        y = lanes.index(row.lane)
        ax.barh(y, row.end - row.start, left=row.start, height=0.6,
                color=colours.get(row.lane, "#d35400"), edgecolor="black", linewidth=0.5)
        ax.text(row.start + (row.end - row.start) / 2, y, str(row.tokens), ha="center", va="center", fontsize=8)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set(xlabel="seconds since the run began (bar label: tokens generated)", title=title)
    fig.tight_layout()
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def report(examples: Sequence[dict], path: str | Path, title: str = "ThreadWeaver examples", tokenizer=None) -> Path:
    """A standalone HTML page: per example (``{"title", "question", "response", "calls"?}``) the question, the
    trajectory (`trajectory_html`) and, when its calls are given, its `timeline`. Written atomically."""
    import matplotlib.pyplot as plt

    sections = []
    for ex in examples:
        body = trajectory_html(ex["response"], tokenizer, ex.get("title", ""))
        if ex.get("calls"):
            fig = timeline(ex["calls"])
            body += f'<p><img alt="timeline" src="data:image/png;base64,{_png(fig)}"></p>'
            plt.close(fig)
        sections.append(f'<h2>{html.escape(ex.get("title", ""))}</h2><pre>{html.escape(ex["question"])}</pre>{body}')
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")
    return atomic_write_text(path, page)
