"""Stage 01 with ``source: math``: config fields, the real-math split builder on the fixtures, and a
papermill run of notebooks/01_trajectories.ipynb that reads the fixtures folder."""
import json
import re

import pytest
import yaml
from test_math_data import FIXTURES
from test_notebooks import ROOT

from twlib import dataset, pipeline
from twlib.config import ConfigError, TrajectoriesConfig
from twlib.tasks.math_data import (
    BENCHMARKS,
    INSTRUCTION_SUFFIX,
    SPLIT_COLUMNS,
    MathDataError,
    build_math_dataset,
    load_math,
    local_path,
    math_dataset,
    math_statistics,
)

# Rows of each fixture file (tests/fixtures/math).
FIXTURE_ROWS = {"polaris": 4, "aime24": 3, "aime25": 4, "amc23": 4, "math500": 5, "minerva": 4, "olympiadbench": 4}


def make(**kw) -> TrajectoriesConfig:
    return TrajectoriesConfig.from_dict({"profile": "x", **kw})


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf-cache")


# ------------------------------------------------------------------------------------------ config
def test_math_fields_default_to_the_synthetic_pipeline():
    cfg = make()
    assert cfg.source == "synthetic" and cfg.math_train == "polaris" and cfg.math_data_dir == ""
    assert cfg.math_benchmarks == list(BENCHMARKS) and cfg.math_validation == 200 and cfg.math_drop_empty is False
    names = TrajectoriesConfig.names()
    assert names[-6:] == ["source", "math_train", "math_benchmarks", "math_data_dir", "math_validation",
                          "math_drop_empty"]


def test_good_math_values():
    cfg = make(source="math", n_train=0, n_test=0, math_train="Polaris",
               math_benchmarks=["MATH-500", "HuggingFaceH4/aime_2024"], math_data_dir="tests/fixtures/math",
               math_validation=1, math_drop_empty=True)
    assert cfg.n_train == 0 and cfg.math_benchmarks == ["MATH-500", "HuggingFaceH4/aime_2024"]


def test_synthetic_sizes_still_need_one_row():
    with pytest.raises(ConfigError, match=r"'n_train' must be >= 1, got 0"):
        make(n_train=0)
    with pytest.raises(ConfigError, match=r"'n_test' must be >= 1, got 0"):
        make(n_test=0)


@pytest.mark.parametrize("params, message", [
    ({"source": "real"}, r"'source' must be 'synthetic' or 'math', got 'real'"),
    ({"source": "math", "n_train": -1}, r"'n_train' must be >= 0 \(0: all\) when source is 'math', got -1"),
    ({"source": "math", "n_test": -2}, r"'n_test' must be >= 0 \(0: all\) when source is 'math', got -2"),
    ({"math_train": "polars"}, r"'math_train' names an unknown math dataset 'polars' \(did you mean 'polaris'\?\)"),
    ({"math_benchmarks": ["aime24", "minrva"]},
     r"'math_benchmarks' names an unknown math dataset 'minrva' \(did you mean 'minerva'\?\)"),
    ({"math_benchmarks": []}, r"'math_benchmarks' must name at least one benchmark"),
    ({"math_benchmarks": ["aime24", "AIME-24"]}, r"'math_benchmarks' repeats a benchmark"),
    ({"math_benchmarks": "aime24"}, r"'math_benchmarks' must be list\[str\], got str"),
    ({"math_train": "math500"}, r"'math_train' is also in math_benchmarks \('math500'\)"),
    ({"math_data_dir": "data/ "}, r"'math_data_dir' must not start or end with spaces"),
    ({"math_validation": 0}, r"'math_validation' must be >= 1, got 0"),
    ({"math_drop_empty": "yes"}, r"'math_drop_empty' must be bool, got str 'yes'"),
    ({"math_validaton": 5}, r"unknown parameter 'math_validaton' \(did you mean 'math_validation'\?\)"),
])
def test_bad_math_values_are_named(params, message):
    with pytest.raises(ConfigError, match=message):
        make(**params)


