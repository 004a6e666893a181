"""Parsing response text or token ids into a `twlib.format.tree.Trajectory` (docs/design.md §4).

Strict mode raises `FormatError` naming what is wrong and where (character and token offset); lenient
mode never raises and lists what it tolerated in ``Trajectory.issues``. Both take time linear in the
input: strict parsing is one forward walk; lenient parsing first finds, in one backward sweep, where
blocks close (`_Probe`), then walks each block once (`_Walker`) without ever undoing a walk.

>>> parse("<think>\\nx\\n</think>\\n\\n\\\\boxed{1}").answer
'1'
"""
from __future__ import annotations

import re
from collections import Counter
from functools import cached_property
from typing import Callable, Sequence

from .tags import (  # Piece, *_pieces, tag_id_map: for `twlib.format`
    OUTLINE_CLOSE,
    OUTLINE_OPEN,
    OUTLINES_CLOSE,
    OUTLINES_OPEN,
    PARALLEL_CLOSE,
    PARALLEL_OPEN,
    STRUCTURE_TAGS,
    SURROGATE_RE,
    THINK_CLOSE,
    THINK_OPEN,
    THREAD_CLOSE,
    THREAD_OPEN,
    FormatError,
    Piece,
    id_pieces,
    tag_id_map,
    text_pieces,
)
from .tree import _CANON, Block, Outline, Text, Thread, Trajectory, encode_spacing, extract_boxed, merge_texts

# Outline/thread numbers are ASCII digits; a leading zero ("01") is refused in `_numbered` so that a number
# renders back exactly as it was read (``\d`` would also take "١", read as 1 and rendered "1").
_NUMBER_RE = re.compile(r"([0-9]+):")
# Lenient mode reads complete blocks nested in outlines and threads as text, at any depth; it lists the issues
# inside them down to this depth (walking deeper would only grow the call stack).
_NESTED_ISSUE_DEPTH = 8
# Tags that end an outline or thread as an error even in lenient mode.
_FATAL_INSIDE = (PARALLEL_CLOSE, OUTLINES_CLOSE)
_ITEM_TAGS = {"outline": (OUTLINE_OPEN, OUTLINE_CLOSE, ""), "thread": (THREAD_OPEN, THREAD_CLOSE, "\n")}
_NO_ITEMS = {"outline": "a <Parallel> block has no <Outline>",
             "thread": "a <Parallel> block has no <Thread> after </Outlines>"}
# The steps of `_Walker.block`, in order, as `_Probe` takes them; each returns (next piece, failure or None).
_BLOCK_STEPS = (("_gap", "after_parallel"), ("_expect", OUTLINES_OPEN, "after <Parallel>"),
                ("_gap", "after_outlines_open"), ("_items", "outline"), ("_expect", OUTLINES_CLOSE, "after the outlines"),
                ("_gap", "after_outlines_close"), ("_items", "thread"), ("_gap", "after_threads"),
                ("_expect", PARALLEL_CLOSE, "after the last thread"))
# Pieces walked (per piece of input) to list the issues inside blocks that are then read as text. Each failing
# block is re-read from its next <Parallel>, so listing every failed walk is quadratic on degenerate inputs.
_FAILED_WALK_BUDGET = 4


# ------------------------------------------------------------------- steps shared by both passes
def _error(p: list[Piece], problem: str, at: int) -> FormatError:
    """The error for ``problem`` at piece ``at`` (its character and token offset), or at the end of input."""
    if at < len(p):
        return FormatError(problem, p[at].char, p[at].token)
    if not p:
        return FormatError(problem, 0, None)
    last = p[-1]
    tok = None if last.token is None or last.n_tokens is None else last.token + last.n_tokens
    return FormatError(problem + " (at end of input)", last.char + len(last.value), tok)


def _expect_problem(p: list[Piece], i: int, tag: str, context: str) -> str | None:
    piece = p[i] if i < len(p) else None
    if piece is None or not piece.is_tag or piece.value != tag:
        got = "end of input" if piece is None else (piece.value if piece.is_tag else f"text {piece.value[:20]!r}")
        return f"expected {tag} {context}, found {got}"
    return None


