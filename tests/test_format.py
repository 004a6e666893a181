"""twlib.format: hand-built trajectories with hand-computed statistics, segments, every FormatError,
lenient parsing, extract_boxed, and Hypothesis round-trip / robustness properties (docs/design.md §4, §7)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twlib import format as fmt
from twlib.format import (
    Block,
    FormatError,
    Outline,
    Segment,
    Text,
    Thread,
    Trajectory,
    extract_boxed,
    parse,
    parse_ids,
    render_segments,
    segments,
    statistics,
)
from twlib.tokenizer import CHARACTERS, build_char_tokenizer, drift, segment_ids, token_counter

TOK = build_char_tokenizer()
EOS = TOK.eos_token_id
COUNT = token_counter(TOK)  # char tokenizer: 1 per character, tags and "\boxed{" are 1 each


def ids_of(text: str, eos: bool = True) -> list[int]:
    return TOK.encode(text, add_special_tokens=False) + ([EOS] if eos else [])


# ------------------------------------------------------------------------ hand-built trajectories
# (a) no blocks
TRAJ_A = Trajectory((Text("<think>\nab c\n</think>\n\n\\boxed{42}"),))
# (b) one block, 2 threads of unequal length
TRAJ_B = Trajectory((Text("<think>\nab\n"), Block.from_plan(["A", "BB"], ["xy", "pqrs"]),
                     Text("\ncd\n</think>\n\n\\boxed{7}")))
# (c) two blocks with 3 and 2 threads, text between
TRAJ_C = Trajectory((Text("<think>\nq\n"), Block.from_plan(["a", "b", "c"], ["1+1=2", "k", "zz"]),
                     Text("\nmid\n"), Block.from_plan(["d", "e"], ["u", "vvv\nw"]),
                     Text("\nend\n</think>\n\n\\boxed{x}")))


def test_renderings_are_the_canonical_layout():
    assert TRAJ_A.render() == "<think>\nab c\n</think>\n\n\\boxed{42}"
    assert TRAJ_B.render() == (
        "<think>\nab\n<Parallel>\n<Outlines>\n<Outline>1: A</Outline>\n<Outline>2: BB</Outline>\n"
        "</Outlines>\n<Thread>\n1: xy\n</Thread><Thread>\n2: pqrs\n</Thread>\n</Parallel>\n"
        "cd\n</think>\n\n\\boxed{7}")
    assert TRAJ_C.render() == (
        "<think>\nq\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
        "<Outline>3: c</Outline>\n</Outlines>\n<Thread>\n1: 1+1=2\n</Thread><Thread>\n2: k\n</Thread>"
        "<Thread>\n3: zz\n</Thread>\n</Parallel>\nmid\n<Parallel>\n<Outlines>\n<Outline>1: d</Outline>\n"
        "<Outline>2: e</Outline>\n</Outlines>\n<Thread>\n1: u\n</Thread><Thread>\n2: vvv\nw\n</Thread>\n"
        "</Parallel>\nend\n</think>\n\n\\boxed{x}")
    for t in (TRAJ_A, TRAJ_B, TRAJ_C):
        assert parse(t.render()) == t


def _check(stats, total, critical, sequential, parallel, blocks, tpb):
    assert stats.total_tokens == total
    assert stats.critical_path_tokens == critical
    assert stats.sequential_tokens == sequential
    assert stats.parallel_tokens == parallel
    assert stats.num_blocks == blocks
    assert stats.threads_per_block == tpb
    assert stats.acceleration_ratio == pytest.approx(1 - critical / total)
    assert stats.parallel_ratio == pytest.approx(parallel / total)
    assert stats.activated is (blocks > 0)
    d = stats.as_dict()
    assert d["total_tokens"] == total and d["threads_per_block"] == list(tpb) and d["activated"] is (blocks > 0)


def test_stats_no_blocks():
    s = TRAJ_A.render()
    # count=len: <think> 1 + "\nab c\n" 6 + </think> 1 + "\n\n\\boxed{42}" (2+7+3=12) = 20
    st_len = statistics(parse(s, count=len))
    _check(st_len, 20, 20, 20, 0, 0, ())
    assert st_len.acceleration_ratio == 0.0 and st_len.parallel_ratio == 0.0 and not st_len.activated
    # char tokenizer: "\boxed{" is one token: 1 + 6 + 1 + (2 + 1 + 3) = 14
    _check(statistics(parse(s, count=COUNT)), 14, 14, 14, 0, 0, ())
    # ids with a trailing EOS: 15 = len(ids)
    ids = ids_of(s)
    assert len(ids) == 15
    _check(statistics(parse_ids(ids, TOK)), 15, 15, 15, 0, 0, ())


def test_stats_one_block_unequal_threads():
    s = TRAJ_B.render()
    # count=len
    #   "<think>\nab\n"            : <think> 1 + "\nab\n" 4                                  =  5
    #   block outside threads       : <Parallel> 1, "\n" 1, <Outlines> 1, "\n" 1,
    #                                 <Outline> 1 "1: A" 4 </Outline> 1 "\n" 1  (7)
    #                                 <Outline> 1 "2: BB" 5 </Outline> 1 "\n" 1 (8)
    #                                 </Outlines> 1, "\n" 1, join "\n" 1, </Parallel> 1     = 4+7+8+2+2 = 23
    #   thread 1                    : <Thread> 1 + "\n1: xy\n" 7 + </Thread> 1               =  9
    #   thread 2                    : <Thread> 1 + "\n2: pqrs\n" 9 + </Thread> 1             = 11
    #   block = 23 + 9 + 11 = 43
    #   "\ncd\n</think>\n\n\boxed{7}": 4 + 1 + (2 + 7 + 2)                                   = 16
    #   total = 5 + 43 + 16 = 64; sequential = 21; critical = 21 + 23 + max(9, 11) = 55
    t = parse(s, count=len)
    blk = t.blocks[0]
    assert blk.n_tokens == 43 and [th.n_tokens for th in blk.threads] == [9, 11]
    st_len = statistics(t)
    _check(st_len, 64, 55, 21, 43, 1, (2,))
    assert st_len.acceleration_ratio == pytest.approx(9 / 64)
    assert st_len.parallel_ratio == pytest.approx(43 / 64)
    # char tokenizer: only the final text changes: 4 + 1 + (2 + 1 + 2) = 10
    #   total = 5 + 43 + 10 = 58; sequential = 15; critical = 15 + 23 + 11 = 49
    _check(statistics(parse(s, count=COUNT)), 58, 49, 15, 43, 1, (2,))
    # ids + EOS: the EOS is one more sequential (and critical) token
    ids = ids_of(s)
    assert len(ids) == 59
    _check(statistics(parse_ids(ids, TOK)), 59, 50, 16, 43, 1, (2,))


def test_stats_two_blocks():
    s = TRAJ_C.render()
    # count=len
    #   "<think>\nq\n"                               : 1 + 3                               =   4
    #   block 1 outside threads: <Parallel>\n<Outlines>\n 4 + 3 outlines ×
    #       (<Outline> 1 + "N: a" 4 + </Outline> 1 + "\n" 1 = 7) 21 + </Outlines>\n 2 + \n</Parallel> 2 = 29
    #   block 1 threads: <Thread> "\n1: 1+1=2\n"(10) </Thread> = 12; "\n2: k\n"(6) → 8;
    #                    "\n3: zz\n"(7) → 9                                               =  29
    #   block 1 = 29 + 29 = 58
    #   "\nmid\n"                                     :                                        5
    #   block 2 outside threads: 4 + 2 × 7 + 2 + 2                                        =  22
    #   block 2 threads: "\n1: u\n"(6) → 8; "\n2: vvv\nw\n"(10) → 12                        =  20
    #   block 2 = 42
    #   "\nend\n</think>\n\n\boxed{x}"               : 5 + 1 + (2 + 7 + 2)                 =  17
    #   total = 4 + 58 + 5 + 42 + 17 = 126; sequential = 4 + 5 + 17 = 26; parallel = 100
    #   critical = 26 + (29 + 12) + (22 + 12) = 101
    t = parse(s, count=len)
    assert [b.n_tokens for b in t.blocks] == [58, 42]
    assert [[th.n_tokens for th in b.threads] for b in t.blocks] == [[12, 8, 9], [8, 12]]
    st_len = statistics(t)
    _check(st_len, 126, 101, 26, 100, 2, (3, 2))
    assert st_len.acceleration_ratio == pytest.approx(25 / 126)
    # char tokenizer: final text 5 + 1 + (2 + 1 + 2) = 11 → total 120, sequential 20, critical 95
    _check(statistics(parse(s, count=COUNT)), 120, 95, 20, 100, 2, (3, 2))
    ids = ids_of(s)
    assert len(ids) == 121
    _check(statistics(parse_ids(ids, TOK)), 121, 96, 21, 100, 2, (3, 2))


@pytest.mark.parametrize("traj", [TRAJ_A, TRAJ_B, TRAJ_C])
def test_parse_ids_total_is_len_ids(traj):
    for eos in (True, False):
        ids = ids_of(traj.render(), eos=eos)
        t = parse_ids(ids, TOK)
        assert t.eos is eos
        assert t.items == traj.items
        assert statistics(t).total_tokens == len(ids)


def test_statistics_without_counts_is_a_format_error():
    with pytest.raises(FormatError, match="token counts are unknown"):
        statistics(parse(TRAJ_B.render()))


def test_statistics_zero_total():
    s = statistics(Trajectory(()))
    assert s.total_tokens == 0 and s.acceleration_ratio == 0.0 and s.parallel_ratio == 0.0


# --------------------------------------------------------------------------------------- segments
def test_segments_two_blocks():
    segs = segments(TRAJ_C)
    O, M = "orchestrator", "model"
    assert segs == [
        Segment("<think>\nq\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
                "<Outline>3: c</Outline>\n</Outlines>", M, "sequential", None, None),
        Segment("\n<Thread>\n1:", O, "header", 0, 1),
        Segment(" 1+1=2\n</Thread>", M, "thread", 0, 1),
        Segment("<Thread>\n2:", O, "header", 0, 2),
        Segment(" k\n</Thread>", M, "thread", 0, 2),
        Segment("<Thread>\n3:", O, "header", 0, 3),
        Segment(" zz\n</Thread>", M, "thread", 0, 3),
        Segment("\n", O, "join", 0, None),
        Segment("</Parallel>\nmid\n<Parallel>\n<Outlines>\n<Outline>1: d</Outline>\n<Outline>2: e</Outline>\n"
                "</Outlines>", M, "sequential", None, None),
        Segment("\n<Thread>\n1:", O, "header", 1, 1),
        Segment(" u\n</Thread>", M, "thread", 1, 1),
        Segment("<Thread>\n2:", O, "header", 1, 2),
        Segment(" vvv\nw\n</Thread>", M, "thread", 1, 2),
        Segment("\n", O, "join", 1, None),
        Segment("</Parallel>\nend\n</think>\n\n\\boxed{x}", M, "sequential", None, None),
    ]
    assert render_segments(segs) == TRAJ_C.render()
    assert fmt.thread_header(1, first=True) == "\n<Thread>\n1:" and fmt.JOIN == "\n"


def test_segments_no_block_and_adjacent_blocks():
    assert segments(TRAJ_A) == [Segment(TRAJ_A.render(), "model", "sequential")]
    b = Block.from_plan(["a"], ["x"])
    t = Trajectory((Text("<think>\n"), b, b, Text("\n</think>\n\n\\boxed{1}")))
    segs = segments(t)
    assert [s.kind for s in segs] == ["sequential", "header", "thread", "join"] * 2 + ["sequential"]
    assert segs[4].text == "</Parallel>" + b.head()
    assert render_segments(segs) == t.render() and parse(t.render()) == t


def test_segments_reject_non_canonical_block():
    s = TRAJ_B.render().replace("<Parallel>\n<Outlines>", "<Parallel>\n\n<Outlines>")
    t = parse(s, strict=False)
    assert t.blocks and not t.blocks[0].canonical and t.render() == s
    with pytest.raises(FormatError, match="canonical"):
        segments(t)


# ----------------------------------------------------------------------------------- FormatErrors
B = TRAJ_B.render()
C = TRAJ_C.render()
NESTED = Block.from_plan(["n"], ["y"]).render()


def _after(s: str, needle: str) -> int:
    return s.index(needle) + len(needle)


# (name, bad text, words the message must contain, expected character offset)
ERROR_CASES = [
    ("thread close before open", B.replace("</Outlines>\n<Thread>", "</Outlines>\n</Thread>", 1),
     ["no <Thread>"], _after(B, "</Outlines>\n")),
    ("missing </Parallel> before text", B.replace("</Parallel>", ""),
     ["expected </Parallel>"], B.index("\n</Parallel>")),
    ("missing </Parallel> before </think>", B.replace("</Parallel>\ncd\n", ""),
     ["expected </Parallel>", "found </think>"], B.index("</Parallel>")),
    ("missing <Outlines>", B.replace("<Outlines>\n", ""),
     ["expected <Outlines>", "found <Outline>"], _after(B, "<Parallel>\n")),
    ("missing </Outlines>", B.replace("</Outlines>\n", ""),
     ["expected </Outlines>", "found <Thread>"], B.index("</Outlines>")),
    ("missing </Outline>", B.replace("BB</Outline>", "BB"),
     ["nested </Outlines> inside outline 2"], B.index("</Outlines>") - len("</Outline>\n") + 1),
    ("missing </Thread>", B.replace("pqrs\n</Thread>", "pqrs\n"),
     ["nested </Parallel> inside thread 2"], B.index("</Parallel>") - len("</Thread>")),
    ("outline number gap", B.replace("2: BB", "3: BB").replace("2: pqrs", "3: pqrs"),
     ["outline numbers [1, 3] are not 1..2"], B.index("<Parallel>")),
    ("outline number repeated", B.replace("2: BB", "1: BB").replace("2: pqrs", "1: pqrs"),
     ["outline numbers [1, 1] are not 1..2", "repeated: [1]"], B.index("<Parallel>")),
    ("outline numbers from 0", B.replace("1: A", "0: A").replace("2: BB", "1: BB")
     .replace("1: xy", "0: xy").replace("2: pqrs", "1: pqrs"),
     ["outline numbers [0, 1] are not 1..2"], B.index("<Parallel>")),
    ("outline/thread count", B.replace("<Thread>\n2: pqrs\n</Thread>", ""),
     ["2 outlines but 1 threads"], B.index("<Parallel>")),
    ("thread numbers", B.replace("2: pqrs", "3: pqrs"),
     ["thread numbers [1, 3] do not match outline numbers [1, 2]"], B.index("<Parallel>")),
    ("threads out of order", B.replace("1: xy", "2: xy").replace("2: pqrs", "1: pqrs"),
     ["thread numbers [2, 1] do not match"], B.index("<Parallel>")),
    ("second block bad", C.replace("2: vvv", "5: vvv"),
     ["thread numbers [1, 5]"], C.index("<Parallel>", C.index("mid"))),
    ("nested <Parallel> tag", B.replace(" xy\n", " x<Parallel>y\n"),
     ["nested <Parallel> inside thread 1"], B.index(" xy\n") + 2),
    ("nested block", B.replace(" xy\n", " x" + NESTED + "y\n"),
     ["nested <Parallel> inside thread 1"], B.index(" xy\n") + 2),
    ("nested <Outline> in outline", B.replace("1: A", "1: A<Outline>"),
     ["nested <Outline> inside outline 1"], _after(B, "1: A")),
    ("text between threads", B.replace("</Thread><Thread>", "</Thread>zz<Thread>"),
     ["text between threads"], _after(B, "xy\n</Thread>")),
    ("empty thread", B.replace(" xy\n", " \n"),
     ["thread 1 is empty"], B.index("<Thread>")),
    ("thread without number", B.replace("1: xy", "xy"),
     ["thread 1 does not start with its number"], B.index("<Thread>")),
    ("thread without newline", B.replace("<Thread>\n1:", "<Thread>1:"),
     ["thread 1 must start with"], B.index("<Thread>")),
    ("outline without number", B.replace("1: A", "A"),
     ["outline 1 does not start with its number"], B.index("<Outline>")),
    ("huge outline number", B.replace("1: A", "1" * 5000 + ": A"),
     ["implausible number"], B.index("<Outline>")),
    ("non-canonical whitespace", B.replace("<Parallel>\n", "<Parallel>\n\n"),
     ["non-canonical whitespace"], _after(B, "<Parallel>")),
    ("text inside block head", B.replace("<Parallel>\n", "<Parallel>\nhm"),
     ["unexpected text '\\nhm' inside a <Parallel> block"], _after(B, "<Parallel>")),
    ("block without outlines", B.replace("<Outline>1: A</Outline>\n<Outline>2: BB</Outline>\n", ""),
     ["no <Outline>"], lambda bad: bad.index("</Outlines>")),
    ("stray tag outside a block", B.replace("cd\n", "cd</Thread>\n"),
     ["unexpected </Thread> outside a <Parallel> block"], _after(B, "cd")),
    ("missing </think>", B.replace("</think>", ""),
     ["missing </think>", "end of input"], len(B) - len("</think>")),
    ("missing \\boxed", B.replace("\\boxed{7}", "7"),
     ["missing \\boxed{} after </think>"], len(B) - len("\\boxed{7}") + 1),
    ("\\boxed only before </think>", B.replace("cd\n</think>\n\n\\boxed{7}", "\\boxed{7}\n</think>\n\n7"),
     ["missing \\boxed{} after </think>"], len),  # end of input
    ("unclosed \\boxed", B.replace("\\boxed{7}", "\\boxed{7"),
     ["missing \\boxed{} after </think>"], len(B) - 1),
    ("no <think>", B.replace("<think>", ""),
     ["must start with <think>"], 0),
    ("text before <think>", "x" + B,
     ["must start with <think>"], 0),
    ("two <think>", B.replace("cd\n", "cd\n<think>"),
     ["<think> appears more than once"], _after(B, "cd\n")),
    ("two </think>", B.replace("cd\n", "cd\n</think>"),
     ["</think> appears more than once"], B.index("</think>") + len("</think>")),
    ("block after </think>", B.replace("\\boxed{7}", Block.from_plan(["a"], ["b"]).render() + "\\boxed{7}"),
     ["<Parallel> after </think>"], B.index("\\boxed{7}")),
]


def test_error_cases_are_distinct_corruptions():
    assert len({bad for _, bad, _, _ in ERROR_CASES}) == len(ERROR_CASES)
    assert all(bad != B and bad != C for _, bad, _, _ in ERROR_CASES)


@pytest.mark.parametrize("name,bad,words,char", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_strict_errors_name_problem_and_offsets(name, bad, words, char):
    char = char(bad) if callable(char) else char
    with pytest.raises(FormatError) as e:
        parse(bad)
    for w in words:
        assert w in str(e.value) and w in e.value.problem
    assert e.value.char_offset == char, (bad[char:char + 20], bad[e.value.char_offset:e.value.char_offset + 20])
    assert f"character {char}" in str(e.value)
    # with token counts, the token offset is the number of tokens before that character
    with pytest.raises(FormatError) as e2:
        parse(bad, count=COUNT)
    assert e2.value.problem == e.value.problem and e2.value.char_offset == char
    assert e2.value.token_offset == len(TOK.encode(bad[:char]))
    # the same from ids (with EOS): same problem, same character offset, token offset of that character
    with pytest.raises(FormatError) as e3:
        parse_ids(ids_of(bad), TOK)
    assert e3.value.problem == e.value.problem
    assert e3.value.char_offset == char
    assert e3.value.token_offset == len(TOK.encode(bad[:char]))
    assert f"token {e3.value.token_offset}" in str(e3.value)


@pytest.mark.parametrize("name,bad,words,char", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_lenient_same_inputs_never_raise_and_record_issues(name, bad, words, char):
    t = parse(bad, strict=False)
    assert t.issues, name
    t2 = parse_ids(ids_of(bad), TOK, strict=False)
    assert t2.issues and t2.items == t.items and t2.eos
    assert statistics(t2).total_tokens == len(ids_of(bad))
    # lenient keeps every character of these single-fault inputs: nothing is dropped or invented
    assert t.render() == bad


def test_lenient_numbering_problems_keep_the_block():
    bad = B.replace("2: BB", "3: BB").replace("2: pqrs", "3: pqrs")
    t = parse(bad, strict=False)
    assert len(t.blocks) == 1 and [o.number for o in t.blocks[0].outlines] == [1, 3]
    assert t.issues == ("outline numbers [1, 3] are not 1..2",)


def test_lenient_nested_tag_in_thread_is_text():
    bad = B.replace(" xy\n", " x<Parallel>y\n")
    t = parse(bad, strict=False)
    assert len(t.blocks) == 1
    assert t.blocks[0].threads[0].body == " x<Parallel>y\n"
    assert t.issues == ("nested <Parallel> inside thread 1 read as text",)


def test_lenient_nested_block_in_thread_is_text():
    # docs/design.md §4: lenient mode treats nested blocks as text; the enclosing block stays a block
    bad = C.replace(" k\n", " k" + NESTED + "k\n")
    t = parse(bad, strict=False, count=COUNT)
    assert len(t.blocks) == 2
    assert t.blocks[0].threads[1].body == " k" + NESTED + "k\n"
    assert any("nested <Parallel> block inside thread 2" in i for i in t.issues)
    st = statistics(t)
    assert st.threads_per_block == (3, 2) and st.total_tokens == len(TOK.encode(bad))
    # thread 2 is now the longest: <Thread> + "\n2: k" + nested block + "k\n" + </Thread>
    assert t.blocks[0].threads[1].n_tokens == 1 + 5 + len(TOK.encode(NESTED)) + 2 + 1
    assert t.render() == bad


def test_lenient_keeps_parsing_blocks_after_a_bad_one():
    bad = C.replace("</Thread><Thread>\n2: k", "</Thread>oops<Thread>\n2: k")
    with pytest.raises(FormatError, match="text between threads"):
        parse(bad)
    t = parse(bad, strict=False)
    assert t.blocks == [TRAJ_C.blocks[1]]
    assert any(i.startswith("block read as text: text between threads") for i in t.issues)
    assert isinstance(t.items[0], Text) and t.items[0].text.startswith("<think>\nq\n<Parallel>")
    assert t.render() == bad and t.answer == "x"


def test_lenient_valid_input_has_no_issues():
    for traj in (TRAJ_A, TRAJ_B, TRAJ_C):
        t = parse(traj.render(), strict=False)
        assert t == traj and t.issues == ()


@pytest.mark.parametrize("value", [b"<think>", None, 12, ["<think>"]])
def test_non_str_input(value):
    for strict in (True, False):
        with pytest.raises(FormatError, match="expected a str response"):
            parse(value, strict=strict)


def test_parse_empty_string():
    with pytest.raises(FormatError, match="must start with <think>") as e:
        parse("")
    assert e.value.char_offset == 0
    assert parse("", strict=False).issues


def test_parse_ids_bad_input():
    with pytest.raises(FormatError, match="sequence of token ids"):
        parse_ids(None, TOK)
    with pytest.raises(FormatError, match="sequence of token ids"):
        parse_ids(["a"], TOK)
    with pytest.raises(FormatError, match="negative token id") as e:
        parse_ids([1, 2, -3], TOK)
    assert e.value.token_offset == 2


def test_parse_ids_eos_inside():
    ids = ids_of(B)
    k = len(TOK.encode(B[:B.index("cd")]))
    bad = ids[:k] + [EOS] + ids[k:]
    with pytest.raises(FormatError, match="EOS inside the response") as e:
        parse_ids(bad, TOK)
    assert e.value.token_offset == k and e.value.char_offset == B.index("cd")
    t = parse_ids(bad, TOK, strict=False)
    assert t.eos and any("EOS" in i for i in t.issues)
    assert statistics(t).total_tokens == len(bad)


def test_tag_id_map_needs_atomic_tags():
    from twlib.tokenizer import check_tags_atomic
    assert fmt.tag_id_map(TOK) == {v: k for k, v in check_tags_atomic(TOK).items()}


# ----------------------------------------------------------------------------------- extract_boxed
@pytest.mark.parametrize("text,answer", [
    ("<think>\n</think>\n\n\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("<think>\n</think>\n\n\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
    ("<think>\n</think>\n\\boxed{1} then \\boxed{2}", "2"),
    ("<think>\n\\boxed{9}</think>\n\\boxed{1} and \\boxed{x^{2}} done", "x^{2}"),
    ("<think>\n</think>\n\\boxed{1} then \\boxed{2", "1"),   # last one unclosed → the one before
    ("<think>\n\\boxed{9}</think>\n\n9", None),              # only before </think>
    ("<think>\n</think>\n\n", None),
    ("\\boxed{5}", None),                                   # no </think> at all
    ("</think>a</think>\\boxed{}", ""),                      # after the last </think>; empty box
    ("</think>\\boxed{1}</think>x", None),
])
def test_extract_boxed(text, answer):
    assert extract_boxed(text) == answer


def test_trajectory_answer():
    assert TRAJ_B.answer == "7" and TRAJ_C.answer == "x" and TRAJ_A.answer == "42"


# ------------------------------------------------------------------------------------ Hypothesis
SAFE = "".join(c for c in CHARACTERS if c != "<")  # no "<": no text can form a tag
_text = st.text(alphabet=SAFE, min_size=1, max_size=10)
_thread = st.text(alphabet=SAFE, min_size=1, max_size=10).filter(lambda s: s.strip())
_block = st.integers(1, 6).flatmap(lambda k: st.tuples(
    st.lists(st.text(alphabet=SAFE, max_size=6), min_size=k, max_size=k),
    st.lists(_thread, min_size=k, max_size=k)))
_answer = st.text(alphabet="0123456789abcxyz+-", min_size=1, max_size=4)


@st.composite
def trajectories(draw) -> Trajectory:
    parts = draw(st.lists(st.one_of(_text, _block), max_size=6))
    items: list = []
    pending = "<think>\n"
    for part in parts:
        if isinstance(part, str):
            pending += part
        else:
            if pending:
                items.append(Text(pending))
            items.append(Block.from_plan(*part))
            pending = ""
    pending += draw(st.sampled_from(["", "\n", "so\n"])) + f"</think>\n\n\\boxed{{{draw(_answer)}}}"
    items.append(Text(pending))
    return Trajectory(tuple(items))


HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYP
@given(trajectories())
def test_property_round_trip(traj):
    text = traj.render()
    assert parse(text) == traj
    assert parse(text, strict=False) == traj
    seg = segment_ids(traj, TOK)
    assert render_segments(seg.segments) == text
    from_ids = parse_ids(seg.ids, TOK)
    assert from_ids.items == traj.items and from_ids.eos
    assert not drift(traj, TOK).drifted
    s_text = statistics(parse(text, count=COUNT))
    s_ids = statistics(from_ids)
    assert s_ids.total_tokens == len(seg.ids) == s_text.total_tokens + 1
    assert s_ids.critical_path_tokens == s_text.critical_path_tokens + 1
    assert s_ids.sequential_tokens == s_text.sequential_tokens + 1
    assert s_ids.parallel_tokens == s_text.parallel_tokens
    assert s_ids.threads_per_block == s_text.threads_per_block == tuple(len(b.threads) for b in traj.blocks)
    assert s_text.critical_path_tokens <= s_text.total_tokens
    # a block's critical contribution is its longest thread plus the rest of the block
    if traj.blocks:
        assert s_text.critical_path_tokens < s_text.total_tokens or all(len(b.threads) == 1 for b in traj.blocks)


TAG_LIST = list(fmt.TAGS)


def _tag_spans(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in fmt.TAG_RE.finditer(text)]


@st.composite
def corrupted_texts(draw) -> str:
    text = draw(trajectories()).render()
    kind = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "truncate"]))
    n = len(text)
    if kind == "delete":
        i = draw(st.integers(0, n - 1))
        j = draw(st.integers(i + 1, min(n, i + 30)))
        return text[:i] + text[j:]
    if kind == "truncate":
        return text[:draw(st.integers(0, n - 1))]
    if kind == "insert":
        i = draw(st.integers(0, n))
        return text[:i] + draw(st.sampled_from(TAG_LIST)) + text[i:]
    spans = _tag_spans(text)
    if kind == "duplicate":
        a, b = draw(st.sampled_from(spans))
        return text[:b] + text[a:b] + text[b:]
    (a1, b1), (a2, b2) = sorted(draw(st.lists(st.sampled_from(spans), min_size=2, max_size=2, unique=True)))
    return text[:a1] + text[a2:b2] + text[b1:a2] + text[a1:b1] + text[b2:]


@HYP
@given(corrupted_texts())
def test_property_corrupted_text(text):
    try:
        strict = parse(text, count=COUNT)
    except FormatError as e:
        assert e.problem and e.char_offset is not None and 0 <= e.char_offset <= len(text)
        strict = None
    lenient = parse(text, strict=False, count=COUNT)  # must not raise
    assert statistics(lenient).total_tokens == len(TOK.encode(text))
    if strict is not None:
        assert lenient == strict and lenient.issues == ()
    else:
        assert lenient.issues


@st.composite
def corrupted_ids(draw) -> list[int]:
    ids = segment_ids(draw(trajectories()), TOK).ids
    tag_ids = sorted(fmt.tag_id_map(TOK))
    kind = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "truncate"]))
    n = len(ids)
    if kind == "delete":
        i = draw(st.integers(0, n - 1))
        j = draw(st.integers(i + 1, min(n, i + 10)))
        return ids[:i] + ids[j:]
    if kind == "truncate":
        return ids[:draw(st.integers(0, n - 1))]
    if kind == "insert":
        i = draw(st.integers(0, n))
        new = draw(st.one_of(st.sampled_from(tag_ids + [EOS]), st.integers(0, len(TOK) - 1)))
        return ids[:i] + [new] + ids[i:]
    where = [k for k, t in enumerate(ids) if t in tag_ids]
    if kind == "duplicate":
        k = draw(st.sampled_from(where))
        return ids[:k + 1] + [ids[k]] + ids[k + 1:]
    a, b = sorted(draw(st.lists(st.sampled_from(where), min_size=2, max_size=2, unique=True)))
    out = list(ids)
    out[a], out[b] = out[b], out[a]
    return out


@HYP
@given(corrupted_ids())
def test_property_corrupted_ids(ids):
    try:
        parse_ids(ids, TOK)
    except FormatError as e:
        assert e.problem and (e.token_offset is None or 0 <= e.token_offset <= len(ids))
    lenient = parse_ids(ids, TOK, strict=False)  # must not raise
    assert statistics(lenient).total_tokens == len(ids)


def test_dataclass_renders():
    assert Outline(2, " x").render() == "<Outline>2: x</Outline>"
    assert Thread(3, " y\n").render() == "<Thread>\n3: y\n</Thread>"
    assert Block.from_plan(["a"], ["b\n\n"]).threads[0].body == " b\n"