# ------------------------------------------------------------------------------------------ builder
def test_local_paths_in_the_fixtures_folder(tmp_path):
    assert local_path(FIXTURES, "MATH-500") == FIXTURES / "math500.jsonl"
    assert local_path(FIXTURES, "olympiadbench") == FIXTURES / "olympiadbench"
    with pytest.raises(MathDataError, match="does not exist"):
        local_path(tmp_path / "nowhere", "aime24")
    with pytest.raises(MathDataError, match=r"aime24: no local copy in .*aime24/ or one file aime24\.jsonl"):
        local_path(tmp_path, "aime24")
    (tmp_path / "aime24.jsonl").write_text("{}\n")
    (tmp_path / "aime24.parquet").write_text("")
    with pytest.raises(MathDataError, match=r"several local copies .*aime24\.jsonl, aime24\.parquet"):
        local_path(tmp_path, "aime24")
    with pytest.raises(MathDataError, match="unknown math dataset 'aime2024x'"):
        local_path(tmp_path, "aime2024x")


def test_fixture_splits_exact_counts_and_columns(cache):
    dsd = build_math_dataset(data_dir=FIXTURES, n_validation=1, cache_dir=cache)
    stats = math_statistics(dsd)
    assert stats["rows"] == {"train": 3, "validation": 1, "test": sum(FIXTURE_ROWS[b] for b in BENCHMARKS)}
    assert stats["by_source"] == {"train": {"polaris": 3}, "validation": {"polaris": 1},
                                  "test": {b: FIXTURE_ROWS[b] for b in BENCHMARKS}}
    for split, ds in dsd.items():
        assert ds.column_names == list(SPLIT_COLUMNS)
        assert set(ds["split"]) == {split}
        for row in ds:
            assert row["question"] == row["problem"] + INSTRUCTION_SUFFIX
            assert row["prompt"] == [{"role": "user", "content": row["question"]}]
            assert row["id"].startswith(row["source"] + "-") and row["question"] and row["answer"]
    polaris = load_math("polaris", FIXTURES / "polaris.jsonl", cache_dir=cache)
    assert sorted([*dsd["train"]["id"], *dsd["validation"]["id"]]) == sorted(polaris["id"])
    first = dsd["test"][0]
    assert (first["id"], first["split"], first["source"], first["answer"]) == ("aime24-0", "test", "aime24", "30")
    assert first["problem"].startswith("Find the number of ordered pairs")


def test_caps_apply_to_train_and_to_each_benchmark(cache):
    dsd = build_math_dataset(benchmarks=["aime24", "math500", "olympiadbench"], data_dir=FIXTURES, n_train=2,
                             n_validation=1, n_test=2, cache_dir=cache)
    assert math_statistics(dsd)["by_source"] == {"train": {"polaris": 2}, "validation": {"polaris": 1},
                                                 "test": {"aime24": 2, "math500": 2, "olympiadbench": 2}}
    assert list(dsd["test"]["id"]) == ["aime24-0", "aime24-1", "math500-0", "math500-1", "olympiadbench-0",
                                 "olympiadbench-1"]


def test_split_is_deterministic_in_the_seed(cache):
    def split_ids(seed, n_train=0):
        dsd = build_math_dataset(benchmarks=["aime24"], data_dir=FIXTURES, n_train=n_train, n_validation=2,
                                 seed=seed, cache_dir=cache)
        return list(dsd["train"]["id"]), list(dsd["validation"]["id"])

    first = split_ids(0)
    assert split_ids(0) == first
    assert split_ids(0, n_train=1)[1] == first[1]  # the cap never moves a prompt into validation
    assert split_ids(0, n_train=1)[0] == first[0][:1]
    assert any(split_ids(seed)[1] != first[1] for seed in range(1, 6))  # another seed, another hold-out