def _gap_at(p: list[Piece], i: int, name: str) -> tuple[str, str | None]:
    """Whitespace at structural position ``name`` (piece i, "" if that is a tag) and the problem if it is text.

    >>> _gap_at(text_pieces("<Thread>x<Thread>"), 1, "between_threads")
    ('x', 'text between threads')
    """
    piece = p[i] if i < len(p) else None
    s = piece.value if piece is not None and not piece.is_tag else ""
    if not s or s.isspace():
        return s, None
    if name == "after_threads":
        nxt = p[i + 1] if i + 1 < len(p) else None
        if not (nxt is not None and nxt.is_tag and nxt.value == PARALLEL_CLOSE):
            return s, f"expected {PARALLEL_CLOSE} after the last thread, found text {s[:20]!r}"
        return s, "text between the last </Thread> and </Parallel>"
    if name == "between_threads":
        return s, "text between threads"
    return s, f"unexpected text {s[:20]!r} inside a <Parallel> block ({name})"


def _text_between_threads(p: list[Piece], i: int) -> bool:
    """Piece i is text and a ``<Thread>`` follows: the gap between two threads."""
    return i + 1 < len(p) and not p[i].is_tag and p[i + 1].value == THREAD_OPEN


def _unclosed(p: list[Piece], at: int, close: str, what: str) -> str:
    """Why the outline or thread ``what`` did not reach ``close``: input ended, or a fatal tag at piece ``at``."""
    return f"{what} is never closed with {close}" if at >= len(p) else f"nested {p[at].value} inside {what}"


def _numbered(body: str, lead: str) -> tuple[int | None, str]:
    """``(N, rest)`` for ``body == lead + "N:" + rest``; else ``(None, problem)`` (to follow "outline 2 ").

    N is ASCII digits without a leading zero (paper §3.1: outlines are numbered 1..K), so rendering gives back
    the text it came from; anything else is no number.

    >>> _numbered("12: a", ""), _numbered("01: a", ""), _numbered("\\u0661: a", "")[0]
    ((12, ' a'), (None, "does not start with its number 'N:'"), None)
    """
    if not body.startswith(lead):
        return None, f"must start with {lead!r} after its tag"
    m = _NUMBER_RE.match(body, len(lead))
    if not m or (m.group(1).startswith("0") and len(m.group(1)) > 1):
        return None, "does not start with its number 'N:'"
    if len(m.group(1)) > 9:
        return None, f"has an implausible number {m.group(1)[:12]}..."
    return int(m.group(1)), body[m.end():]


