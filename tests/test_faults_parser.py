"""Faults: the trajectory parser under hostile input (docs/design.md §4).

Fuzz: valid canonical trajectories (Hypothesis) each mutated several ways (tags deleted, duplicated, swapped,
inserted; blocks nested or left unclosed; whitespace; unicode incl. lone surrogates and non-ASCII digits; long
repeats). Strict raises only `FormatError`; lenient never raises and renders back its input; every parse stays
within a time bound. Then: parse time grows linearly with the nesting of unclosed blocks, and regressions.
"""
from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twlib import format as fmt
from twlib.format import Block, FormatError, Text, Trajectory, parse, parse_ids, statistics
from twlib.format import parser as parser_module
from twlib.tokenizer import build_char_tokenizer, token_counter

pytestmark = pytest.mark.faults

TOK = build_char_tokenizer()
COUNT = token_counter(TOK)
TAG_IDS = sorted(fmt.tag_id_map(TOK))
TIME_BOUND_S = 0.5
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----------------------------------------------------------------------------------- trajectories
# Word-sized pieces (not characters) keep Hypothesis examples cheap enough for thousands of them.
WORDS = ["", "a", "x+1=2\n", " 19", ":", "{", "}", "\n", "0:", "1: b", "\\boxed{3}", "  "]
_word = st.sampled_from(WORDS)
_block = st.integers(1, 4).flatmap(lambda k: st.tuples(st.lists(_word, min_size=k, max_size=k),
                                                       st.lists(_word.filter(str.strip), min_size=k, max_size=k)))


@st.composite
def canonical(draw) -> str:
    """A valid canonical trajectory: text and blocks, then ``</think>`` and a boxed answer."""
    items, pending = [], "<think>\n"
    for part in draw(st.lists(st.one_of(_word, _block), max_size=4)):
        if isinstance(part, str):
            pending += part
            continue
        items += [Text(pending)] if pending else []
        items.append(Block.from_plan(*part))
        pending = ""
    items.append(Text(pending + "\n</think>\n\n\\boxed{" + draw(st.sampled_from(["7", "x+1", "{a}"])) + "}"))
    return Trajectory(tuple(items)).render()


# What a model or a broken pipeline writes instead: odd characters, numbers that are not ASCII without a
# leading zero, heads of blocks that never close (the degenerate generation of the issue).
ODD = ["\ud800", "\udfff", "\u0661", "\u0660", "\U0001d7d9", "\u00e9", "\x00", "\u200b", "\u2028", "\r", "\t", " "]
NUMBERS = ["01:", "\u0661:", "00:", "+1:", "1\u0661:", "9999999999:", "0:", " 1:"]
HEADS = ["<Parallel>\n<Outlines>\n<Outline>1:", "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\n1:",
         "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n"]
KINDS = ["delete_tag", "duplicate_tag", "swap_tags", "insert_tag", "delete_span", "nest", "unclosed", "whitespace",
         "unicode", "number", "concat"]


def _random_block(r: random.Random) -> str:
    k = r.randint(1, 3)
    return Block.from_plan([r.choice(WORDS) for _ in range(k)], [r.choice(WORDS[1:3]) for _ in range(k)]).render()


def _mutate(r: random.Random, text: str) -> str:
    """One mutation at a random place."""
    kind, spans, at = r.choice(KINDS), [m.span() for m in fmt.TAG_RE.finditer(text)], r.randint(0, len(text))
    if kind in ("delete_tag", "duplicate_tag") and spans:
        a, b = r.choice(spans)
        return text[:a] + text[b:] if kind == "delete_tag" else text[:b] + text[a:b] + text[b:]
    if kind == "swap_tags" and len(spans) >= 2:
        (a1, b1), (a2, b2) = sorted(r.sample(spans, 2))
        return text[:a1] + text[a2:b2] + text[b1:a2] + text[a1:b1] + text[b2:]
    if kind == "delete_span":
        return text[:at] + text[at + r.randint(1, 40):]
    if kind == "nest":  # a whole (maybe broken, maybe nested again) block inside whatever is here
        inner = _random_block(r)
        for _ in range(r.randint(0, 2)):
            inner = _mutate(r, inner) if r.random() < 0.5 else _random_block(r).replace(" a\n", " a" + inner, 1)
        return text[:at] + inner * r.randint(1, 3) + text[at:]
    if kind == "unclosed":
        return text[:at] + r.choice(HEADS) * r.randint(1, 30) + text[at:]
    if kind == "whitespace":
        return text[:at] + r.choice(["", "\n", "\n\n", " ", "\t"]) + text[at + 1:]
    if kind == "unicode":
        return text[:at] + r.choice(ODD) + text[at:]
    if kind == "number":
        return text.replace(r.choice(["1:", "2:"]), r.choice(NUMBERS), r.randint(1, 2))
    if kind == "concat":  # two responses in one: repeated <think>, blocks after </think>
        return text[:at] + text + text[at:] if len(text) < 2000 else text
    return text[:at] + r.choice(fmt.TAGS) + text[at:]


