"""Real math datasets: Polaris-53K training prompts and the six evaluation benchmarks.

ThreadWeaver (arXiv 2512.07843) rewrites Qwen3-8B traces on Polaris-53K prompts into parallel
trajectories and reports accuracy and token latency on AIME24, AIME25, AMC23, MATH500, Minerva Math
and OlympiadBench. Each dataset has its own hub id, split and column names; `load_math` maps any of
them onto one schema, ``id`` (``<source>-<row index>``), ``question``, ``answer`` (the gold answer as
a string) and ``source``, from the Hugging Face hub or from a local copy (``path=``) through the
same ``datasets`` code and the same column mapping.

Gold answers come as strings, integers, floats or lists; `normalize_answer` turns each into the
string that `twlib.grading.grade` compares against:

>>> normalize_answer(["$\\\\frac{1}{2}$"]), normalize_answer(27.0), normalize_answer(113)
('\\\\frac{1}{2}', '27', '113')
"""
from __future__ import annotations

import difflib
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

#: Appended to every question: the instruction of the official Qwen3 prompt (final answer in ``\\boxed{}``).
INSTRUCTION_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."

SCHEMA = ("id", "question", "answer", "source")


class MathDataError(ValueError):
    """A dataset name, file or row that the loaders cannot use; the message says which and why."""


class HubLoadError(OSError):
    """A dataset could not be fetched from the Hugging Face hub; the message names a local alternative."""


@dataclass(frozen=True)
class MathSource:
    """Where one dataset lives on the hub and which of its columns hold the question and the answer.

    ``answer_kind`` records the hub's type of the answer column: ``text`` (a string, often LaTeX),
    ``integer``, ``float`` (integral values such as ``27.0``) or ``list`` (strings, some wrapped in
    ``$...$``); `normalize_answer` handles every kind. ``context``, when set, names a column whose
    non-empty value is put before the question.
    """
    name: str
    hub_id: str
    config: str | None
    split: str
    question: str
    answer: str
    answer_kind: str
    context: str | None = None
    note: str = ""


REGISTRY: dict[str, MathSource] = {s.name: s for s in (
    MathSource("polaris", "POLARIS-Project/Polaris-Dataset-53K", None, "train", "problem", "answer", "text",
               note="training prompts (jsonl); also `difficulty`, a pass-rate string such as '3/8'"),
    MathSource("aime24", "HuggingFaceH4/aime_2024", None, "train", "problem", "answer", "text",
               note="30 problems; integer answers stored as strings; also id, solution, url, year"),
    MathSource("aime25", "MathArena/aime_2025", None, "train", "problem", "answer", "integer",
               note="30 problems; also problem_idx and problem_type (a list of strings)"),
    MathSource("amc23", "math-ai/amc23", None, "test", "question", "answer", "float",
               note="40 problems; answers are float64 (27.0); also id and url"),
    MathSource("math500", "HuggingFaceH4/MATH-500", None, "test", "problem", "answer", "text",
               note="LaTeX answers; also solution, subject, level (int) and unique_id"),
    MathSource("minerva", "math-ai/minervamath", None, "test", "question", "answer", "text",
               note="272 problems; LaTeX or numeric answers as strings"),
    MathSource("olympiadbench", "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train", "question",
               "final_answer", "list", context="context",
               note="open-ended, text-only, English maths subset; final_answer is a list of $-wrapped LaTeX"),
)}

TRAINING = "polaris"
BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")

