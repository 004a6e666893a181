"""The fork-join trajectory format (paper §3.1): tags, parsing, validation, rendering, statistics.

A trajectory is the assistant response: ``<think>`` reasoning with any number of ``<Parallel>``
blocks, then ``</think>`` and the final answer in the last ``\\boxed{}``. Worked example::

    <think>
    <Parallel>
    <Outlines>
    <Outline>1: A</Outline>
    <Outline>2: B</Outline>
    </Outlines>
    <Thread>
    1: A=1+2
    =3
    </Thread><Thread>
    2: B=4
    </Thread>
    </Parallel>
    A+B
    =3+4
    =7
    </think>

    \\boxed{7}

This module is the one source of the tag strings. Everything here is pure Python; token ids come
from any tokenizer that encodes each tag as one id.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Sequence

PARALLEL_OPEN, PARALLEL_CLOSE = "<Parallel>", "</Parallel>"
OUTLINES_OPEN, OUTLINES_CLOSE = "<Outlines>", "</Outlines>"
OUTLINE_OPEN, OUTLINE_CLOSE = "<Outline>", "</Outline>"
THREAD_OPEN, THREAD_CLOSE = "<Thread>", "</Thread>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
STRUCTURE_TAGS = (PARALLEL_OPEN, PARALLEL_CLOSE, OUTLINES_OPEN, OUTLINES_CLOSE,
                  OUTLINE_OPEN, OUTLINE_CLOSE, THREAD_OPEN, THREAD_CLOSE)
TAGS = STRUCTURE_TAGS + (THINK_OPEN, THINK_CLOSE)
BOXED = "\\boxed{"
# The join the orchestrator appends after the last thread (DESIGN §6, phase 4).
JOIN = "\n"

_TAG_RE = re.compile("|".join(re.escape(t) for t in sorted(TAGS, key=len, reverse=True)))
_NUMBER_RE = re.compile(r"(\d+):")
# Canonical whitespace around block parts; index names are used by `Block.spacing`.
_CANON = {"after_parallel": "\n", "after_outlines_open": "\n", "after_outline": "\n",
          "after_outlines_close": "\n", "between_threads": "", "after_threads": "\n"}


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


# ----------------------------------------------------------------------------------------- tree
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
    # Whitespace at structural positions when it differs from the canonical layout (lenient parses).
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

    @property
    def canonical(self) -> bool:
        return all(v == _CANON[k] for k, v in self.spacing)

    def head(self) -> str:
        """``<Parallel>`` .. ``</Outlines>``: what the sequential call before the fork generates."""
        outl = "".join(o.render() + self.gap("after_outline") for o in self.outlines)
        return (PARALLEL_OPEN + self.gap("after_parallel") + OUTLINES_OPEN
                + self.gap("after_outlines_open") + outl + OUTLINES_CLOSE)

    def render(self) -> str:
        threads = self.gap("between_threads").join(t.render() for t in self.threads)
        return (self.head() + self.gap("after_outlines_close") + threads
                + self.gap("after_threads") + PARALLEL_CLOSE)


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

    >>> extract_boxed("<think>\\n\\\\boxed{1}</think>\\n\\n\\\\boxed{12}")
    '12'
    """
    cut = text.rfind(THINK_CLOSE)
    if cut < 0:
        return None
    tail = text[cut + len(THINK_CLOSE):]
    start = tail.rfind(BOXED)
    while start >= 0:
        depth, i = 1, start + len(BOXED)
        while i < len(tail) and depth:
            depth += {"{": 1, "}": -1}.get(tail[i], 0)
            i += 1
        if depth == 0:
            return tail[start + len(BOXED): i - 1]
        start = tail.rfind(BOXED, 0, start)
    return None


# --------------------------------------------------------------------------------------- pieces
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
    for m in _TAG_RE.finditer(text):
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
                spacing[f"after_outline"] = g
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


# ------------------------------------------------------------------------------------- segments
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
    """Cut a canonical trajectory into the orchestrator's pieces (DESIGN §4, §6).

    Sequential calls run up to and including ``</Outlines>``; each thread is header
    (orchestrator) + body ending in ``</Thread>`` (model); the join ``\\n`` is the orchestrator's;
    ``</Parallel>`` opens the next sequential call.

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


# ----------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class TrajectoryStats:
    """Response-token statistics (DESIGN §7; the prompt is never counted).

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