def _mutants(r: random.Random, base: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        text = base
        for _ in range(r.randint(1, 4)):
            text = _mutate(r, text)
        out.append(text)
    return out


@st.composite
def mutants(draw, n: int) -> list[str]:
    """``n`` mutated variants of one canonical trajectory; the mutations come from a drawn seed (a plain
    `random.Random` is ~100x cheaper per choice than a Hypothesis draw, and the failing text is shown anyway)."""
    return _mutants(random.Random(draw(st.integers(0, 2**32))), draw(canonical()), n)


def _no_surrogates(text: str) -> str:
    return fmt.tags.SURROGATE_RE.sub("?", text)


# ------------------------------------------------------------------------------------------ fuzz
def _timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (or the FormatError it raised) and its CPU time, the best of up to 3 runs if the
    first is over `TIME_BOUND_S` (CPU time, not wall time: the cores are shared)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        try:
            out = fn(*args, **kwargs)
        except FormatError as e:
            out = e
        best = min(best, time.process_time() - t0)
        if best < TIME_BOUND_S:
            break
    return out, best


def _check_text(text: str):
    strict, seconds = _timed(parse, text)
    assert seconds < TIME_BOUND_S, (len(text), "strict", seconds)
    # count=len (a tag counts 1): token counts without the tokenizer's per-call cost; test_format uses a tokenizer
    lenient, seconds = _timed(parse, text, strict=False, count=len)
    assert seconds < TIME_BOUND_S, (len(text), "lenient", seconds)
    assert isinstance(lenient, Trajectory) and lenient.render() == text
    if isinstance(strict, FormatError):
        assert strict.problem and 0 <= strict.char_offset <= len(text) and lenient.issues
    else:
        assert strict.render() == text and lenient == strict and not lenient.issues
    if not fmt.tags.SURROGATE_RE.search(text):
        tags = [m.group() for m in fmt.TAG_RE.finditer(text)]
        assert statistics(lenient).total_tokens == len(text) - sum(len(t) - 1 for t in tags)


def _probe_agrees_with_walk(text: str):
    """Pass 1's verdict on every <Parallel> equals walking the block there (pass 2); small inputs (quadratic)."""
    pieces = parser_module.text_pieces(text)
    if len(pieces) > 200:
        return
    walker = parser_module._Walker(pieces, strict=False)
    for j, piece in enumerate(pieces):
        if piece.is_tag and piece.value == fmt.PARALLEL_OPEN:
            end, failure = walker.probe.blocks[j]
            walker.i, walker.depth = j, 0
            try:
                walker.block()
                walked = (walker.i, None)
            except FormatError as e:
                walked = (None, str(e))
            assert walked == ((end, None) if end is not None else (None, str(parser_module._error(pieces, *failure))))


TEXT_EXAMPLES, IDS_EXAMPLES, LONG_EXAMPLES, PER_EXAMPLE = 760, 240, 40, 10


@settings(FUZZ, max_examples=TEXT_EXAMPLES)
@given(mutants(PER_EXAMPLE))
def test_fuzz_text(texts):
    for text in texts:
        _check_text(text)
        _probe_agrees_with_walk(text)


@settings(FUZZ, max_examples=LONG_EXAMPLES)
@given(mutants(1), st.integers(0, 2**32))
def test_fuzz_long_text(texts, seed):
    # 5-40k characters: a mutated trajectory with a stretch repeated, then mutated again
    r, text = random.Random(seed), texts[0]
    a = r.randint(0, len(text))
    text = text[:a] + text[a:a + r.randint(50, 400)] * r.randint(50, 100) + text[a:]
    for long_text in [text] + _mutants(r, text, 1):
        _check_text(long_text)


@settings(FUZZ, max_examples=IDS_EXAMPLES)
@given(mutants(PER_EXAMPLE), st.integers(0, 2**32))
def test_fuzz_ids(texts, seed):
    r = random.Random(seed)
    for text in texts:
        # characters the tokenizer lacks become <|unk|>; then random ids in range, tags and EOS included
        ids = TOK.encode(_no_surrogates(text), add_special_tokens=False)
        for _ in range(r.randint(0, 4)):
            ids.insert(r.randint(0, len(ids)), r.choice(TAG_IDS + [TOK.eos_token_id, r.randrange(len(TOK))]))
        ids += [TOK.eos_token_id] if r.random() < 0.5 else []
        strict, seconds = _timed(parse_ids, ids, TOK)
        assert seconds < TIME_BOUND_S
        assert not isinstance(strict, FormatError) or strict.token_offset is None or 0 <= strict.token_offset <= len(ids)
        lenient, seconds = _timed(parse_ids, ids, TOK, strict=False)
        assert seconds < TIME_BOUND_S and statistics(lenient).total_tokens == len(ids)
        assert isinstance(strict, FormatError) == bool(lenient.issues)


_SYMBOLS = list(fmt.TAGS) + ["\n", " ", "a", "1:", "2:", "01:", "\u0661:", "\ud800", "\\boxed{", "}", "\n1:"]


@settings(FUZZ, max_examples=500)
@given(st.lists(st.sampled_from(_SYMBOLS), max_size=40).map("".join))
def test_lenient_render_is_the_input_for_any_string(text):
    # not only mutated trajectories: any string, from the format's own symbols
    lenient = parse(text, strict=False)
    assert lenient.render() == text
    try:
        strict = parse(text)
    except FormatError:
        assert lenient.issues
    else:
        assert strict == lenient and not lenient.issues


def test_fuzz_case_count():
    assert (TEXT_EXAMPLES + IDS_EXAMPLES) * PER_EXAMPLE + 2 * LONG_EXAMPLES >= 10_000


# -------------------------------------------------------------------------------- linear parse time
def _cpu_seconds(fn, batch: int) -> float:
    t0 = time.process_time()
    for _ in range(batch):
        fn()
    return time.process_time() - t0


def _best_times(small, big, repeats: int = 7) -> tuple[float, float]:
    """Best CPU times of ``batch`` runs of ``small()`` and of ``big()``, measured in turn (so that load from other
    processes hits both alike; the minimum resists it). ``batch`` makes a small run last ≥ 5 ms."""
    batch = 1
    while _cpu_seconds(small, batch) < 0.005:
        batch *= 2
    t_small = t_big = float("inf")
    for _ in range(repeats):
        t_small, t_big = min(t_small, _cpu_seconds(small, batch)), min(t_big, _cpu_seconds(big, batch))
    return t_small, t_big


HEAD = "<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>\n<Thread>\n1: x"
SHAPES = {  # one level of nesting, 10 or 40 times
    "unclosed in outline": lambda inner: "<Parallel>\n<Outlines>\n<Outline>1:" + "x" * 20 + inner,
    "unclosed in thread": lambda inner: HEAD + "x" * 20 + inner,
    # complete blocks nested deeper than lenient mode lists issues in (8)
    "closed in thread": lambda inner: HEAD + inner + "\n</Thread>\n</Parallel>",
}


def _nested(shape: str, depth: int) -> str:
    text = ""
    for _ in range(depth):
        text = SHAPES[shape](text)
    return "<think>\n" + text + "\n</think>\n\n\\boxed{1}"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["strict", "lenient", "ids strict", "ids lenient"])
