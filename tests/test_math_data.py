"""Math dataset loaders on hand-written fixtures in each hub dataset's schema (no hub access needed)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from twlib.grading import grade
from twlib.tasks.math_data import (
    BENCHMARKS,
    INSTRUCTION_SUFFIX,
    REGISTRY,
    HubLoadError,
    MathDataError,
    load_benchmarks,
    load_math,
    normalize_answer,
    prompt_rows,
    resolve_name,
)

FIXTURES = Path(__file__).parent / "fixtures" / "math"
PATHS = {"polaris": FIXTURES / "polaris.jsonl", "aime24": FIXTURES / "aime24.jsonl",
         "aime25": FIXTURES / "aime25.jsonl", "amc23": FIXTURES / "amc23.jsonl",
         "math500": FIXTURES / "math500.jsonl", "minerva": FIXTURES / "minerva.jsonl",
         "olympiadbench": FIXTURES / "olympiadbench"}

# (question start, gold answer) per fixture row, in file order.
EXPECTED = {
    "polaris": [("Find the number of positive divisors", "24"), ("Let $f(x) = x^2 - 6x + 13$", "4"),
                ("Simplify $\\sqrt{50}", "8\\sqrt{2}"), ("A fair coin is tossed", "\\frac{3}{8}")],
    "aime24": [("Find the number of ordered pairs", "30"), ("Let $S$ be the sum", "418"),
               ("A rectangle has perimeter", "400")],
    "aime25": [("Find the sum of all positive integers $n$", "22"), ("How many subsets", "144"),
               ("In triangle $ABC$", "336"), ("Let $r$, $s$, $t$", "35")],
    "amc23": [("What is the value of", "6"), ("How many positive perfect cubes", "5"),
              ("A bag holds", "17"), ("A cyclist rides", "1.25")],
    "math500": [("What is the slope", "3"), ("Solve for $x$", "10"),
                ("Convert the point $(0, -4)$", "\\left( 4, \\frac{3\\pi}{2} \\right)"),
                ("Find the domain", "[3,\\infty)"), ("What is the largest prime factor", "17")],
    "minerva": [("A star has a measured parallax", "20"), ("Compute the wavelength", "500"),
                ("An ideal gas", "3"), ("A first-order reaction", "10^{-3}")],
    "olympiadbench": [("Compute the number of positive integers", "33"), ("Find all real numbers $x$", "2, 3"),
                      ("Let $T=7$", "28"), ("Determine the set of all real $x$", "(1, \\infty)")],
}


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf-cache")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", list(REGISTRY))
def test_fixture_rows_normalise_exactly(name, cache):
    ds = load_math(name, path=PATHS[name], cache_dir=cache)
    assert ds.column_names == ["id", "question", "answer", "source"]
    assert {str(f.dtype) for f in ds.features.values()} == {"string"}
    rows = ds.to_list()
    assert [r["id"] for r in rows] == [f"{name}-{i}" for i in range(len(EXPECTED[name]))]
    assert [r["answer"] for r in rows] == [a for _, a in EXPECTED[name]]
    assert all(r["source"] == name for r in rows)
    for row, (start, _) in zip(rows, EXPECTED[name]):
        assert row["question"].startswith(start), (row["question"], start)


def test_one_full_row_per_kind(cache):
    assert load_math("aime24", PATHS["aime24"], cache_dir=cache)[1] == {
        "id": "aime24-1", "source": "aime24", "answer": "418",
        "question": "Let $S$ be the sum of all positive integers $n \\le 100$ that are divisible by $3$ or $5$. "
                    "Find the remainder when $S$ is divided by $1000$."}
    assert load_math("olympiadbench", PATHS["olympiadbench"], cache_dir=cache)[1] == {
        "id": "olympiadbench-1", "source": "olympiadbench", "answer": "2, 3",
        "question": "Find all real numbers $x$ such that $x^{2}-5 x+6=0$."}


def test_fixtures_keep_the_hub_value_types(cache):
    """The fixtures carry the hub's types (int / float / list answers), so the normalisation is tested."""
    import datasets

    def raw(name):
        path = PATHS[name]
        if path.is_dir():
            return datasets.load_dataset(str(path), REGISTRY[name].config, split="train", cache_dir=cache)
        return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache)

    assert str(raw("aime25").features["answer"].dtype) == "int64"
    assert str(raw("amc23").features["answer"].dtype) == "float64"
    assert str(raw("aime24").features["answer"].dtype) == "string"
    assert str(raw("math500").features["level"].dtype) == "int64"
    obench = raw("olympiadbench")
    assert isinstance(obench.features["final_answer"], datasets.List)
    assert obench[1]["final_answer"] == ["$2$", "$3$"]
    for name, source in REGISTRY.items():
        assert {source.question, source.answer} <= set(raw(name).column_names), name