# ------------------------------------------------------------------------ pass 1: where blocks close
class _Probe:
    """Lenient pass 1: for every ``<Parallel>``, whether a block parses there and where it ends.

    Lenient mode reads a malformed block as text and retries at the next ``<Parallel>``; inside outlines and
    threads it reads complete nested blocks as text. Found by trial and rollback, this re-read each piece once per
    enclosing attempt (time ~ depth⁹ on unclosed nested blocks). But where an outline or thread body starting at
    piece i stops, where the run of outlines (threads) from i ends, and whether the block at i closes depend only
    on the pieces after i: one right-to-left sweep answers each from answers already known, O(1) per piece,
    without recursion or retries.

    >>> _Probe(text_pieces("<Parallel>\\n<Outlines>\\n<Outline>1: a</Outline>\\n</Outlines>\\n<Thread>\\n1: b"
    ...                    "\\n</Thread>\\n</Parallel>x")).blocks[0]
    (15, None)
    """

    def __init__(self, pieces: list[Piece]):
        self.p, self.n = pieces, len(pieces)
        # <Parallel> piece → (end, None) if pieces j..end-1 are a block, else (None, (problem, piece)) as the walker fails
        self.blocks: dict[int, tuple[int | None, tuple[str, int] | None]] = {}
        # per kind ("outline", "thread"): where a body from each piece stops; the run of items from each item
        self.stops = {kind: [self.n] * (self.n + 1) for kind in _ITEM_TAGS}
        self.runs: dict[str, dict[int, tuple]] = {kind: {} for kind in _ITEM_TAGS}
        for i in range(self.n - 1, -1, -1):
            piece = pieces[i]
            if piece.is_tag and piece.value == PARALLEL_OPEN:
                self.blocks[i] = self._block(i)
            for kind, (opening, close, _) in _ITEM_TAGS.items():
                self.stops[kind][i] = self._stop(i, piece, close, kind)
                if piece.is_tag and piece.value == opening:
                    self.runs[kind][i] = self._item_run(i, kind)

    def _block(self, j: int):
        i = j + 1
        for step, *args in _BLOCK_STEPS:
            i, fail = getattr(self, step)(i, *args)
            if fail:
                return None, fail
        return i, None

    def _gap(self, i: int, name: str):
        s, problem = _gap_at(self.p, i, name)
        return i + (1 if s else 0), (problem, i) if problem else None

    def _expect(self, i: int, tag: str, context: str):
        problem = _expect_problem(self.p, i, tag, context)
        return i + 1, (problem, i) if problem else None

    def _items(self, i: int, kind: str):
        """All outlines (threads) from piece i; a failure names the failing one by its place in the block."""
        end, ok, fail = self.runs[kind].get(i, (i, 0, None))  # no item at i: an empty run
        if fail:
            problem, at = fail
            return end, (problem(f"{kind} {ok + 1}") if callable(problem) else problem, at)
        return end, (_NO_ITEMS[kind], end) if ok == 0 else None

    def _stop(self, i: int, piece: Piece, close: str, kind: str) -> int:
        """Piece where a body from piece i stops: its closing tag or a fatal one; ``n`` if the input ends first.
        A complete nested block is stepped over (the walker reads it as text); other tags are text."""
        if piece.is_tag and (piece.value == close or piece.value in _FATAL_INSIDE):
            return i
        end = self.blocks[i][0] if i in self.blocks else None
        return self.stops[kind][i + 1 if end is None else end]

    def _item_run(self, i: int, kind: str) -> tuple[int, int, tuple | None]:
        """``(end, items read, failure)`` for the outlines (threads) from the one opened at piece i on."""
        nxt, fail = self._item(i, kind)
        if nxt is None:  # a failing item
            return i, 0, fail
        end, ok, fail = self.runs[kind].get(nxt, (nxt, 0, None))
        return end, ok + 1, fail

    def _item(self, i: int, kind: str):
        """The outline (thread) opened at piece i: ``(next piece, None)`` or ``(None, failure)``."""
        p, (_, close, lead) = self.p, _ITEM_TAGS[kind]
        s = self.stops[kind][i + 1]
        if s >= self.n or p[s].value != close:
            return None, (lambda what: _unclosed(p, s, close, what), s)
        # The number is in the first piece: any later piece of the body starts with a tag's "<".
        num, rest = _numbered(p[i + 1].value if s > i + 1 else "", lead)
        if num is None:
            return None, (lambda what: f"{what} {rest}", i)
        if kind == "outline":
            nxt, fail = self._gap(s + 1, "after_outline")
        elif s == i + 2 and (not rest or rest.isspace()):
            return None, (f"thread {num} is empty", i)
        elif _text_between_threads(p, s + 1):
            nxt, fail = self._gap(s + 1, "between_threads")
        else:
            nxt, fail = s + 1, None
        return (None, fail) if fail else (nxt, None)


