"""twlib.tokenizer: the character tokenizer, tags on the Qwen vocabulary, segment-wise ids and drift
(docs/design.md §4, tokenisation co-design)."""
from __future__ import annotations

import copy
import random

import pytest

from twlib import format as fmt
from twlib.format import FormatError
from twlib.tasks import ExpressionParams, ProductParams, make_problem
from twlib.tokenizer import (
    CHAT_END,
    CHAT_START,
    END_OF_TEXT,
    UNKNOWN,
    Drift,
    add_tags,
    build_char_tokenizer,
    check_tags_atomic,
    drift,
    load_tokenizer,
    prompt_ids,
    qwen_tokenizer,
    save_tokenizer,
    segment_ids,
    tag_name,
    token_counter,
)

SAMPLE = ("<think>\nab\n<Parallel>\n<Outlines>\n<Outline>1: A</Outline>\n<Outline>2: B</Outline>\n</Outlines>\n"
          "<Thread>\n1: x=1+2\n</Thread><Thread>\n2: y\n</Thread>\n</Parallel>\nso 7\n</think>\n\n\\boxed{7}")


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


def kit_trajectories(n_per_family: int, seed: int = 0) -> list[fmt.Trajectory]:
    rng = random.Random(seed)
    out = []
    for family, params in (("expressions", ExpressionParams()), ("products", ProductParams())):
        out += [make_problem(family, rng, params).plan.parallel_trajectory() for _ in range(n_per_family)]
    return out


# ------------------------------------------------------------------------------ character tokenizer
def test_char_tokenizer_tags_and_boxed_are_one_token(char_tok):
    for piece in fmt.TAGS + (fmt.BOXED,):
        ids = char_tok.encode(piece, add_special_tokens=False)
        assert len(ids) == 1, piece
        assert char_tok.convert_ids_to_tokens(ids) == [piece]
    # inside text too, and neighbours stay one character each
    ids = char_tok.encode("a<Thread>\n1:\\boxed{2}", add_special_tokens=False)
    assert char_tok.convert_ids_to_tokens(ids) == ["a", "<Thread>", "\n", "1", ":", "\\boxed{", "2", "}"]
    # distinct ids for all of them
    assert len({char_tok.convert_tokens_to_ids(t) for t in fmt.TAGS + (fmt.BOXED,)}) == len(fmt.TAGS) + 1


def test_char_tokenizer_one_token_per_character(char_tok):
    text = "Az09 !~\n{}"
    ids = char_tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and char_tok.decode(ids) == text
    assert char_tok.unk_token_id not in ids


def test_char_tokenizer_tags_not_special_eos_special(char_tok):
    ids = char_tok.encode(SAMPLE + CHAT_END, add_special_tokens=False)
    assert char_tok.decode(ids, skip_special_tokens=True) == SAMPLE  # tags kept, <|im_end|> stripped
    assert char_tok.decode(ids, skip_special_tokens=False) == SAMPLE + CHAT_END
    assert char_tok.eos_token == CHAT_END and char_tok.pad_token == END_OF_TEXT
    assert char_tok.eos_token_id == char_tok.convert_tokens_to_ids(CHAT_END) == ids[-1]
    assert char_tok.eos_token_id in char_tok.all_special_ids
    assert not set(fmt.TAGS) & set(char_tok.all_special_tokens)
    assert {CHAT_END, END_OF_TEXT} <= set(char_tok.all_special_tokens)


def test_chat_template_exact(char_tok):
    text = char_tok.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False,
                                        add_generation_prompt=True)
    assert text == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    ids = prompt_ids(char_tok, "Q")
    # <|im_start|> "user\nQ"(6) <|im_end|> "\n" <|im_start|> "assistant\n"(10) = 20 tokens
    assert len(ids) == 20 and ids == char_tok.encode(text, add_special_tokens=False)
    assert ids[0] == ids[9] == char_tok.convert_tokens_to_ids(CHAT_START)
    assert ids[7] == char_tok.eos_token_id
    assert char_tok.decode(ids) == text