_TEXT_SUFFIXES = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv"}
_FILE_SUFFIXES = {**_TEXT_SUFFIXES, ".parquet": "parquet"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {**{_key(s.name): s.name for s in REGISTRY.values()},
            **{_key(s.hub_id): s.name for s in REGISTRY.values()},
            "math": "math500", "minervamath": "minerva", "olympiad": "olympiadbench"}


def resolve_name(name: str) -> str:
    """The registry name for ``name``, read loosely (case, dashes, hub ids); unknown names raise.

    >>> resolve_name("MATH-500"), resolve_name("HuggingFaceH4/aime_2024")
    ('math500', 'aime24')
    """
    found = _ALIASES.get(_key(str(name)))
    if found:
        return found
    close = difflib.get_close_matches(_key(str(name)), list(_ALIASES), n=1, cutoff=0.5)
    hint = f" (did you mean {_ALIASES[close[0]]!r}?)" if close else ""
    raise MathDataError(f"unknown math dataset {name!r}{hint}; known: {', '.join(REGISTRY)}")


def normalize_answer(value: Any) -> str:
    """The gold answer as a string: numbers without a spurious ``.0``, lists joined with ``", "``,
    text stripped of surrounding whitespace and of one enclosing ``$...$``. Missing answers give ``""``.

    >>> normalize_answer(" $x^2$ "), normalize_answer(0.5), normalize_answer(["3", "$-1$"])
    ('x^2', '0.5', '3, -1')
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        raise MathDataError(f"a boolean ({value}) is not a math answer")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(s for s in (normalize_answer(v) for v in value) if s)
    text = str(value).strip()
    for left, right in (("$$", "$$"), ("$", "$")):
        inner = text[len(left):len(text) - len(right)]
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right) \
                and "$" not in inner:
            return inner.strip()
    return text


def _read(source: MathSource, path: Path | None, split: str, cache_dir, revision):
    """The raw split: from ``path`` (file, ``save_to_disk`` folder or hub snapshot) or from the hub."""
    import datasets

    if path is None:
        try:
            return datasets.load_dataset(source.hub_id, source.config, split=split, cache_dir=cache_dir,
                                         revision=revision)
        except Exception as err:  # any hub failure (offline, missing, gated) gets the same advice
            config = f", config {source.config!r}" if source.config else ""
            raise HubLoadError(
                f"could not load {source.name!r} from the Hugging Face hub dataset {source.hub_id!r}"
                f"{config}, split {split!r}: {type(err).__name__}: {err}. Without hub access, download it "
                f"on a connected machine (`huggingface-cli download {source.hub_id} --repo-type dataset "
                f"--local-dir DIR`) and pass path=DIR, or pass path= a parquet/jsonl file with the columns "
                f"{source.question!r} and {source.answer!r}.") from err

    if not path.exists():
        raise MathDataError(f"{source.name}: no such file or folder: {path}")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = _attempt(source, path, lambda: datasets.load_from_disk(str(path)))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    if len(loaded) != 1:
                        raise MathDataError(f"{source.name}: {path} has splits {list(loaded)}, not {split!r}; "
                                            "pass split=")
                    split = next(iter(loaded))
                loaded = loaded[split]
            return loaded
        config = source.config if (path / "README.md").exists() else None
        loader = lambda: datasets.load_dataset(str(path), config, split=split, cache_dir=cache_dir)
    else:
        builder = _FILE_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise MathDataError(f"{source.name}: cannot read {path}; use a {'/'.join(_FILE_SUFFIXES)} file "
                                "or a dataset folder")
        if path.stat().st_size == 0 or (builder in ("json", "csv") and not _has_text(path)):
            raise MathDataError(f"{source.name}: {path} is empty")
        loader = lambda: datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    return _attempt(source, path, loader)


def _attempt(source: MathSource, path: Path, loader):
    try:
        return loader()
    except Exception as err:  # datasets raises many types for a bad local copy; all get the file's name
        raise MathDataError(f"{source.name}: could not read {path}: {type(err).__name__}: {err}") from err


def _has_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return bool(f.read(1 << 16).strip())


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _schema_rows(source: MathSource, raw, where: str, drop_empty: bool) -> dict[str, list[str]]:
    """`SCHEMA` columns of a loaded split; an empty question or answer raises or, with ``drop_empty``, is
    left out with a warning."""
    questions, answers = raw[source.question], raw[source.answer]
    contexts = raw[source.context] if source.context in raw.column_names else [None] * len(raw)
    rows: dict[str, list[str]] = {c: [] for c in SCHEMA}
    dropped: list[int] = []
    for i, (q, a, ctx) in enumerate(zip(questions, answers, contexts)):
        gold = normalize_answer(a)
        bad = source.question if _missing(q) else source.answer if not gold else None
        if bad is not None:
            if not drop_empty:
                raise MathDataError(f"{source.name}: row {i} of {where} has an empty {bad!r}; "
                                    "fix the data or pass drop_empty=True to leave such rows out")
            dropped.append(i)
            continue
        question = str(q).strip()
        if not _missing(ctx):
            question = f"{str(ctx).strip()}\n{question}"
        for column, value in zip(SCHEMA, (f"{source.name}-{i}", question, gold, source.name)):
            rows[column].append(value)
    if dropped:
        shown = ", ".join(map(str, dropped[:10])) + (", ..." if len(dropped) > 10 else "")
        warnings.warn(f"{source.name}: dropped {len(dropped)} of {len(raw)} rows with an empty question or "
                      f"answer (rows {shown})", stacklevel=3)
    return rows


def load_math(name: str, path: str | Path | None = None, limit: int | None = None, *, split: str | None = None,
              drop_empty: bool = False, cache_dir: str | None = None, revision: str | None = None):
    """One math dataset as a ``datasets.Dataset`` with the columns ``id``, ``question``, ``answer``, ``source``.

    Without ``path`` it calls ``datasets.load_dataset(hub_id, config, split=...)`` and raises
    `HubLoadError`, naming the hub id and the ``path`` argument, when the hub cannot be reached. With
    ``path`` (a parquet/jsonl/json/csv file, a ``save_to_disk`` folder or a hub snapshot folder) it
    reads that copy with the same column mapping. ``split`` overrides the registry's split for hub
    loads, snapshot and ``save_to_disk`` folders (a single file is one split). ``limit`` keeps the first rows of the
    split; ids are
    ``<source>-<row index in the split>``, so they do not depend on ``limit``. A row whose question or
    answer is empty raises `MathDataError` naming the dataset, row and column; with ``drop_empty=True``
    such rows are left out and a warning gives their count and indices.

    >>> import json, pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "aime25.jsonl"
    >>> _ = f.write_text(json.dumps({"problem_idx": 1, "problem": "Find $2+3$.", "answer": 5}) + "\\n")
    >>> load_math("aime25", path=f)[0]
    {'id': 'aime25-0', 'question': 'Find $2+3$.', 'answer': '5', 'source': 'aime25'}
    """
    import datasets

    source = REGISTRY[resolve_name(name)]
    if limit is not None and limit < 0:
        raise MathDataError(f"{source.name}: limit must be >= 0, got {limit}")
    where = str(path) if path is not None else source.hub_id
    raw = _read(source, Path(path) if path is not None else None, split or source.split, cache_dir, revision)
    for column in (source.question, source.answer):
        if column not in raw.column_names:
            raise MathDataError(
                f"{source.name}: column {column!r} not found in {where} (columns: {raw.column_names}); the "
                f"{source.name} loader reads the schema of {source.hub_id}: question {source.question!r}, "
                f"answer {source.answer!r}")
    if len(raw) == 0:
        raise MathDataError(f"{source.name}: {where} has no rows")
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))

    rows = _schema_rows(source, raw, where, drop_empty)
    features = datasets.Features({c: datasets.Value("string") for c in SCHEMA})
    return datasets.Dataset.from_dict(rows, features=features)


def load_benchmarks(paths: Mapping[str, str | Path] | None = None, limit: int | Mapping[str, int] | None = None,
                    names: Iterable[str] = BENCHMARKS, *, drop_empty: bool = False, cache_dir: str | None = None):
    """The evaluation benchmarks (default: all six of the paper) concatenated into one Dataset.

    ``paths`` maps dataset names to local copies (benchmarks without one come from the hub; entries
    for datasets not loaded are ignored); ``limit`` is one limit for every benchmark or a mapping
    name → limit (benchmarks it leaves out load whole). The ``source`` column tells them apart.
    """
    import datasets

    chosen = [resolve_name(n) for n in names]
    paths = {resolve_name(k): v for k, v in (paths or {}).items()}
    limits = ({resolve_name(k): v for k, v in limit.items()} if isinstance(limit, Mapping)
              else {n: limit for n in chosen})
    parts = [load_math(n, paths.get(n), limits.get(n), drop_empty=drop_empty, cache_dir=cache_dir)
             for n in chosen]
    return datasets.concatenate_datasets(parts)


def prompt_rows(ds, suffix: str = INSTRUCTION_SUFFIX):
    """TRL conversational prompt rows: ``prompt`` = ``[{"role": "user", "content": question + suffix}]``,
    keeping ``answer``, ``id`` and ``source``. The default suffix asks for the answer in ``\\boxed{}``.

    >>> import datasets
    >>> row = prompt_rows(datasets.Dataset.from_dict(
    ...     {"id": ["x-0"], "question": ["1+1?"], "answer": ["2"], "source": ["x"]}))[0]
    >>> row["prompt"][0]["content"]
    "1+1? Let's think step by step and output the final answer within \\\\boxed{}."
    """
    missing = [c for c in SCHEMA if c not in ds.column_names]
    if missing:
        raise MathDataError(f"prompt_rows needs the columns {list(SCHEMA)} of load_math; missing {missing}")
    out = ds.map(lambda row: {"prompt": [{"role": "user", "content": row["question"] + suffix}]},
                 remove_columns=["question"])
    return out.select_columns(["prompt", "answer", "id", "source"])


#: Columns of the splits `build_math_dataset` makes (``prompt`` as `prompt_rows` writes it).
SPLIT_COLUMNS = ("id", "split", "source", "problem", "question", "answer", "prompt")


def local_path(data_dir: str | Path, name: str) -> Path:
    """The local copy of dataset ``name`` in ``data_dir``: the folder ``<dir>/<name>`` or one file
    ``<dir>/<name>.<ext>`` (jsonl, json, ndjson, csv or parquet); none or several raise `MathDataError`.

    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "aime25.jsonl").write_text("{}")
    >>> local_path(d, "AIME25").name
    'aime25.jsonl'
    """
    name = resolve_name(name)
    folder = Path(data_dir)
    if not folder.is_dir():
        raise MathDataError(f"math data folder {folder} does not exist or is not a folder")
    candidates = [folder / name, *(folder / f"{name}{suffix}" for suffix in _FILE_SUFFIXES)]
    found = [p for p in candidates if p.exists()]
    if not found:
        raise MathDataError(f"{name}: no local copy in {folder}; expected the folder {name}/ or one file "
                            + " / ".join(f"{name}{s}" for s in _FILE_SUFFIXES))
    if len(found) > 1:
        raise MathDataError(f"{name}: several local copies in {folder} ({', '.join(p.name for p in found)}); "
                            "keep one")
    return found[0]


def _split_rows(ds, split: str, suffix: str):
    """``ds`` (the `SCHEMA` columns) as rows of ``split`` with the `SPLIT_COLUMNS`. The kit builds every
    model prompt from ``question`` (`twlib.tokenizer.prompt_ids`), so ``question`` carries the instruction
    suffix, as ``prompt`` does; ``problem`` keeps the dataset's own text."""
    import datasets

    string = datasets.Value("string")
    features = datasets.Features({c: string for c in SPLIT_COLUMNS if c != "prompt"}
                                 | {"prompt": [{"role": string, "content": string}]})
    columns = {c: list(ds[c]) for c in SCHEMA}
    columns["split"] = [split] * len(ds)
    columns["problem"] = columns["question"]
    columns["question"] = [q + suffix for q in columns["problem"]]
    columns["prompt"] = [[{"role": "user", "content": q}] for q in columns["question"]]
    return datasets.Dataset.from_dict({c: columns[c] for c in SPLIT_COLUMNS}, features=features)