# ------------------------------------------------------------------ pass 2: build blocks, list issues
class _Walker:
    """Walks the pieces once, building text and blocks; strict raises at the first problem, lenient lists issues.

    In lenient mode the `_Probe` says beforehand whether a block closes, so a walk is never undone: blocks that
    close are built; one that does not is read as text and the walk up to its failure only lists its issues
    (within a budget: a degenerate input re-reads failing blocks from each of their ``<Parallel>`` tags).

    >>> _Walker(text_pieces("<Parallel>\\n<Outlines>\\n<Outline>1: a</Outline>\\n</Outlines>\\n<Thread>\\n1: b\\n"
    ...                     "</Thread>\\n</Parallel>"), strict=True).block().threads
    (Thread(number=1, body=' b\\n', n_tokens=None),)
    """

    def __init__(self, pieces: list[Piece], strict: bool):
        self.p, self.strict, self.i, self.issues, self.depth = pieces, strict, 0, [], 0
        self.budget = _FAILED_WALK_BUDGET * len(pieces) + 64

    @cached_property
    def probe(self) -> _Probe:
        """Built on first use: lenient mode only, and only when a ``<Parallel>`` is met."""
        return _Probe(self.p)

    def fail(self, problem: str, at: int | None = None):
        raise _error(self.p, problem, self.i if at is None else at)

    def peek(self) -> Piece | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self) -> tuple[list[Text | Block], list[str]]:
        items: list[Text | Block] = []
        while self.i < len(self.p):
            piece = self.p[self.i]
            if piece.is_tag and piece.value == PARALLEL_OPEN:
                if (block := self.top_block()) is not None:
                    items.append(block)
                    continue
            elif piece.is_tag and piece.value in STRUCTURE_TAGS:
                if self.strict:
                    self.fail(f"unexpected {piece.value} outside a <Parallel> block")
                self.issues.append(f"stray {piece.value} read as text")
            items.append(Text(piece.value, piece.n_tokens))
            self.i += 1
        return merge_texts(items), self.issues

    def top_block(self) -> Block | None:
        """The block at a top-level ``<Parallel>``; lenient: None if it does not close (the caller reads it as text)."""
        if self.strict:
            return self.block()
        start, self.depth = self.i, 0
        end, failure = self.probe.blocks[start]
        if end is not None:
            return self.block()
        error = _error(self.p, *failure)
        cost = failure[1] - start + 1
        if cost <= self.budget:
            self.budget -= cost
            try:
                self.block()  # for the issues it meets before failing, listed ahead of the failure
            except FormatError as e:
                error = e
        elif self.budget >= 0:
            self.budget = -1
            self.issues.append("issues inside further blocks read as text are not listed (degenerate input)")
        self.issues.append(f"block read as text: {error}")
        self.i = start
        return None

    def expect_tag(self, tag: str, context: str):
        if problem := _expect_problem(self.p, self.i, tag, context):
            self.fail(problem)
        self.i += 1

    def gap(self, name: str) -> str:
        """Optional whitespace at a structural position; strict mode wants the canonical one."""
        s, problem = _gap_at(self.p, self.i, name)
        if problem:
            self.fail(problem)
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
                self.fail(_unclosed(self.p, self.i, close, what))
            if piece.is_tag and piece.value == close:
                return "".join(out)
            if piece.is_tag:
                if self.strict or piece.value in _FATAL_INSIDE:
                    self.fail(_unclosed(self.p, self.i, close, what))
                if piece.value == PARALLEL_OPEN and self.nested(what, out, n_tokens):
                    continue
                self.issues.append(f"nested {piece.value} inside {what} read as text")
            out.append(piece.value)
            n_tokens.append(piece.n_tokens)
            self.i += 1

    def nested(self, what: str, out: list[str], n_tokens: list[int | None]) -> bool:
        """Lenient: a complete block here (the probe knows) is read as text, after its own issues."""
        start = self.i
        end = self.probe.blocks[start][0]
        if end is None:
            return False
        if self.depth < _NESTED_ISSUE_DEPTH:
            self.depth += 1
            self.block()
            self.depth -= 1
        self.i = end
        out.extend(q.value for q in self.p[start:end])
        n_tokens.extend(q.n_tokens for q in self.p[start:end])
        self.issues.append(f"nested <Parallel> block inside {what} read as text")
        return True

    def numbered(self, body: str, what: str, at: int, lead: str = "") -> tuple[int, str]:
        num, rest = _numbered(body, lead)
        if num is None:
            self.fail(f"{what} {rest}", at)
        return num, rest

    def block(self) -> Block:
        """The fork-join block (paper §3.1; docs/design.md §4) whose ``<Parallel>`` is at piece ``self.i``."""
        start = self.i
        self.i += 1
        gaps: dict[str, str | list[str]] = {"after_parallel": self.gap("after_parallel")}
        self.expect_tag(OUTLINES_OPEN, "after <Parallel>")
        gaps["after_outlines_open"] = self.gap("after_outlines_open")
        outlines, gaps["after_outline"] = self.outlines()
        self.expect_tag(OUTLINES_CLOSE, "after the outlines")
        gaps["after_outlines_close"] = self.gap("after_outlines_close")
        threads, gaps["between_threads"] = self.threads()
        gaps["after_threads"] = self.gap("after_threads")
        self.expect_tag(PARALLEL_CLOSE, "after the last thread")
        self._check_numbers(outlines, threads, start)
        n_tok = [q.n_tokens for q in self.p[start:self.i]]
        return Block(tuple(outlines), tuple(threads), encode_spacing(gaps), None if None in n_tok else sum(n_tok))

    def outlines(self) -> tuple[list[Outline], list[str]]:
        """``<Outline>N: ...</Outline>`` parts and the whitespace after each."""
        outlines, after = [], []
        while (piece := self.peek()) is not None and piece.is_tag and piece.value == OUTLINE_OPEN:
            at, what = self.i, f"outline {len(outlines) + 1}"
            self.i += 1
            body = self.inner(OUTLINE_CLOSE, what, [])
            self.i += 1
            outlines.append(Outline(*self.numbered(body, what, at)))
            after.append(self.gap("after_outline"))
        if not outlines:
            self.fail(_NO_ITEMS["outline"])
        return outlines, after

    def threads(self) -> tuple[list[Thread], list[str]]:
        """``<Thread>\\nN: ...</Thread>`` parts and the whitespace between consecutive ones."""
        threads, between = [], []
        while (piece := self.peek()) is not None and piece.is_tag and piece.value == THREAD_OPEN:
            at, what = self.i, f"thread {len(threads) + 1}"
            self.i += 1
            counts = [piece.n_tokens]
            body = self.inner(THREAD_CLOSE, what, counts)
            counts.append(self.p[self.i].n_tokens)
            self.i += 1
            num, rest = self.numbered(body, what, at, lead="\n")
            if not rest.strip():
                self.fail(f"thread {num} is empty", at)
            threads.append(Thread(num, rest, None if None in counts else sum(counts)))
            between.append(self.gap("between_threads") if _text_between_threads(self.p, self.i) else "")
        if not threads:
            self.fail(_NO_ITEMS["thread"])
        return threads, between[:-1]  # after the last thread there is no next one

    def _check_numbers(self, outlines: list[Outline], threads: list[Thread], at: int):
        numbers = [o.number for o in outlines]
        problems = []
        if numbers != list(range(1, len(numbers) + 1)):
            dup = sorted(n for n, c in Counter(numbers).items() if c > 1)
            problems.append(f"outline numbers {numbers} are not 1..{len(numbers)}"
                            + (f" (repeated: {dup})" if dup else ""))
        if len(threads) != len(outlines):
            problems.append(f"{len(outlines)} outlines but {len(threads)} threads")
        elif [t.number for t in threads] != numbers:
            problems.append(f"thread numbers {[t.number for t in threads]} do not match outline numbers {numbers}")
        if problems:
            if self.strict:
                self.fail("; ".join(problems), at)
            self.issues.extend(problems)