def test_save_load_round_trip(char_tok, tmp_path):
    path = save_tokenizer(char_tok, tmp_path / "tok")
    assert (path / "tokenizer.json").exists()
    loaded = load_tokenizer(path)
    for text in (SAMPLE, "<|im_start|>user\n12*3<|im_end|>", "é\\boxed{x}"):
        assert loaded.encode(text, add_special_tokens=False) == char_tok.encode(text, add_special_tokens=False)
    assert len(loaded) == len(char_tok) == 111
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == \
        (char_tok.eos_token_id, char_tok.pad_token_id, char_tok.unk_token_id)
    assert loaded.chat_template == char_tok.chat_template
    assert prompt_ids(loaded, "7+8") == prompt_ids(char_tok, "7+8")
    ids = loaded.encode(SAMPLE, add_special_tokens=False)
    assert loaded.decode(ids, skip_special_tokens=True) == SAMPLE
    check_tags_atomic(loaded)


def test_unknown_character_maps_to_unk(char_tok):
    unk = char_tok.unk_token_id
    assert char_tok.unk_token == UNKNOWN and unk is not None
    assert char_tok.encode("é", add_special_tokens=False) == [unk]
    a, b = char_tok.encode("ab", add_special_tokens=False)
    assert char_tok.encode("aéb", add_special_tokens=False) == [a, unk, b]
    assert char_tok.encode("日本", add_special_tokens=False) == [unk, unk]


def test_check_tags_atomic(char_tok):
    m = check_tags_atomic(char_tok)
    assert list(m) == list(fmt.TAGS)
    assert all(char_tok.encode(t, add_special_tokens=False) == [i] for t, i in m.items())
    assert fmt.tag_id_map(char_tok) == {i: t for t, i in m.items()}


def test_check_tags_atomic_rejects_special_tags():
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<Thread>"]})
    assert tok.encode("<Thread>", add_special_tokens=False) == [tok.convert_tokens_to_ids("<Thread>")]
    with pytest.raises(FormatError, match="<Thread> is a special token"):
        check_tags_atomic(tok)


def test_token_counter(char_tok):
    count = token_counter(char_tok)
    assert count("\\boxed{12}") == 4 and count("<Thread>\n1:") == 4 and count("") == 0


def test_segment_ids_spans(char_tok):
    traj = fmt.parse(SAMPLE)
    seg = segment_ids(traj, char_tok)
    assert len(seg.spans) == len(seg.segments) == 7
    assert seg.spans[0][0] == 0 and seg.spans[-1][1] == len(seg.ids)
    assert all(a[1] == b[0] for a, b in zip(seg.spans, seg.spans[1:]))
    for (a, b), s in zip(seg.spans[:-1], seg.segments[:-1]):
        assert char_tok.decode(seg.ids[a:b], skip_special_tokens=False) == s.text
    a, b = seg.spans[-1]
    assert seg.ids[b - 1] == char_tok.eos_token_id
    assert char_tok.decode(seg.ids[a:b - 1]) == seg.segments[-1].text
    assert seg.ids == char_tok.encode(SAMPLE, add_special_tokens=False) + [char_tok.eos_token_id]
    no_eos = segment_ids(traj, char_tok, eos=False)
    assert no_eos.ids == seg.ids[:-1] and no_eos.spans[-1] == (seg.spans[-1][0], seg.spans[-1][1] - 1)
    # the orchestrator's pieces: the header of thread 1 is tokens "\n" "<Thread>" "\n" "1" ":"
    a, b = seg.spans[1]
    assert char_tok.convert_ids_to_tokens(seg.ids[a:b]) == ["\n", "<Thread>", "\n", "1", ":"]


def test_char_drift_zero_on_kit_data(char_tok):
    trajs = kit_trajectories(100)
    assert sum(bool(t.blocks) for t in trajs) >= 50  # the generators do fork
    for t in trajs:
        d = drift(t, char_tok)
        assert isinstance(d, Drift) and not d.drifted and d.first_mismatch is None
        seg = segment_ids(t, char_tok).ids
        assert d.segment_tokens == d.whole_tokens == len(seg)
        back = fmt.parse_ids(seg, char_tok)
        assert back.items == t.items and fmt.statistics(back).total_tokens == len(seg)


def test_tag_name():
    assert tag_name("</Parallel>") == "/Parallel" and tag_name("<think>") == "think"


# --------------------------------------------------------------------------------- Qwen vocabulary
@pytest.fixture(scope="module")
def qwen_raw():
    return qwen_tokenizer()


@pytest.fixture(scope="module")
def qwen_tagged(qwen_raw):
    tok = copy.deepcopy(qwen_raw)
    added = add_tags(tok)
    return tok, added


