"""Parsing response text or token ids into a `twlib.format.tree.Trajectory` (docs/design.md §4).

Strict mode raises `FormatError` naming what is wrong and where (character and token offset); lenient
mode never raises and lists what it tolerated in ``Trajectory.issues``.

>>> parse("<think>\\nx\\n</think>\\n\\n\\\\boxed{1}").answer
'1'
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from .tags import (
    OUTLINE_CLOSE,
    OUTLINE_OPEN,
    OUTLINES_CLOSE,
    OUTLINES_OPEN,
    PARALLEL_CLOSE,
    PARALLEL_OPEN,
    STRUCTURE_TAGS,
    TAG_RE,
    TAGS,
    THINK_CLOSE,
    THINK_OPEN,
    THREAD_CLOSE,
    THREAD_OPEN,
    FormatError,
)
from .tree import _CANON, Block, Outline, Text, Thread, Trajectory, extract_boxed

_NUMBER_RE = re.compile(r"(\d+):")


@dataclass(frozen=True)
class Piece:
    """A tag or a run of text, with its offsets and token count (None if unknown)."""
    value: str
    is_tag: bool
    char: int
    token: int | None
    n_tokens: int | None


def text_pieces(text: str, count: Callable[[str], int] | None = None) -> list[Piece]:
    """Split text at tags. ``count`` gives the token count of a text run (tags count 1)."""
    pieces, pos, tok = [], 0, 0 if count else None
    for m in TAG_RE.finditer(text):
        if m.start() > pos:
            n = count(text[pos:m.start()]) if count else None
            pieces.append(Piece(text[pos:m.start()], False, pos, tok, n))
            tok = tok + n if count else None
        pieces.append(Piece(m.group(), True, m.start(), tok, 1 if count else None))
        tok = tok + 1 if count else None
        pos = m.end()
    if pos < len(text):
        pieces.append(Piece(text[pos:], False, pos, tok, count(text[pos:]) if count else None))
    return pieces


def id_pieces(ids: Sequence[int], tag_ids: dict[int, str], decode: Callable[[list[int]], str]) -> list[Piece]:
    """Split token ids at tag ids; text runs are decoded. Character offsets refer to the decoded text."""
    pieces, run, run_start, char = [], [], 0, 0

    def flush(end: int):
        nonlocal char, run
        if run:
            s = decode(run)
            pieces.append(Piece(s, False, char, run_start, len(run)))
            char += len(s)
            run = []

    for i, t in enumerate(ids):
        if t in tag_ids:
            flush(i)
            pieces.append(Piece(tag_ids[t], True, char, i, 1))
            char += len(tag_ids[t])
        else:
            if not run:
                run_start = i
            run.append(t)
    flush(len(ids))
    return pieces


# --------------------------------------------------------------------------------------- parser
class _Parser:
    def __init__(self, pieces: list[Piece], strict: bool):
        self.p, self.strict, self.i, self.issues, self.depth = pieces, strict, 0, [], 0

    def fail(self, problem: str, piece: Piece | None = None):
        piece = piece or (self.p[self.i] if self.i < len(self.p) else None)
        if piece is None and self.p:
            last = self.p[-1]
            char = last.char + len(last.value)
            tok = None if last.token is None or last.n_tokens is None else last.token + last.n_tokens
            raise FormatError(problem + " (at end of input)", char, tok)
        raise FormatError(problem, piece.char if piece else 0, piece.token if piece else None)

    def peek(self) -> Piece | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self) -> tuple[list[Text | Block], list[str]]:
        items: list[Text | Block] = []
        while self.i < len(self.p):
            piece = self.p[self.i]
            if piece.is_tag and piece.value == PARALLEL_OPEN:
                start = self.i
                try:
                    items.append(self.block())
                    continue
                except FormatError as e:
                    if self.strict:
                        raise
                    self.issues.append(f"block read as text: {e}")
                    self.i = start
            elif piece.is_tag and piece.value in STRUCTURE_TAGS:
                if self.strict:
                    self.fail(f"unexpected {piece.value} outside a <Parallel> block")
                self.issues.append(f"stray {piece.value} read as text")
            items.append(Text(piece.value, piece.n_tokens))
            self.i += 1
        return _merge_text(items), self.issues

    def expect_tag(self, tag: str, context: str) -> Piece:
        piece = self.peek()
        if piece is None or not piece.is_tag or piece.value != tag:
            got = "end of input" if piece is None else (piece.value if piece.is_tag else f"text {piece.value[:20]!r}")
            self.fail(f"expected {tag} {context}, found {got}")
        self.i += 1
        return piece

    def gap(self, name: str) -> str:
        """Optional whitespace at a structural position; strict mode wants the canonical one."""
        piece = self.peek()
        s = piece.value if piece is not None and not piece.is_tag else ""
        if s.strip():
            nxt = self.p[self.i + 1] if self.i + 1 < len(self.p) else None
            if name == "after_threads" and not (nxt is not None and nxt.is_tag and nxt.value == PARALLEL_CLOSE):
                self.fail(f"expected {PARALLEL_CLOSE} after the last thread, found text {s[:20]!r}")
            where = {"between_threads": "text between threads",
                     "after_threads": "text between the last </Thread> and </Parallel>"}.get(name)
            self.fail(where or f"unexpected text {s[:20]!r} inside a <Parallel> block ({name})")
        if s != _CANON[name]:
            problem = f"non-canonical whitespace {s!r} {name.replace('_', ' ')} (expected {_CANON[name]!r})"
            if self.strict:
                self.fail(problem)
            self.issues.append(problem)
        if s:
            self.i += 1
        return s

    def inner(self, close: str, what: str, n_tokens: list[int | None]) -> str:
        """Text up to the closing tag; other tags inside are an error (strict) or text (lenient)."""
        out = []
        while True:
            piece = self.peek()
            if piece is None:
                self.fail(f"{what} is never closed with {close}")
            if piece.is_tag and piece.value == close:
                return "".join(out)
            if piece.is_tag:
                if self.strict or piece.value in (PARALLEL_CLOSE, OUTLINES_CLOSE):
                    self.fail(f"nested {piece.value} inside {what}")
                if piece.value == PARALLEL_OPEN and (span := self._nested_block()):
                    self.issues.append(f"nested <Parallel> block inside {what} read as text")
                    out.extend(q.value for q in span)
                    n_tokens.extend(q.n_tokens for q in span)
                    continue
                self.issues.append(f"nested {piece.value} inside {what} read as text")
            out.append(piece.value)
            n_tokens.append(piece.n_tokens)
            self.i += 1

    def _nested_block(self) -> list[Piece] | None:
        """Lenient only: the pieces of a complete block starting here (consumed), else None."""
        start, n_issues = self.i, len(self.issues)
        if self.depth >= 8:
            return None
        self.depth += 1
        try:
            self.block()
        except FormatError:
            self.i, self.issues[n_issues:] = start, []
            return None
        finally:
            self.depth -= 1
        return self.p[start:self.i]

    def numbered(self, body: str, what: str, piece: Piece, lead: str = "") -> tuple[int, str]:
        if not body.startswith(lead):
            self.fail(f"{what} must start with {lead!r} after its tag", piece)
        m = _NUMBER_RE.match(body, len(lead))
        if not m:
            self.fail(f"{what} does not start with its number 'N:'", piece)
        if len(m.group(1)) > 9:
            self.fail(f"{what} has an implausible number {m.group(1)[:12]}...", piece)
        return int(m.group(1)), body[m.end():]

    def block(self) -> Block:
        open_piece = self.p[self.i]
        start_i = self.i
        self.i += 1
        spacing = {"after_parallel": self.gap("after_parallel")}
        self.expect_tag(OUTLINES_OPEN, "after <Parallel>")
        spacing["after_outlines_open"] = self.gap("after_outlines_open")
        outlines = []
        while (piece := self.peek()) is not None and piece.is_tag and piece.value == OUTLINE_OPEN:
            self.i += 1
            body = self.inner(OUTLINE_CLOSE, f"outline {len(outlines) + 1}", [])
            self.i += 1
            num, rest = self.numbered(body, f"outline {len(outlines) + 1}", piece)
            outlines.append(Outline(num, rest))
            g = self.gap("after_outline")
            if g != "\n":
                spacing["after_outline"] = g
        if not outlines:
            self.fail("a <Parallel> block has no <Outline>")
        self.expect_tag(OUTLINES_CLOSE, "after the outlines")
        spacing["after_outlines_close"] = self.gap("after_outlines_close")
        threads = []
        while (piece := self.peek()) is not None and piece.is_tag and piece.value == THREAD_OPEN:
            self.i += 1
            counts = [piece.n_tokens]
            body = self.inner(THREAD_CLOSE, f"thread {len(threads) + 1}", counts)
            counts.append(self.p[self.i].n_tokens)
            self.i += 1
            num, rest = self.numbered(body, f"thread {len(threads) + 1}", piece, lead="\n")
            if not rest.strip():
                self.fail(f"thread {num} is empty", piece)
            threads.append(Thread(num, rest, None if None in counts else sum(counts)))
            nxt, after = self.peek(), self.p[self.i + 1] if self.i + 1 < len(self.p) else None
            if nxt is not None and not nxt.is_tag and after is not None and after.value == THREAD_OPEN:
                g = self.gap("between_threads")
                if g:
                    spacing["between_threads"] = g
        if not threads:
            self.fail("a <Parallel> block has no <Thread> after </Outlines>")
        spacing["after_threads"] = self.gap("after_threads")
        self.expect_tag(PARALLEL_CLOSE, "after the last thread")
        self._check_numbers(outlines, threads, open_piece)
        n_tok = [q.n_tokens for q in self.p[start_i:self.i]]
        block_tokens = sum(n_tok) if all(n is not None for n in n_tok) else None
        spacing = tuple((k, v) for k, v in spacing.items() if v != _CANON[k])
        return Block(tuple(outlines), tuple(threads), spacing, block_tokens)

    def _check_numbers(self, outlines, threads, piece):
        numbers = [o.number for o in outlines]
        problems = []
        if numbers != list(range(1, len(numbers) + 1)):
            dup = sorted({n for n in numbers if numbers.count(n) > 1})
            problems.append(f"outline numbers {numbers} are not 1..{len(numbers)}"
                            + (f" (repeated: {dup})" if dup else ""))
        if len(threads) != len(outlines):
            problems.append(f"{len(outlines)} outlines but {len(threads)} threads")
        elif [t.number for t in threads] != numbers:
            problems.append(f"thread numbers {[t.number for t in threads]} do not match outline numbers {numbers}")
        if problems:
            if self.strict:
                self.fail("; ".join(problems), piece)
            self.issues.extend(problems)


def _merge_text(items: list[Text | Block]) -> list[Text | Block]:
    out: list[Text | Block] = []
    for it in items:
        if isinstance(it, Text) and out and isinstance(out[-1], Text):
            a, b = out[-1].n_tokens, it.n_tokens
            out[-1] = Text(out[-1].text + it.text, None if a is None or b is None else a + b)
        else:
            out.append(it)
    return out


def _check_envelope(items: list[Text | Block], pieces: list[Piece], strict: bool, issues: list[str]):
    """``<think>`` first, one ``</think>`` after every block, then a ``\\boxed{}``."""
    tags = [p for p in pieces if p.is_tag]
    opens = [p for p in tags if p.value == THINK_OPEN]
    closes = [p for p in tags if p.value == THINK_CLOSE]
    problems: list[tuple[str, Piece | None]] = []
    if not pieces or not (pieces[0].is_tag and pieces[0].value == THINK_OPEN):
        problems.append(("the response must start with <think>", pieces[0] if pieces else None))
    if len(opens) > 1:
        problems.append(("<think> appears more than once", opens[1]))
    if not closes:
        problems.append(("missing </think>", None))
    elif len(closes) > 1:
        problems.append(("</think> appears more than once", closes[1]))
    else:
        after = [p for p in tags if p.char > closes[0].char and p.value in STRUCTURE_TAGS]
        if after:
            problems.append((f"{after[0].value} after </think>", after[0]))
        tail = "".join(p.value for p in pieces if p.char > closes[0].char)
        if extract_boxed(THINK_CLOSE + tail) is None:
            problems.append(("missing \\boxed{} after </think>", None))
    if strict and problems:
        problem, piece = problems[0]
        if piece is None and pieces:
            last = pieces[-1]
            tok = None if last.token is None else last.token + (last.n_tokens or 0)
            raise FormatError(problem + " (at end of input)", last.char + len(last.value), tok)
        raise FormatError(problem, piece.char if piece else 0, piece.token if piece else None)
    issues.extend(p for p, _ in problems)


def _parse_pieces(pieces: list[Piece], strict: bool, eos: bool = False) -> Trajectory:
    parser = _Parser(pieces, strict)
    items, issues = parser.parse()
    _check_envelope(items, pieces, strict, issues)
    return Trajectory(tuple(items), eos, tuple(issues))


def parse(text: str, strict: bool = True, count: Callable[[str], int] | None = None) -> Trajectory:
    """Parse a response text. Strict raises `FormatError`; lenient never raises and lists issues.

    ``count(text) -> int`` (e.g. ``lambda s: len(tok.encode(s))``) fills token counts segment-wise.

    >>> t = parse("<think>\\nx\\n</think>\\n\\n\\\\boxed{1}")
    >>> t.answer, len(t.blocks)
    ('1', 0)
    """
    if not isinstance(text, str):
        raise FormatError(f"expected a str response, got {type(text).__name__}")
    return _parse_pieces(text_pieces(text, count), strict)


def parse_ids(ids: Sequence[int], tokenizer, strict: bool = True, eos_id: int | None = None) -> Trajectory:
    """Parse response token ids (prompt excluded). A trailing EOS is noted, not parsed.

    Token counts are exact: ``statistics(parse_ids(ids, tok)).total_tokens == len(ids)``.
    """
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError) as e:
        raise FormatError(f"expected a sequence of token ids: {e}") from None
    if (neg := next((k for k, i in enumerate(ids) if i < 0), None)) is not None:
        raise FormatError(f"negative token id {ids[neg]}", token_offset=neg)
    # A padded embedding matrix lets a model emit ids the tokenizer cannot decode.
    if (oov := next((k for k, i in enumerate(ids) if i >= len(tokenizer)), None)) is not None:
        raise FormatError(f"token id {ids[oov]} is outside the tokenizer's {len(tokenizer)} ids", token_offset=oov)
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    eos = bool(ids) and ids[-1] == eos_id
    body = ids[:-1] if eos else ids
    if eos_id is not None and eos_id in body:
        where = body.index(eos_id)
        if strict:
            raise FormatError("EOS inside the response before its end",
                              len(tokenizer.decode(body[:where], skip_special_tokens=False)), where)
    pieces = id_pieces(body, tag_id_map(tokenizer), lambda run: tokenizer.decode(run, skip_special_tokens=False))
    traj = _parse_pieces(pieces, strict, eos)
    if eos_id is not None and eos_id in body:
        traj = Trajectory(traj.items, traj.eos, ("EOS inside the response read as text",) + traj.issues)
    return traj


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
