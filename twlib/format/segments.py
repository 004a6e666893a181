"""A canonical trajectory cut into the pieces the orchestrator concatenates at inference (docs/design.md §4, §6)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

from .tags import JOIN, PARALLEL_CLOSE, THREAD_CLOSE, FormatError, thread_header
from .tree import Text, Trajectory

Source = Literal["model", "orchestrator"]


@dataclass(frozen=True)
class Segment:
    """One piece the orchestrator concatenates at inference: model output or an inserted string."""
    text: str
    source: Source
    kind: Literal["sequential", "header", "thread", "join"]
    block: int | None = None   # 0-based block index
    thread: int | None = None  # 1-based thread number


def segments(traj: Trajectory) -> list[Segment]:
    """Cut a canonical trajectory into the orchestrator's pieces (docs/design.md §4, §6).

    Sequential calls run up to and including ``</Outlines>``; each thread is header
    (orchestrator) + body ending in ``</Thread>`` (model); the join ``\\n`` is the orchestrator's;
    ``</Parallel>`` opens the next sequential call.

    >>> from twlib.format import Block, parse
    >>> [s.kind for s in segments(parse(Trajectory((Text("<think>\\n"), Block.from_plan(["a"], ["x"]),
    ...     Text("\\n</think>\\n\\n\\\\boxed{1}"))).render()))]
    ['sequential', 'header', 'thread', 'join', 'sequential']
    """
    out: list[Segment] = []
    pending, b = "", -1
    for item in traj.items:
        if isinstance(item, Text):
            pending += item.text
            continue
        b += 1
        if not item.canonical:
            raise FormatError(f"block {b} is not in canonical layout; segments need canonical whitespace")
        out.append(Segment(pending + item.head(), "model", "sequential"))
        for t in item.threads:
            out.append(Segment(thread_header(t.number, t.number == 1), "orchestrator", "header", b, t.number))
            out.append(Segment(t.body + THREAD_CLOSE, "model", "thread", b, t.number))
        out.append(Segment(JOIN, "orchestrator", "join", b))
        pending = PARALLEL_CLOSE
    out.append(Segment(pending, "model", "sequential"))
    return out


def render_segments(segs: Iterable[Segment]) -> str:
    return "".join(s.text for s in segs)