def test_qwen_control_tokens_and_ids(qwen_raw):
    assert len(qwen_raw) == 151646
    assert qwen_raw.convert_tokens_to_ids([END_OF_TEXT, CHAT_START, CHAT_END]) == [151643, 151644, 151645]
    assert qwen_raw.eos_token_id == 151645 and qwen_raw.pad_token_id == 151643
    assert qwen_raw.encode("hello world", add_special_tokens=False) == [14990, 1879]
    assert qwen_raw.decode([14990, 1879]) == "hello world"
    assert prompt_ids(qwen_raw, "Q")[:1] == [151644] and prompt_ids(qwen_raw, "Q").count(151645) == 1


def test_qwen_raw_tags_not_atomic(qwen_raw):
    with pytest.raises(FormatError, match="tag <Parallel> encodes to 3 tokens"):
        check_tags_atomic(qwen_raw)
    with pytest.raises(FormatError, match="add_tags"):
        fmt.tag_id_map(qwen_raw)


def test_qwen_add_tags(qwen_raw, qwen_tagged):
    tok, added = qwen_tagged
    assert added == list(fmt.TAGS)
    assert len(tok) == 151646 + len(fmt.TAGS)
    m = check_tags_atomic(tok)
    assert sorted(m.values()) == list(range(151646, 151656))
    assert not set(m.values()) & set(tok.all_special_ids)
    ids = tok.encode(SAMPLE + CHAT_END, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == SAMPLE
    # ordinary text is tokenised as before
    assert tok.encode("hello world", add_special_tokens=False) == [14990, 1879]
    # idempotent: nothing left to add
    again = copy.deepcopy(tok)
    assert add_tags(again) == [] and len(again) == len(tok)
    assert len(qwen_raw) == 151646  # the raw fixture was not touched


def test_qwen_parse_ids_round_trip(qwen_tagged):
    tok, _ = qwen_tagged
    traj = fmt.parse(SAMPLE)
    seg = segment_ids(traj, tok)
    back = fmt.parse_ids(seg.ids, tok)
    assert back.items == traj.items and fmt.statistics(back).total_tokens == len(seg.ids)


def test_qwen_drift_on_kit_data(qwen_tagged):
    tok, _ = qwen_tagged
    trajs = kit_trajectories(4, seed=3)
    assert any(t.blocks for t in trajs)
    for t in trajs:
        d = drift(t, tok)
        seg = segment_ids(t, tok).ids
        whole = tok.encode(t.render(), add_special_tokens=False) + [tok.eos_token_id]
        assert isinstance(d, Drift)
        assert d.segment_tokens == len(seg) and d.whole_tokens == len(whole)
        assert d.drifted == (seg != whole)
        # docs/design.md §4: drift must be zero on all kit data (tags split the text, so BPE merges never cross)
        assert not d.drifted


def test_qwen_drift_detected_without_tags(qwen_raw):
    """With tags that are not atomic, BPE merges ">" with the next "\\n": segment ids differ."""
    t = next(t for t in kit_trajectories(10, seed=1) if t.blocks)
    d = drift(t, qwen_raw)
    seg = segment_ids(t, qwen_raw).ids
    whole = qwen_raw.encode(t.render(), add_special_tokens=False) + [qwen_raw.eos_token_id]
    assert d.drifted and seg != whole
    k = d.first_mismatch
    assert seg[:k] == whole[:k] and seg[k] != whole[k]
    assert (d.segment_tokens, d.whole_tokens) == (len(seg), len(whole))
    # the first mismatch is at the end of "</Outlines>": ">" + "\n" (segments) vs ">\n" (whole text)
    assert qwen_raw.convert_ids_to_tokens(whole[k:k + 1]) == [">Ċ"]
    assert qwen_raw.convert_ids_to_tokens(seg[k:k + 2]) == [">", "Ċ"]


def test_drift_length_only_mismatch(char_tok):
    """Whole-text ids that extend the segment ids: equal on the common part, mismatch at the shorter end."""
    traj = fmt.parse(SAMPLE)
    n = len(segment_ids(traj, char_tok).ids)

    class Longer:
        eos_token_id = char_tok.eos_token_id

        def encode(self, text, add_special_tokens=False):
            ids = char_tok.encode(text, add_special_tokens=False)
            return ids + [self.eos_token_id] if text == SAMPLE else ids

    d = drift(traj, Longer())
    assert (d.segment_tokens, d.whole_tokens) == (n, n + 1)
    assert d.first_mismatch == n and d.drifted
