"""The parsed trajectory: text, fork-join blocks, rendering, the final answer, and token statistics
(docs/design.md §4, §7). Pure Python.

>>> Block.from_plan(["A"], ["A=1"]).render()
'<Parallel>\\n<Outlines>\\n<Outline>1: A</Outline>\\n</Outlines>\\n<Thread>\\n1: A=1\\n</Thread>\\n</Parallel>'
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import groupby
from typing import Sequence

from .tags import (
    BOXED,
    OUTLINE_CLOSE,
    OUTLINE_OPEN,
    OUTLINES_CLOSE,
    OUTLINES_OPEN,
    PARALLEL_CLOSE,
    PARALLEL_OPEN,
    THINK_CLOSE,
    THREAD_CLOSE,
    THREAD_OPEN,
    FormatError,
)

_BRACE_RE = re.compile("[{}]")
# Canonical whitespace around block parts; index names are used by `Block.spacing`.
_CANON = {"after_parallel": "\n", "after_outlines_open": "\n", "after_outline": "\n",
          "after_outlines_close": "\n", "between_threads": "", "after_threads": "\n"}


@dataclass(frozen=True)
class Text:
    """Sequential text outside blocks (tags that lost their meaning in lenient mode included)."""
    text: str
    n_tokens: int | None = field(default=None, compare=False)

    def render(self) -> str:
        return self.text


@dataclass(frozen=True)
class Outline:
    number: int
    body: str  # text after "N:", e.g. " A"

    def render(self) -> str:
        return f"{OUTLINE_OPEN}{self.number}:{self.body}{OUTLINE_CLOSE}"


@dataclass(frozen=True)
class Thread:
    number: int
    body: str  # text after the header "<Thread>\nN:" up to "</Thread>", e.g. " A=1+2\n=3\n"
    n_tokens: int | None = field(default=None, compare=False)  # "<Thread>" .. "</Thread>" inclusive

    def render(self) -> str:
        return f"{THREAD_OPEN}\n{self.number}:{self.body}{THREAD_CLOSE}"


@dataclass(frozen=True)
class Block:
    """One fork-join block: outlines 1..K, then threads 1..K, joined."""
    outlines: tuple[Outline, ...]
    threads: tuple[Thread, ...]
    # Whitespace at structural positions when it differs from the canonical layout (lenient parses); "name k"
    # entries give single gaps of a repeated position (after outline k, between threads k and k+1), `encode_spacing`.
    spacing: tuple[tuple[str, str], ...] = ()
    n_tokens: int | None = field(default=None, compare=False)  # "<Parallel>" .. "</Parallel>"

    @classmethod
    def from_plan(cls, outlines: Sequence[str], threads: Sequence[str]) -> "Block":
        """Canonical block from outline texts and thread texts (numbers and spaces added).

        >>> Block.from_plan(["A"], ["A=1"]).threads[0].body
        ' A=1\\n'
        """
        return cls(tuple(Outline(i + 1, " " + o) for i, o in enumerate(outlines)),
                   tuple(Thread(i + 1, " " + t.rstrip("\n") + "\n") for i, t in enumerate(threads)))

    def gap(self, name: str) -> str:
        return dict(self.spacing).get(name, _CANON[name])

    def gaps(self, name: str, count: int) -> list[str]:
        """Whitespace after each of ``count`` repeated parts ("after_outline", "between_threads"): the block-wide
        value unless a ``"name k"`` entry overrides part k (lenient parses whose gaps differ, see `encode_spacing`).

        >>> Block.from_plan(["a", "b"], ["x", "y"]).gaps("after_outline", 2)
        ['\\n', '\\n']
        """
        spacing = dict(self.spacing)
        common = spacing.get(name, _CANON[name])
        return [spacing.get(f"{name} {k}", common) for k in range(1, count + 1)]

    @property
    def canonical(self) -> bool:
        return all(v == _CANON[k.split(" ")[0]] for k, v in self.spacing)

    def head(self) -> str:
        """``<Parallel>`` .. ``</Outlines>``: what the sequential call before the fork generates."""
        after = self.gaps("after_outline", len(self.outlines))
        outl = "".join(o.render() + g for o, g in zip(self.outlines, after))
        return (PARALLEL_OPEN + self.gap("after_parallel") + OUTLINES_OPEN
                + self.gap("after_outlines_open") + outl + OUTLINES_CLOSE)

    def render(self) -> str:
        between = self.gaps("between_threads", len(self.threads) - 1) + [""]
        threads = "".join(t.render() + g for t, g in zip(self.threads, between))
        return (self.head() + self.gap("after_outlines_close") + threads
                + self.gap("after_threads") + PARALLEL_CLOSE)


def encode_spacing(gaps: dict[str, str | list[str]]) -> tuple[tuple[str, str], ...]:
    """`Block.spacing` from the whitespace found at each structural position (a list for repeated ones).

    Only non-canonical values are kept, in `_CANON` order. A repeated position stores its last non-canonical value
    once, plus a ``"name k"`` entry for each part k whose gap differs from it, so that lenient parse + render gives
    back the input exactly (docs/design.md §4).

    >>> encode_spacing({**_CANON, "after_outline": ["", "\\n", ""], "between_threads": []})
    (('after_outline', ''), ('after_outline 2', '\\n'))
    """
    out: list[tuple[str, str]] = []
    for name, canon in _CANON.items():
        found = gaps[name]
        if isinstance(found, str):
            out.extend([(name, found)] if found != canon else [])
            continue
        common = next((g for g in reversed(found) if g != canon), canon)
        if common != canon:
            out.append((name, common))
        out.extend((f"{name} {k}", g) for k, g in enumerate(found, 1) if g != common)
    return tuple(out)


def merge_texts(items: list[Text | Block]) -> list[Text | Block]:
    """Adjacent texts as one, joined once (adding them pairwise copies the text over and over).

    >>> merge_texts([Text("a", 1), Text("b", 2), Block.from_plan(["x"], ["y"]), Text("c")])[0]
    Text(text='ab', n_tokens=3)
    """
    out: list[Text | Block] = []
    for is_text, group in groupby(items, key=lambda it: isinstance(it, Text)):
        if not is_text:
            out.extend(group)
            continue
        texts = list(group)
        counts = [t.n_tokens for t in texts]
        out.append(Text("".join(t.text for t in texts), None if None in counts else sum(counts)))
    return out


@dataclass(frozen=True)
class Trajectory:
    """A parsed response. ``issues`` lists what lenient parsing tolerated (empty when strict)."""
    items: tuple[Text | Block, ...]
    eos: bool = False  # a trailing EOS id was present (parse_ids); it counts as one response token
    issues: tuple[str, ...] = field(default=(), compare=False)

    def render(self) -> str:
        return "".join(i.render() for i in self.items)

    @property
    def blocks(self) -> list[Block]:
        return [i for i in self.items if isinstance(i, Block)]

    @property
    def answer(self) -> str | None:
        """Content of the last ``\\boxed{}`` after ``</think>`` (braces matched), else None."""
        return extract_boxed(self.render())


def extract_boxed(text: str) -> str | None:
    """Last brace-matched ``\\boxed{...}`` after the last ``</think>``.

    Braces are matched once, left to right with a stack, so a tail of many unclosed boxes costs linear time
    (scanning forward from each box in turn would be quadratic).

    >>> extract_boxed("<think>\\n\\\\boxed{1}</think>\\n\\n\\\\boxed{12}")
    '12'
    """
    cut = text.rfind(THINK_CLOSE)
    if cut < 0:
        return None
    tail = text[cut + len(THINK_CLOSE):]
    first = tail.find(BOXED)
    if first < 0:
        return None
    closing, opened = {}, []
    for m in _BRACE_RE.finditer(tail, first):
        if m.group() == "{":
            opened.append(m.start())
        elif opened:
            closing[opened.pop()] = m.start()
    start = tail.rfind(BOXED)
    while start >= 0:
        brace = start + len(BOXED) - 1
        if brace in closing:
            return tail[brace + 1: closing[brace]]
        start = tail.rfind(BOXED, 0, start)
    return None


@dataclass(frozen=True)
class TrajectoryStats:
    """Response-token statistics (docs/design.md §7; the prompt is never counted).

    ``critical_path_tokens`` = tokens outside blocks + Σ_blocks (block tokens outside threads +
    longest thread). A thread's own ``<Thread>``..``</Thread>`` tokens count in that thread: they are
    decoded (or prefilled) concurrently with it.
    """
    total_tokens: int
    critical_path_tokens: int
    sequential_tokens: int
    parallel_tokens: int
    num_blocks: int
    threads_per_block: tuple[int, ...]

    @property
    def acceleration_ratio(self) -> float:
        return 1.0 - self.critical_path_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def parallel_ratio(self) -> float:
        return self.parallel_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def activated(self) -> bool:
        return self.num_blocks > 0

    def as_dict(self) -> dict:
        return {"total_tokens": self.total_tokens, "critical_path_tokens": self.critical_path_tokens,
                "sequential_tokens": self.sequential_tokens, "parallel_tokens": self.parallel_tokens,
                "num_blocks": self.num_blocks, "threads_per_block": list(self.threads_per_block),
                "acceleration_ratio": self.acceleration_ratio, "parallel_ratio": self.parallel_ratio,
                "activated": self.activated}


def statistics(traj: Trajectory) -> TrajectoryStats:
    """Statistics from the token counts stored at parse time (`parse_ids`, or `parse(count=...)`).

    >>> from twlib.format import parse
    >>> s = statistics(parse("<think>\\n</think>\\n\\n\\\\boxed{1}", count=len))
    >>> s.total_tokens, s.critical_path_tokens  # tags count 1, other text 1 per character here
    (14, 14)
    """
    total = critical = parallel = 0
    threads_per_block = []
    for item in traj.items:
        if item.n_tokens is None or (isinstance(item, Block) and any(t.n_tokens is None for t in item.threads)):
            raise FormatError("token counts are unknown: parse with parse_ids(...) or parse(..., count=...)")
        total += item.n_tokens
        if isinstance(item, Text):
            critical += item.n_tokens
        else:
            lengths = [t.n_tokens for t in item.threads]
            critical += item.n_tokens - sum(lengths) + max(lengths)
            parallel += item.n_tokens
            threads_per_block.append(len(item.threads))
    total += traj.eos
    critical += traj.eos
    return TrajectoryStats(total, critical, total - parallel, parallel, len(threads_per_block),
                           tuple(threads_per_block))
