"""The tag strings of the trajectory format and its error type (docs/design.md §4): the one source of both.

>>> thread_header(2, first=False)
'<Thread>\\n2:'
"""
from __future__ import annotations

import re

PARALLEL_OPEN, PARALLEL_CLOSE = "<Parallel>", "</Parallel>"
OUTLINES_OPEN, OUTLINES_CLOSE = "<Outlines>", "</Outlines>"
OUTLINE_OPEN, OUTLINE_CLOSE = "<Outline>", "</Outline>"
THREAD_OPEN, THREAD_CLOSE = "<Thread>", "</Thread>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
STRUCTURE_TAGS = (PARALLEL_OPEN, PARALLEL_CLOSE, OUTLINES_OPEN, OUTLINES_CLOSE,
                  OUTLINE_OPEN, OUTLINE_CLOSE, THREAD_OPEN, THREAD_CLOSE)
TAGS = STRUCTURE_TAGS + (THINK_OPEN, THINK_CLOSE)
BOXED = "\\boxed{"
# The join the orchestrator appends after the last thread (docs/design.md §6, phase 4).
JOIN = "\n"
# Any tag, longest first.
TAG_RE = re.compile("|".join(re.escape(t) for t in sorted(TAGS, key=len, reverse=True)))


def thread_header(number: int, first: bool) -> str:
    """Text the orchestrator writes before thread ``number`` (the model writes the rest).

    >>> thread_header(1, first=True), thread_header(2, first=False)
    ('\\n<Thread>\\n1:', '<Thread>\\n2:')
    """
    return ("\n" if first else "") + f"{THREAD_OPEN}\n{number}:"


class FormatError(ValueError):
    """A malformed trajectory; names the problem and where (character and/or token offset)."""

    def __init__(self, problem: str, char_offset: int | None = None, token_offset: int | None = None):
        self.problem, self.char_offset, self.token_offset = problem, char_offset, token_offset
        where = []
        if char_offset is not None:
            where.append(f"character {char_offset}")
        if token_offset is not None:
            where.append(f"token {token_offset}")
        super().__init__(problem + (f" (at {', '.join(where)})" if where else ""))