def _check_sources(train: str, benchmarks: Iterable[str], n_train: int, n_validation: int,
                   n_test: int) -> tuple[str, list[str]]:
    """The registry names of the training set and the benchmarks, checked to be disjoint, with the sizes."""
    train_name = resolve_name(train)
    names = [resolve_name(n) for n in benchmarks]
    if not names:
        raise MathDataError("build_math_dataset needs at least one benchmark")
    if len(set(names)) != len(names):
        raise MathDataError(f"a benchmark is listed twice: {names}")
    if train_name in names:
        raise MathDataError(f"{train_name!r} is both the training set and a benchmark; train and test would overlap")
    for arg, value, low in (("n_train", n_train, 0), ("n_validation", n_validation, 1), ("n_test", n_test, 0)):
        if value < low:
            raise MathDataError(f"{arg} must be >= {low}, got {value}")
    return train_name, names


def _hold_out(pool, name: str, n_validation: int, n_train: int, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of the validation split (the first ``n_validation`` of a ``seed`` permutation) and of the
    train split (the rest, less repeats of a validation question, capped at ``n_train``; 0: all)."""
    import numpy as np

    order = [int(i) for i in np.random.default_rng(seed).permutation(len(pool))]
    questions = list(pool["question"])
    held = {questions[i] for i in order[:n_validation]}
    rest = [i for i in order[n_validation:] if questions[i] not in held]
    if not rest:
        raise MathDataError(f"every {name} prompt outside the validation split repeats a validation question")
    return order[:n_validation], rest[:n_train] if n_train else rest


def build_math_dataset(train: str = TRAINING, benchmarks: Iterable[str] = BENCHMARKS, *,
                       data_dir: str | Path | None = None, n_train: int = 0, n_validation: int = 200,
                       n_test: int = 0, seed: int = 0, drop_empty: bool = False, cache_dir: str | None = None,
                       suffix: str = INSTRUCTION_SUFFIX):
    """The real-math ``DatasetDict`` of the paper's setup: train / validation prompts from ``train``
    (Polaris-53K, whose prompts the paper's trajectories and RL use) and a test split that concatenates
    the ``benchmarks`` (AIME24, AIME25, AMC23, MATH500, Minerva, OlympiadBench) told apart by ``source``.

    The training set is permuted with ``seed``; its first ``n_validation`` prompts are the validation
    split and the rest, less any question that is also a validation question, are the train split,
    capped at ``n_train`` (0: all). The validation split depends on the seed only, not on ``n_train``.
    ``n_test`` caps each benchmark (0: all; its first rows). With ``data_dir`` every dataset is read from
    its `local_path` there, otherwise from the hub. Columns: `SPLIT_COLUMNS`, all strings but ``prompt``
    (``[{"role": "user", "content": question}]``); ``question`` is ``problem + suffix``.

    >>> import json, pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "polaris.jsonl").write_text("".join(
    ...     json.dumps({"problem": f"{i}+1?", "answer": str(i + 1)}) + "\\n" for i in range(5)))
    >>> _ = (d / "aime25.jsonl").write_text(json.dumps({"problem": "2+3?", "answer": 5}) + "\\n")
    >>> dsd = build_math_dataset(benchmarks=["aime25"], data_dir=d, n_validation=2)
    >>> math_statistics(dsd)["rows"], dsd["test"][0]["prompt"][0]["content"][:5]
    ({'train': 3, 'validation': 2, 'test': 1}, '2+3? ')
    """
    import datasets

    train_name, names = _check_sources(train, benchmarks, n_train, n_validation, n_test)

    def where(name: str) -> Path | None:
        return local_path(data_dir, name) if data_dir else None

    pool = load_math(train_name, where(train_name), drop_empty=drop_empty, cache_dir=cache_dir)
    if n_validation >= len(pool):
        raise MathDataError(f"{train_name} has {len(pool)} prompts; holding out n_validation={n_validation} "
                            "of them leaves none for training")
    validation, rest = _hold_out(pool, train_name, n_validation, n_train, seed)
    test = load_benchmarks({n: where(n) for n in names} if data_dir else None, n_test or None, names,
                           drop_empty=drop_empty, cache_dir=cache_dir)
    return datasets.DatasetDict({
        "train": _split_rows(pool.select(rest), "train", suffix),
        "validation": _split_rows(pool.select(validation), "validation", suffix),
        "test": _split_rows(test, "test", suffix),
    })


def math_dataset(cfg, root: str | Path = ".", cache_dir: str | None = None):
    """The real-math splits of notebook 01's parameters (`twlib.config.TrajectoriesConfig`, ``source: math``);
    a relative ``math_data_dir`` is read from ``root``, e.g. ``tests/fixtures/math`` under the project root."""
    data_dir = Path(root) / cfg.math_data_dir if cfg.math_data_dir else None
    return build_math_dataset(cfg.math_train, cfg.math_benchmarks, data_dir=data_dir, n_train=cfg.n_train,
                              n_validation=cfg.math_validation, n_test=cfg.n_test, seed=cfg.seed,
                              drop_empty=cfg.math_drop_empty, cache_dir=cache_dir)


def math_statistics(dsd) -> dict:
    """Rows per split and, per split, rows per ``source`` (sources in order of first appearance).

    >>> import datasets
    >>> math_statistics({"test": datasets.Dataset.from_dict({"source": ["aime24", "amc23", "aime24"]})})
    {'rows': {'test': 3}, 'by_source': {'test': {'aime24': 2, 'amc23': 1}}}
    """
    by_source: dict[str, dict[str, int]] = {}
    for split, ds in dsd.items():
        counts: dict[str, int] = {}
        for source in ds["source"]:
            counts[source] = counts.get(source, 0) + 1
        by_source[split] = counts
    return {"rows": {split: len(ds) for split, ds in dsd.items()}, "by_source": by_source}


__all__ = ["INSTRUCTION_SUFFIX", "SCHEMA", "SPLIT_COLUMNS", "REGISTRY", "TRAINING", "BENCHMARKS", "MathSource",
           "MathDataError", "HubLoadError", "resolve_name", "normalize_answer", "load_math", "load_benchmarks",
           "prompt_rows", "local_path", "build_math_dataset", "math_dataset", "math_statistics"]