def test_normalize_answer_values():
    assert normalize_answer(["$(1, \\infty)$"]) == "(1, \\infty)"
    assert normalize_answer(["$2$", "$3$"]) == "2, 3"
    assert normalize_answer(["$(1,2), (3,4)$"]) == "(1,2), (3,4)"
    assert normalize_answer(["", None, "7"]) == "7"
    assert normalize_answer(144) == "144"
    assert normalize_answer(-3) == "-3"
    assert normalize_answer(17.0) == "17"
    assert normalize_answer(1.25) == "1.25"
    assert normalize_answer(" 8\\sqrt{2} ") == "8\\sqrt{2}"
    assert normalize_answer("$$x+1$$") == "x+1"
    assert normalize_answer("$2$ or $3$") == "$2$ or $3$"  # several $-spans: left as written
    assert normalize_answer("$") == "$"
    for empty in (None, "", "  ", [], float("nan")):
        assert normalize_answer(empty) == ""
    with pytest.raises(MathDataError, match="boolean"):
        normalize_answer(True)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_grading_accepts_each_gold_boxed(name, cache):
    for row in load_math(name, path=PATHS[name], cache_dir=cache):
        response = f"<think>\nworking\n</think>\n\nThe answer is \\boxed{{{row['answer']}}}."
        result = grade(response, row["answer"])
        assert result.correct, (name, row["answer"], result)
        assert not grade("<think>\n</think>\n\\boxed{123456789}", row["answer"]).correct


def test_limit_keeps_the_first_rows_and_their_ids(cache):
    ds = load_math("math500", PATHS["math500"], limit=2, cache_dir=cache)
    assert ds["id"] == ["math500-0", "math500-1"] and ds["answer"] == ["3", "10"]
    assert len(load_math("math500", PATHS["math500"], limit=99, cache_dir=cache)) == 5
    with pytest.raises(MathDataError, match="limit"):
        load_math("math500", PATHS["math500"], limit=-1, cache_dir=cache)


def test_names_are_read_loosely():
    assert resolve_name("AIME24") == "aime24"
    assert resolve_name("MathArena/aime_2025") == "aime25"
    assert resolve_name("Minerva-Math") == "minerva"
    assert resolve_name("OlympiadBench") == "olympiadbench"