def test_validation_questions_never_reach_train(tmp_path, cache):
    rows = [{"problem": "same?", "answer": "1"}] * 3 + [{"problem": "other?", "answer": "2"}]
    (tmp_path / "polaris.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"problem": "q?", "answer": "3"}) + "\n")
    for seed in range(4):
        dsd = build_math_dataset(benchmarks=["aime24"], data_dir=tmp_path, n_validation=1, seed=seed,
                                 cache_dir=cache)
        assert not set(dsd["train"]["question"]) & set(dsd["validation"]["question"])


@pytest.mark.parametrize("kwargs, message", [
    ({"n_validation": 4}, r"polaris has 4 prompts; holding out n_validation=4 of them leaves none"),
    ({"n_validation": 0}, r"n_validation must be >= 1, got 0"),
    ({"n_test": -1}, r"n_test must be >= 0, got -1"),
    ({"benchmarks": []}, r"needs at least one benchmark"),
    ({"benchmarks": ["aime24", "AIME24"]}, r"a benchmark is listed twice"),
    ({"benchmarks": ["polaris"]}, r"'polaris' is both the training set and a benchmark"),
])
def test_builder_errors_name_the_problem(kwargs, message, cache):
    with pytest.raises(MathDataError, match=message):
        build_math_dataset(**{"data_dir": FIXTURES, "n_validation": 1, "cache_dir": cache, **kwargs})


def test_config_builds_from_a_folder_relative_to_the_root(cache):
    cfg = make(source="math", n_train=0, n_test=1, math_data_dir="tests/fixtures/math", math_validation=2, seed=3)
    dsd = math_dataset(cfg, ROOT, cache_dir=cache)
    assert math_statistics(dsd)["rows"] == {"train": 2, "validation": 2, "test": len(BENCHMARKS)}
    expected = build_math_dataset(data_dir=FIXTURES, n_validation=2, n_test=1, seed=3, cache_dir=cache)
    assert list(dsd["validation"]["id"]) == list(expected["validation"]["id"])


# ------------------------------------------------------------------------------------------ notebook
@pytest.mark.notebooks
def test_notebook_01_builds_math_splits(tmp_path, monkeypatch):
    """The smoke profile's 01 section with ``source: math`` reading the fixtures, run by the pipeline."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # the kernel inherits it
    spec = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    section = spec["01_trajectories"] | {"source": "math", "n_train": 2, "n_test": 1, "math_validation": 1,
                                         "math_data_dir": "tests/fixtures/math"}
    params = tmp_path / "params" / "smoke.yaml"
    params.parent.mkdir()
    params.write_text(yaml.safe_dump({"profile": "smoke", "output_root": str(tmp_path / "out"),
                                      "stages": ["01_trajectories"], "01_trajectories": section}))
    assert pipeline.main([str(params)]) == 0

    stage = tmp_path / "out" / "smoke" / "01_trajectories"
    record = json.loads((stage / "metrics.json").read_text())
    assert record["status"] == "complete" and record["params"]["source"] == "math"
    rows = {"train": 2, "validation": 1, "test": len(BENCHMARKS)}
    assert record["metrics"]["examples"] == rows
    assert record["metrics"]["by_source"]["test"] == {b: 1 for b in BENCHMARKS}
    dsd = dataset.load_parquet(stage / "data")
    assert {s: len(ds) for s, ds in dsd.items()} == rows
    assert all(ds.column_names == list(SPLIT_COLUMNS) for ds in dsd.values())
    assert list(dsd["test"]["source"]) == list(BENCHMARKS) and set(dsd["train"]["source"]) == {"polaris"}
    assert not (stage / "tokenizer").exists()  # the synthetic cells did not run
    executed = (stage / "01_trajectories.ipynb").read_text()
    assert re.search(r"=== test / olympiadbench / olympiadbench-0", executed)