def test_parse_time_is_linear_in_nesting(shape, mode):
    def parser(depth: int):
        text = _nested(shape, depth)
        ids, strict = TOK.encode(text, add_special_tokens=False), "strict" in mode

        def run():
            try:
                parse_ids(ids, TOK, strict=strict) if "ids" in mode else parse(text, strict=strict)
            except FormatError:
                pass
        return run

    t10, t40 = _best_times(parser(10), parser(40))
    assert t40 < 6 * t10, (t10, t40)  # 4x the input: ~4x if linear, 16x if quadratic (the issue: ~4^9)


# ------------------------------------------------------------------------------------- regressions
B = Trajectory((Text("<think>\nab\n"), Block.from_plan(["A", "BB"], ["xy", "pqrs"]),
                Text("\ncd\n</think>\n\n\\boxed{7}"))).render()


def test_issue_reproduction_is_fast():
    # the issue: > 20 s before (time ~ depth^9), lenient-parsed by the orchestrator on every model output
    text = "<think>\n" + "<Parallel>\n<Outlines>\n<Outline>1:" * 24
    t0 = time.process_time()
    for _ in range(20):
        lenient = parse(text, strict=False)
    assert time.process_time() - t0 < 1.0
    assert lenient.render() == text and not lenient.blocks
    assert lenient.issues[-1] == "missing </think>"
    last_block = f"block read as text: outline 1 is never closed with </Outline> (at end of input) (at character {len(text)})"
    assert lenient.issues[-4:-1] == (last_block, "stray <Outlines> read as text", "stray <Outline> read as text")
    with pytest.raises(FormatError, match="nested <Parallel> inside outline 1"):
        parse(text)