def test_parquet_and_save_to_disk_copies_load_the_same(tmp_path, cache):
    import datasets

    raw = datasets.load_dataset("json", data_files=str(PATHS["amc23"]), split="train", cache_dir=cache)
    expected = load_math("amc23", PATHS["amc23"], cache_dir=cache).to_list()
    raw.to_parquet(str(tmp_path / "amc23.parquet"))
    assert load_math("amc23", tmp_path / "amc23.parquet", cache_dir=cache).to_list() == expected
    raw.save_to_disk(str(tmp_path / "disk"))
    assert load_math("amc23", tmp_path / "disk").to_list() == expected
    datasets.DatasetDict({"test": raw, "extra": raw.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert load_math("amc23", tmp_path / "dict").to_list() == expected  # the registry split, "test"
    assert len(load_math("amc23", tmp_path / "dict", split="extra")) == 1
    datasets.DatasetDict({"a": raw, "b": raw}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(MathDataError, match=r"splits \['a', 'b'\].*split="):
        load_math("amc23", tmp_path / "two")


def test_context_column_goes_before_the_question(tmp_path, cache):
    f = _write_jsonl(tmp_path / "ob.jsonl", [
        {"id": 1, "question": "Find $x$.", "final_answer": ["$4$"], "context": "Let $x = 2^2$."},
        {"id": 2, "question": "Find $y$.", "final_answer": ["$5$"], "context": None}])
    ds = load_math("olympiadbench", f, cache_dir=cache)
    assert ds["question"] == ["Let $x = 2^2$.\nFind $x$.", "Find $y$."]
    assert ds["answer"] == ["4", "5"]


def test_unknown_name_suggests_the_closest():
    with pytest.raises(MathDataError, match=r"unknown math dataset 'aime2024' \(did you mean 'aime24'\?\)"):
        load_math("aime2024")
    with pytest.raises(MathDataError, match="known: polaris, aime24"):
        resolve_name("gsm8k")


def test_missing_column_names_the_column_and_the_expected_schema(tmp_path, cache):
    f = _write_jsonl(tmp_path / "wrong.jsonl", [{"question": "1+1?", "answer": "2"}])
    with pytest.raises(MathDataError, match=r"aime24: column 'problem' not found in .*wrong\.jsonl.*"
                                            r"HuggingFaceH4/aime_2024"):
        load_math("aime24", f, cache_dir=cache)


def test_empty_and_unreadable_inputs(tmp_path, cache):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    for name in ("empty.jsonl", "blank.jsonl"):
        with pytest.raises(MathDataError, match=rf"minerva: .*{name} is empty"):
            load_math("minerva", tmp_path / name, cache_dir=cache)
    with pytest.raises(MathDataError, match="no such file"):
        load_math("minerva", tmp_path / "absent.jsonl")
    (tmp_path / "data.txt").write_text("question")
    with pytest.raises(MathDataError, match="cannot read"):
        load_math("minerva", tmp_path / "data.txt")
    (tmp_path / "broken.jsonl").write_text('{"question": "1+1?", "answer": \n')
    with pytest.raises(MathDataError, match=r"could not read .*broken\.jsonl"):
        load_math("minerva", tmp_path / "broken.jsonl", cache_dir=cache)


def test_zero_row_file_is_an_error(tmp_path, cache):
    import datasets

    empty = datasets.Dataset.from_dict({"question": [], "answer": []},
                                       features=datasets.Features({"question": datasets.Value("string"),
                                                                   "answer": datasets.Value("string")}))
    empty.to_parquet(str(tmp_path / "zero.parquet"))
    with pytest.raises(MathDataError, match=r"minerva: could not read .*zero\.parquet.*no data"):
        load_math("minerva", tmp_path / "zero.parquet", cache_dir=cache)
    empty.save_to_disk(str(tmp_path / "zero"))
    with pytest.raises(MathDataError, match=r"minerva: could not read .*zero"):
        load_math("minerva", tmp_path / "zero")


def test_empty_rows_raise_or_are_dropped_with_a_count(tmp_path, cache):
    f = _write_jsonl(tmp_path / "gaps.jsonl", [
        {"question": "1+1?", "answer": "2"}, {"question": "  ", "answer": "3"},
        {"question": "2+2?", "answer": ""}, {"question": "3+3?", "answer": None}, {"question": "4+4?", "answer": "8"}])
    with pytest.raises(MathDataError, match=r"minerva: row 1 of .*gaps\.jsonl has an empty 'question'.*drop_empty"):
        load_math("minerva", f, cache_dir=cache)
    g = _write_jsonl(tmp_path / "gap2.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "x", "answer": "1"},
                                              {"question": "2+2?", "answer": " "}])
    with pytest.raises(MathDataError, match=r"row 2 of .*gap2\.jsonl has an empty 'answer'"):
        load_math("minerva", g, cache_dir=cache)
    with pytest.warns(UserWarning, match=r"minerva: dropped 3 of 5 rows .*\(rows 1, 2, 3\)"):
        ds = load_math("minerva", f, drop_empty=True, cache_dir=cache)
    assert ds["id"] == ["minerva-0", "minerva-4"] and ds["answer"] == ["2", "8"]


def test_hub_unreachable_error_names_the_dataset_and_the_path_argument(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubLoadError) as info:
        load_math("olympiadbench", cache_dir=str(tmp_path / "empty-cache"))
    message = str(info.value)
    assert "'Hothan/OlympiadBench'" in message and "'OE_TO_maths_en_COMP'" in message
    assert "split 'train'" in message and "path=" in message and "huggingface-cli download" in message
    assert info.value.__cause__ is not None


def test_benchmarks_concatenate_with_sources_and_limits(cache):
    paths = {k: v for k, v in PATHS.items() if k != "polaris"}
    ds = load_benchmarks(paths, cache_dir=cache)
    assert ds.column_names == ["id", "question", "answer", "source"]
    counts = {name: ds["source"].count(name) for name in BENCHMARKS}
    assert counts == {name: len(EXPECTED[name]) for name in BENCHMARKS}
    assert len(set(ds["id"])) == len(ds)
    small = load_benchmarks(paths, limit={"math500": 1, "AIME25": 2}, cache_dir=cache)
    assert [small["source"].count(n) for n in BENCHMARKS] == [3, 2, 4, 1, 4, 4]
    assert load_benchmarks(paths, limit=1, names=["amc23", "minerva"], cache_dir=cache)["id"] == \
        ["amc23-0", "minerva-0"]
    assert "polaris" not in load_benchmarks(PATHS, cache_dir=cache)["source"]  # only the benchmarks asked for
    with pytest.raises(MathDataError, match="did you mean 'math500'"):
        load_benchmarks({"math5000": PATHS["math500"]}, cache_dir=cache)


def test_prompt_rows_are_chat_messages_with_the_boxed_instruction(cache):
    ds = prompt_rows(load_math("aime25", PATHS["aime25"], cache_dir=cache))
    assert ds.column_names == ["prompt", "answer", "id", "source"]
    first = ds[0]
    assert first["prompt"] == [{"role": "user", "content": "Find the sum of all positive integers $n$ such that "
                                "$n + 2$ divides $n^2 + 12$. Let's think step by step and output the final "
                                "answer within \\boxed{}."}]
    assert (first["answer"], first["id"], first["source"]) == ("22", "aime25-0", "aime25")
    assert INSTRUCTION_SUFFIX.endswith("within \\boxed{}.")
    custom = prompt_rows(load_math("aime25", PATHS["aime25"], limit=1, cache_dir=cache), suffix="\nAnswer:")
    assert custom[0]["prompt"][0]["content"].endswith("$n^2 + 12$.\nAnswer:")
    with pytest.raises(MathDataError, match="missing \\['question'\\]"):
        prompt_rows(ds)


def test_importing_the_module_does_not_import_datasets():
    code = "import sys, twlib.tasks.math_data; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registry_entries_are_complete():
    assert set(BENCHMARKS) | {"polaris"} == set(REGISTRY)
    for name, s in REGISTRY.items():
        assert s.name == name and "/" in s.hub_id and s.split in ("train", "test")
        assert s.answer_kind in ("text", "integer", "float", "list")
    assert math.isclose(float(normalize_answer(0.1)), 0.1)