def _check_envelope(pieces: list[Piece], strict: bool, issues: list[str]):
    """``<think>`` first, one ``</think>`` after every block, then a ``\\boxed{}``."""
    n = len(pieces)
    opens, closes = ([k for k, q in enumerate(pieces) if q.is_tag and q.value == tag] for tag in (THINK_OPEN, THINK_CLOSE))
    problems: list[tuple[str, int]] = []  # (problem, piece index; n for the end of input)
    if not opens or opens[0] != 0:
        problems.append(("the response must start with <think>", 0))
    if len(opens) > 1:
        problems.append(("<think> appears more than once", opens[1]))
    if not closes:
        problems.append(("missing </think>", n))
    elif len(closes) > 1:
        problems.append(("</think> appears more than once", closes[1]))
    else:
        after = next((k for k in range(closes[0] + 1, n) if pieces[k].is_tag and pieces[k].value in STRUCTURE_TAGS), n)
        if after < n:
            problems.append((f"{pieces[after].value} after </think>", after))
        if extract_boxed(THINK_CLOSE + "".join(q.value for q in pieces[closes[0] + 1:])) is None:
            problems.append(("missing \\boxed{} after </think>", n))
    if strict and problems:
        raise _error(pieces, *problems[0])
    issues.extend(p for p, _ in problems)


def _parse_pieces(pieces: list[Piece], strict: bool, eos: bool = False) -> Trajectory:
    items, issues = _Walker(pieces, strict).parse()
    _check_envelope(pieces, strict, issues)
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
    bad = SURROGATE_RE.search(text)
    if bad and strict:
        raise FormatError(f"lone surrogate {bad.group()!r} in the response: not valid Unicode text", bad.start())
    traj = _parse_pieces(text_pieces(text, count), strict)
    if bad:
        problem = f"lone surrogate {bad.group()!r} at character {bad.start()} read as text; it has no token count"
        traj = Trajectory(traj.items, traj.eos, (problem,) + traj.issues)
    return traj


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
    size = len(tokenizer)
    if (oov := next((k for k, i in enumerate(ids) if i >= size), None)) is not None:
        raise FormatError(f"token id {ids[oov]} is outside the tokenizer's {size} ids", token_offset=oov)
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