@pytest.mark.parametrize("where", ["xy", "cd"])  # inside a thread, in the text after the block
def test_lone_surrogate(where):
    text = B.replace(where, where[0] + "\ud800" + where[1:])
    at = text.index("\ud800")
    with pytest.raises(FormatError, match="lone surrogate") as e:
        COUNT(text)  # the tokenizer itself raises a TypeError here
    assert e.value.char_offset == at
    for count in (None, COUNT):
        with pytest.raises(FormatError, match="lone surrogate '\\\\ud800' in the response") as e:
            parse(text, count=count)
        assert e.value.char_offset == at and f"character {at}" in str(e.value)
    lenient = parse(text, strict=False, count=COUNT)
    assert lenient.render() == text and len(lenient.blocks) == 1
    assert lenient.issues == (f"lone surrogate '\\ud800' at character {at} read as text; it has no token count",)
    unknown = lenient.blocks[0] if where == "xy" else lenient.items[-1]
    assert unknown.n_tokens is None and lenient.items[0].n_tokens == len(TOK.encode("<think>\nab\n"))
    with pytest.raises(FormatError, match="token counts are unknown"):
        statistics(lenient)


@pytest.mark.parametrize("number", ["01", "00", "\u0661", "1\u0661", "\U0001d7d9"])
@pytest.mark.parametrize("part", ["outline", "thread"])
def test_numbers_are_ascii_without_leading_zero(number, part):
    old = "1: A" if part == "outline" else "\n1: xy"
    text = B.replace(old, old.replace("1", number, 1))
    with pytest.raises(FormatError, match=f"{part} 1 does not start with its number 'N:'"):
        parse(text)
    lenient = parse(text, strict=False)
    assert lenient.render() == text and not lenient.blocks  # read as text, not rewritten to "1:"
    assert f"block read as text: {part} 1 does not start with its number 'N:'" in lenient.issues[0]


def test_zero_is_a_number():
    text = B.replace("1: A", "0: A").replace("\n1: xy", "\n0: xy")
    with pytest.raises(FormatError, match=r"outline numbers \[0, 2\] are not 1..2"):
        parse(text)
    assert parse(text, strict=False).blocks[0].outlines[0].number == 0


def test_lenient_render_keeps_uneven_whitespace():
    # gaps that differ between outlines or between threads (one value per block was kept before)
    text = B.replace("</Outline>\n<Outline>", "</Outline><Outline>").replace("</Thread><Thread>", "</Thread> <Thread>")
    text = text.replace(" pqrs\n</Thread>", " pqrs\n</Thread><Thread>\n3: z\n</Thread>")
    text = text.replace("BB</Outline>", "BB</Outline>\n<Outline>3: C</Outline>")
    lenient = parse(text, strict=False)
    assert len(lenient.blocks) == 1 and lenient.render() == text and not lenient.blocks[0].canonical
    assert dict(lenient.blocks[0].spacing) == {"after_outline": "", "after_outline 2": "\n", "after_outline 3": "\n",
                                               "between_threads": " ", "between_threads 2": ""}
    with pytest.raises(FormatError, match="non-canonical whitespace '' after outline"):
        parse(text)


def test_deep_nesting_is_text_inside_one_block():
    text = _nested("closed in thread", 15)
    lenient = parse(text, strict=False, count=COUNT)
    assert len(lenient.blocks) == 1 and lenient.render() == text
    assert statistics(lenient).total_tokens == len(TOK.encode(text, add_special_tokens=False))
    # issues are listed for blocks nested up to 8 deep, and each nesting is reported
    assert lenient.issues.count("nested <Parallel> block inside thread 1 read as text") == 9


OTHER_SPOTS = {  # what was quadratic besides nesting: n = 500 vs 2000
    "unclosed boxes": lambda n: "<think>\n</think>" + "\\boxed{" * n,  # were scanned forward from each box
    "stray tags": lambda n: "<think>\n" + "</Thread>x" * n + "</think>\\boxed{1}",  # texts were joined pairwise
    "repeated numbers": lambda n: ("<think>\n<Parallel>\n<Outlines>\n" + "<Outline>1: a</Outline>\n" * n  # .count each
                                   + "</Outlines>\n" + "<Thread>\n1: b\n</Thread>" * n + "\n</Parallel>\n</think>\\boxed{1}"),
}


@pytest.mark.parametrize("spot", list(OTHER_SPOTS))
@pytest.mark.parametrize("strict", [True, False])
def test_other_quadratic_spots_are_linear(spot, strict):
    def parser(n: int):
        text = OTHER_SPOTS[spot](n)
        return lambda: _timed(parse, text, strict=strict)

    t1, t4 = _best_times(parser(500), parser(2000))
    assert t4 < 6 * t1, (t1, t4)
    out = parse(OTHER_SPOTS[spot](10), strict=False)
    assert out.render() == OTHER_SPOTS[spot](10)
