"""The authors' released SFT data as a training source (`twlib.tasks.release`), on hand-written rows and on the
tiny fixture in the release's schema (tests/fixtures/release, written by make_release_fixture.py; no hub access)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from twlib.format import Block, Text, Trajectory, parse
from twlib.tasks.release import (
    HUB_ID,
    OPTIONAL_COLUMNS,
    HubLoadError,
    Rejected,
    ReleaseDataError,
    load_release,
    normalise,
    release_dataset,
    release_examples,
    release_for_stage,
)

FIXTURES = Path(__file__).parent / "fixtures" / "release"
ANSWER = "So $A+B=7$.\n\n$\\boxed{7}$"
# The canonical reasoning of the hand-written rows, and its layout built by twlib.format itself.
REASONING = ("A and B are independent.\n<Parallel>\n<Outlines>\n<Outline>1: Compute A.</Outline>\n"
             "<Outline>2: Compute B.</Outline>\n</Outlines>\n<Thread>\n1: A=1+2\n=3\n</Thread><Thread>\n"
             "2: B=4\n</Thread>\n</Parallel>\nA+B=7.")
EXPECTED = Trajectory((Text("<think>\nA and B are independent.\n"),
                       Block.from_plan(["Compute A.", "Compute B."], ["A=1+2\n=3", "B=4"]),
                       Text(f"\nA+B=7.\n</think>\n\n{ANSWER}"))).render()


def _row(reasoning: str, content: str = ANSWER, **extra) -> dict:
    return {"uuid": "u", "question": "A=1+2, B=4. A+B?", "response_reasoning": reasoning,
            "response_content": content, **extra}


def _fixture_script():
    spec = importlib.util.spec_from_file_location("make_release_fixture", FIXTURES / "make_release_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf-cache")


def test_canonical_rows_are_rendered_as_the_format_renders_them():
    assert normalise(_row(REASONING)) == (EXPECTED, ())
    two = ("Sums.\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n<Outline>3: c</Outline>\n"
           "</Outlines>\n<Thread>\n1: 1+2=3\n</Thread><Thread>\n2: 3+4=7\n</Thread><Thread>\n3: 5*6=30\n</Thread>\n"
           "</Parallel>\nThen\n<Parallel>\n<Outlines>\n<Outline>1: d</Outline>\n</Outlines>\n<Thread>\n1: 40\n"
           "</Thread>\n</Parallel>\ndone")
    expected = Trajectory((Text("<think>\nSums.\n"), Block.from_plan("abc", ["1+2=3", "3+4=7", "5*6=30"]),
                           Text("\nThen\n"), Block.from_plan(["d"], ["40"]),
                           Text("\ndone\n</think>\n\n\\boxed{40}"))).render()
    text, variants = normalise(_row(two, "\\boxed{40}"))
    assert (text, variants) == (expected, ())
    assert parse(text, strict=True).render() == text and len(parse(text).blocks) == 2


@pytest.mark.parametrize("reasoning, content, variants", [
    (REASONING.replace("</Thread><Thread>", "</Thread>\n<Thread>"), ANSWER, ("whitespace/between_threads",)),
    (REASONING.replace("</Thread><Thread>", "</Thread>\n\n  <Thread>"), ANSWER, ("whitespace/between_threads",)),
    (REASONING.replace("<Outline>1: ", "<Outline>1:").replace("<Outline>2: ", "<Outline>2:"), ANSWER,
     ("outline_no_space",)),
    (REASONING.replace("\n1: A", "\n1:A").replace("\n2: B", "\n2:B"), ANSWER, ("thread_no_space",)),
    (f"<think>\n{REASONING}\n</think>", ANSWER, ("think_tags_in_reasoning",)),
    (f"<think>\n{REASONING}", ANSWER, ("think_tags_in_reasoning",)),
    (REASONING.replace("\n", "\r\n"), ANSWER.replace("\n", "\r\n"), ("crlf",)),
    (REASONING.replace("<Parallel>\n", "<Parallel>"), ANSWER, ("whitespace/after_parallel",)),
    (REASONING.replace("<Outlines>\n", "<Outlines>  "), ANSWER, ("whitespace/after_outlines_open",)),
    (REASONING.replace("</Outline>\n", "</Outline>\n\n"), ANSWER, ("whitespace/after_outline",)),
    (REASONING.replace("</Outlines>\n", "</Outlines>\n\n"), ANSWER, ("whitespace/after_outlines_close",)),
    (REASONING.replace("</Thread>\n</Parallel>", "</Thread>\n\n</Parallel>"), ANSWER, ("whitespace/after_threads",)),
    (REASONING.replace("<Outline>1: Compute A.", "<Outline>\n1:  Compute A.  "), ANSWER, ("outline_whitespace",)),
    (REASONING.replace("<Thread>\n1: ", "<Thread>1: "), ANSWER, ("thread_whitespace",)),
    (REASONING.replace("2: B=4\n", "2:\nB=4\n\n"), ANSWER, ("thread_whitespace",)),
    (REASONING.replace("2: B=4\n", "2:B=4\n\n"), ANSWER, ("thread_no_space", "thread_whitespace")),
    (f"\n{REASONING}\n\n", f"\n\n{ANSWER}\n", ("reasoning_edge_whitespace", "answer_edge_whitespace")),
])
def test_each_layout_variant_is_named_and_fixed(reasoning, content, variants):
    assert normalise(_row(reasoning, content)) == (EXPECTED, variants)


BLOCK = REASONING[REASONING.index("<Parallel>"):REASONING.index("</Parallel>") + len("</Parallel>")]


@pytest.mark.parametrize("reasoning, content, reason, detail", [
    (REASONING.replace("=3\n</Thread>", "=3\n"), ANSWER, "format/unclosed_thread", "nested <Thread> inside thread 1"),
    (REASONING.replace("B=4\n</Thread>\n</Parallel>", "B=4\n"), ANSWER, "format/unclosed_thread",
     "nested </think> inside thread 2"),
    (REASONING.replace("A.</Outline>", "A."), ANSWER, "format/unclosed_outline", "inside outline 1"),
    (REASONING.replace("<Thread>\n2: B=4\n</Thread>", ""), ANSWER, "format/count_mismatch", "2 outlines but 1 threads"),
    (REASONING.replace("2: B=4", "3: B=4"), ANSWER, "format/thread_numbers", "thread numbers [1, 3]"),
    (REASONING.replace("1: A=1+2", "A=1+2"), ANSWER, "format/missing_number", "thread 1 does not start with"),
    (REASONING.replace("2: B=4\n", "2: \n"), ANSWER, "format/empty_thread", "thread 2 is empty"),
    (REASONING.replace("</Thread><Thread>", "</Thread>and<Thread>"), ANSWER, "format/text_in_block",
     "text between threads"),
    (REASONING.replace("1: A=1+2\n", "1: A=1+2\n" + BLOCK), ANSWER, "format/nested_block", "nested <Parallel>"),
    ("x</Thread>", ANSWER, "format/stray_tag", "unexpected </Thread> outside"),
    ("a <think> b", ANSWER, "format/think_tags", "<think> appears more than once"),
    (REASONING, "So A+B=7.", "answer/no_boxed", "'So A+B=7.'"),
    (REASONING, "\\boxed{7", "answer/no_boxed", "no complete"),
    (REASONING, " \n", "answer/empty", "response_content is empty"),
    ("\n \n", ANSWER, "reasoning/empty", "response_reasoning is empty"),
    (None, ANSWER, "reasoning/empty", "response_reasoning is empty"),
])
def test_rows_that_cannot_be_fixed_are_rejected_with_a_reason(reasoning, content, reason, detail):
    with pytest.raises(Rejected) as info:
        normalise(_row(reasoning, content))
    assert info.value.reason == reason and detail in info.value.detail


def test_the_fixture_report(cache):
    examples, report = release_examples(load_release(path=FIXTURES, cache_dir=cache))
    rejected = report.pop("rejected")
    assert report == {
        "rows": 14, "accepted": 9,
        "rejected_by_reason": {"answer/no_boxed": 1, "format/count_mismatch": 1, "format/nested_block": 1,
                               "format/unclosed_thread": 1, "reasoning/empty": 1},
        "variants": {"answer_edge_whitespace": 1, "crlf": 1, "outline_no_space": 1, "outline_whitespace": 1,
                     "reasoning_edge_whitespace": 1, "think_tags_in_reasoning": 1, "thread_no_space": 1,
                     "thread_whitespace": 1, "whitespace/after_outline": 1, "whitespace/after_outlines_close": 1,
                     "whitespace/after_outlines_open": 1, "whitespace/after_parallel": 1,
                     "whitespace/after_threads": 1, "whitespace/between_threads": 1},
        "missing_optional_columns": [], "incorrect_kept": 1, "without_blocks": 1}
    assert [(r["id"], r["reason"]) for r in rejected] == [
        ("r10", "format/unclosed_thread"), ("r11", "format/count_mismatch"), ("r12", "answer/no_boxed"),
        ("r13", "reasoning/empty"), ("r14", "format/nested_block")]
    assert [e["id"] for e in examples] == [f"r0{i}" for i in range(1, 10)]
    assert [e["answer"] for e in examples] == ["7", "8", "7", "7", "7", "7", "7", "7", "5"]
    # Every variant row of the one-block trajectory normalises to the canonical row's text.
    assert {e["text"] for e in examples if e["id"] not in ("r02", "r09")} == {examples[0]["text"]}
    for e in examples:
        assert parse(e["text"], strict=True).answer == e["answer"]


def test_the_fixture_files_are_what_the_script_writes(cache):
    script = _fixture_script()
    for subset, rows in (("sample_964", script.ROWS), ("sample_964_8x", script.ROWS_8X)):
        loaded = load_release(path=FIXTURES, subset=subset, cache_dir=cache)
        assert loaded.column_names == ["uuid", "question", "response_reasoning", "response_content",
                                       *OPTIONAL_COLUMNS]
        assert loaded.to_list() == script.records(rows)


def test_subsets_and_repeated_uuids_get_unique_ids(cache):
    examples, report = release_examples(load_release(path=FIXTURES, subset="sample_964_8x", cache_dir=cache))
    assert [e["id"] for e in examples] == ["r01-0", "r01-1", "r02"] and report["accepted"] == 3
    assert examples[0]["text"] != examples[1]["text"]


def test_local_copies_in_every_layout_read_the_same(tmp_path, cache):
    reference = load_release(path=FIXTURES, cache_dir=cache).to_list()
    jsonl = tmp_path / "copy.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in reference))
    disk = tmp_path / "disk"
    load_release(path=FIXTURES, cache_dir=cache).save_to_disk(str(disk))
    for source in (FIXTURES / "sample_964", FIXTURES / "sample_964" / "train.parquet", jsonl, disk):
        assert load_release(path=source, cache_dir=cache).to_list() == reference, source
    assert load_release(str(FIXTURES), cache_dir=cache).num_rows == 14  # a path given as the source


def test_bad_local_copies_are_named(tmp_path, cache):
    with pytest.raises(ReleaseDataError, match=r"no such file or folder: .*nowhere"):
        load_release(path=tmp_path / "nowhere", cache_dir=cache)
    with pytest.raises(ReleaseDataError, match=r"no sample_1/train.parquet .*subsets found there: "
                                               r"\['sample_964', 'sample_964_8x'\]"):
        load_release(path=FIXTURES, subset="sample_1", cache_dir=cache)
    (tmp_path / "rows.csv").write_text("uuid\n1\n")
    with pytest.raises(ReleaseDataError, match="cannot read .*rows.csv"):
        load_release(path=tmp_path / "rows.csv", cache_dir=cache)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ReleaseDataError, match="could not read .*bad.jsonl"):
        load_release(path=tmp_path / "bad.jsonl", cache_dir=cache)


def test_missing_columns_are_named_with_the_columns_found(tmp_path, cache):
    f = tmp_path / "partial.jsonl"
    f.write_text(json.dumps({"question": "q", "response_reasoning": "r", "qwen_text": "t"}) + "\n")
    with pytest.raises(ReleaseDataError) as info:
        load_release(path=f, cache_dir=cache)
    message = str(info.value)
    assert "missing the column(s) ['uuid', 'response_content']" in message
    assert "found ['question', 'response_reasoning', 'qwen_text']" in message and HUB_ID in message
    with pytest.raises(ReleaseDataError, match=r"missing the column\(s\) \['response_reasoning'\]"):
        release_examples([{"uuid": "u", "question": "q", "response_content": "\\boxed{1}"}])


def test_absent_optional_columns_are_reported():
    examples, report = release_examples([_row(REASONING, qwen_text="...")])
    assert report["missing_optional_columns"] == [c for c in OPTIONAL_COLUMNS if c != "qwen_text"]
    assert report["accepted"] == 1 and report["incorrect_kept"] == 0 and examples[0]["id"] == "u"


def test_incorrect_rows_are_kept_and_counted_unless_asked(cache):
    rows = load_release(path=FIXTURES, cache_dir=cache)
    _, kept = release_examples(rows)
    examples, dropped = release_examples(rows, keep_incorrect=False)
    assert kept["incorrect_kept"] == 1 and dropped["incorrect_kept"] == 0
    assert dropped["rejected_by_reason"]["correctness/false"] == 1 and "r09" not in {e["id"] for e in examples}


def test_hub_unreachable_error_names_the_local_alternative(monkeypatch, cache):
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubLoadError) as info:
        load_release(subset="sample_964_8x", cache_dir=cache)
    message = str(info.value)
    assert f"'{HUB_ID}'" in message and "sample_964_8x/train.parquet" in message
    assert "path=DIR" in message and "release_data" in message and "huggingface-cli download" in message
    assert isinstance(info.value.__cause__, ConnectionError)
    assert calls[0][0] == (HUB_ID,) and calls[0][1]["data_files"] == "sample_964_8x/train.parquet"


def test_the_kit_trains_on_every_accepted_example(cache):
    from twlib.sft import trajectory_tries
    from twlib.tokenizer import build_char_tokenizer

    examples, _ = release_examples(load_release(path=FIXTURES, cache_dir=cache))
    tries = trajectory_tries(examples, build_char_tokenizer())
    assert len(tries) == len(examples) == 9


def test_release_dataset_feeds_notebook_02(cache):
    from twlib.sft import dataset_examples

    ds = release_dataset(path=FIXTURES, cache_dir=cache)
    assert ds.column_names == ["id", "question", "answer", "prompt", "completion"]
    examples, _ = release_examples(load_release(path=FIXTURES, cache_dir=cache))
    assert dataset_examples(ds, parallel=True) == [{"question": e["question"], "text": e["text"]} for e in examples]
    assert ds[0]["completion"] == [{"role": "assistant", "content": examples[0]["text"]}]
    assert ds[0]["prompt"] == [{"role": "user", "content": examples[0]["question"]}] and ds["answer"][1] == "8"
    assert release_dataset(path=FIXTURES, cache_dir=cache, limit=2)["id"] == ["r01", "r02"]


def test_stage_parameters_read_a_path_under_the_root_or_a_hub_id(monkeypatch, cache):
    from types import SimpleNamespace

    root = Path(__file__).resolve().parents[1]
    cfg = SimpleNamespace(release_data="tests/fixtures/release", release_subset="sample_964_8x", release_limit=2)
    assert release_for_stage(cfg, root=root, cache_dir=cache)["id"] == ["r01-0", "r01-1"]
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(HubLoadError, match="subset 'sample_964'"):
        release_for_stage(SimpleNamespace(release_data=HUB_ID, release_subset="sample_964"), root=root)


def test_a_release_with_nothing_usable_is_an_error(tmp_path, cache):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(_row("", "none")) + "\n")
    with pytest.raises(ReleaseDataError, match=r"no release row was accepted.*'reasoning/empty': 1"):
        release_dataset(path=f, cache_dir=cache)


def test_importing_the_module_stays_light():
    code = ("import sys, twlib.tasks.release; "
            "print([m for m in ('datasets', 'torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
