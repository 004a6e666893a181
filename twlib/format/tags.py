"""The tag strings of the trajectory format and its error type (docs/design.md §4): the one source of both;
and a response, as text or token ids, split at its tags into the pieces the parser reads (`Piece`).

>>> thread_header(2, first=False)
'<Thread>\\n2:'
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

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
# A lone surrogate (e.g. from a bad decode) is not Unicode text: no tokenizer can encode it.
SURROGATE_RE = re.compile(r"[\ud800-\udfff]")


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


@dataclass(frozen=True)
class Piece:
    """A tag or a run of text, with its offsets and token count (None if unknown)."""
    value: str
    is_tag: bool
    char: int
    token: int | None
    n_tokens: int | None


def text_pieces(text: str, count: Callable[[str], int] | None = None) -> list[Piece]:
    """Split text at tags. ``count`` gives the token count of a text run (tags count 1).

    A run with a lone surrogate is not valid Unicode and has no tokens: its count, and every token offset after
    it, is None.

    >>> [(q.value, q.n_tokens) for q in text_pieces("a<think>\\ud800", count=len)]
    [('a', 1), ('<think>', 1), ('\\ud800', None)]
    """
    pieces: list[Piece] = []
    tok = 0 if count else None

    def add(value: str, is_tag: bool, char: int):
        nonlocal tok
        n = None if not count or SURROGATE_RE.search(value) else 1 if is_tag else count(value)
        pieces.append(Piece(value, is_tag, char, tok, n))
        tok = None if tok is None or n is None else tok + n

    pos = 0
    for m in TAG_RE.finditer(text):
        if m.start() > pos:
            add(text[pos:m.start()], False, pos)
        add(m.group(), True, m.start())
        pos = m.end()
    if pos < len(text):
        add(text[pos:], False, pos)
    return pieces


def id_pieces(ids: Sequence[int], tag_ids: dict[int, str], decode: Callable[[list[int]], str]) -> list[Piece]:
    """Split token ids at tag ids; text runs are decoded. Character offsets refer to the decoded text."""
    pieces, run, run_start, char = [], [], 0, 0

    def flush():
        nonlocal char, run
        if run:
            s = decode(run)
            pieces.append(Piece(s, False, char, run_start, len(run)))
            char += len(s)
            run = []

    for i, t in enumerate(ids):
        if t in tag_ids:
            flush()
            pieces.append(Piece(tag_ids[t], True, char, i, 1))
            char += len(tag_ids[t])
        else:
            if not run:
                run_start = i
            run.append(t)
    flush()
    return pieces


def tag_id_map(tokenizer) -> dict[int, str]:
    """id → tag for every tag; raises `FormatError` if a tag is not exactly one token."""
    out = {}
    for tag in TAGS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if len(ids) != 1:
            raise FormatError(f"tag {tag} is not one token in this tokenizer (ids {ids}); add it with "
                              "twlib.tokenizer.add_tags")
        out[ids[0]] = tag
    return out
