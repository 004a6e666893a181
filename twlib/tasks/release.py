"""The authors' released SFT trajectories as a training source (paper §3.1-3.2; docs/design.md §4, §9).

ThreadWeaver's public reproduction data, the Hugging Face dataset ``longlian/threadweaver_public_code_reproduced``,
holds the parallel trajectories the paper fine-tunes Qwen3-8B on: ``sample_964/train.parquet`` (964 rows) and
``sample_964_8x/train.parquet`` (7,712 rows). Its columns are ``uuid, question, response_reasoning,
response_content, correctness, _uuid_index, trajectory_source, _trajectory_matched, raw_messages, qwen_text,
num_qwen_tokens``: the trajectory sits in ``response_reasoning`` without ``<think>``, the answer (with its
``\\boxed{}``, there is no gold-answer column) in ``response_content``.

`normalise` turns a row into the kit's canonical layout (what `twlib.format.Trajectory.render` writes and
``parse(text, strict=True)`` accepts), naming every layout variant it fixed; a row it cannot fix is rejected
with a short reason code. `release_examples` gives the SFT examples and a report, `release_dataset` the rows
notebook 02 reads (`twlib.sft.dataset_examples`)::

    {"question": "...", "completion": [{"role": "assistant", "content": "<think>\\n...</think>\\n\\n\\\\boxed{7}"}]}

>>> normalise({"question": "A+B?", "response_reasoning": "A=3, B=4\\n", "response_content": "\\\\boxed{7}"})
('<think>\\nA=3, B=4\\n</think>\\n\\n\\\\boxed{7}', ('reasoning_edge_whitespace',))
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..format import (
    OUTLINE_CLOSE,
    OUTLINE_OPEN,
    OUTLINES_CLOSE,
    OUTLINES_OPEN,
    PARALLEL_CLOSE,
    PARALLEL_OPEN,
    TAG_RE,
    THINK_CLOSE,
    THINK_OPEN,
    THREAD_CLOSE,
    THREAD_OPEN,
    Block,
    FormatError,
    extract_boxed,
    parse,
)
from .math_data import HubLoadError

HUB_ID = "longlian/threadweaver_public_code_reproduced"
SUBSETS = ("sample_964", "sample_964_8x")
#: Columns the kit reads: the prompt, the trajectory, the answer, and ``uuid`` for the example ids.
REQUIRED_COLUMNS = ("uuid", "question", "response_reasoning", "response_content")
#: The rest of the documented schema: read when present (``correctness``), otherwise only reported if absent.
OPTIONAL_COLUMNS = ("correctness", "_uuid_index", "trajectory_source", "_trajectory_matched", "raw_messages",
                    "qwen_text", "num_qwen_tokens")
#: Columns of `release_dataset` (TRL's prompt/completion form plus the ids and boxed answers).
DATASET_COLUMNS = ("id", "question", "answer", "prompt", "completion")

_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json"}
# Tags kept as separate items when the reasoning is cut up (the capturing group keeps them in `re.split`).
_SPLIT_RE = re.compile(f"({TAG_RE.pattern})")
# "N:" heading an outline or thread body, with the whitespace around it and at the end of the body.
_NUMBERED_RE = re.compile(r"(\s*)([0-9]+):(\s*)(.*?)(\s*)", re.S)
# Whitespace-only positions between two tags of a block, by (tag before, tag after): `Block.gap` names them.
_GAPS = {(PARALLEL_OPEN, OUTLINES_OPEN): "after_parallel", (OUTLINES_OPEN, OUTLINE_OPEN): "after_outlines_open",
         (OUTLINE_CLOSE, OUTLINE_OPEN): "after_outline", (OUTLINE_CLOSE, OUTLINES_CLOSE): "after_outline",
         (OUTLINES_CLOSE, THREAD_OPEN): "after_outlines_close", (THREAD_CLOSE, THREAD_OPEN): "between_threads",
         (THREAD_CLOSE, PARALLEL_CLOSE): "after_threads"}
_CANONICAL_GAP = Block((), ()).gap  # a block without spacing overrides answers the canonical whitespace
# Strict-parse problems (`FormatError.problem`) → reason codes, first match wins.
_FORMAT_REASONS = (
    (r"nested <Parallel>", "format/nested_block"),
    (r"thread \d+ is never closed|inside thread \d+", "format/unclosed_thread"),
    (r"outline \d+ is never closed|inside outline \d+", "format/unclosed_outline"),
    (r"outlines but \d+ threads", "format/count_mismatch"),
    (r"thread numbers .* do not match", "format/thread_numbers"),
    (r"outline numbers", "format/outline_numbers"),
    (r"its number|must start with .* after its tag|implausible number", "format/missing_number"),
    (r"thread \d+ is empty", "format/empty_thread"),
    (r"lone surrogate", "format/invalid_unicode"),
    (r"think>", "format/think_tags"),
    (r"outside a <Parallel> block", "format/stray_tag"),
    (r"text between|unexpected text|found text", "format/text_in_block"),
    (r"expected <|expected </|has no <", "format/block_structure"),
)


class ReleaseDataError(ValueError):
    """A release copy or row the loader cannot use; the message says which and why."""


class Rejected(ValueError):
    """A row `normalise` cannot turn into a canonical trajectory: ``reason`` is a short code
    (``format/unclosed_thread``, ``answer/no_boxed``, ...), ``detail`` the problem in words."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


# ------------------------------------------------------------------------------------------------ loading
def _as_local(source: str) -> Path | None:
    """``source`` as a local copy when it names one (an existing path, a data file, or ./ / ~ paths), else None
    (a hub id such as ``owner/name``)."""
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in _FILE_BUILDERS or source.startswith((".", "/", "~")):
        return path
    return None


def _from_hub(source: str, subset: str, cache_dir):
    import datasets

    try:
        return datasets.load_dataset(source, data_files=f"{subset}/train.parquet", split="train", cache_dir=cache_dir)
    except Exception as err:  # offline, gated or missing: all get the same advice
        raise HubLoadError(
            f"could not load the ThreadWeaver release {source!r}, subset {subset!r} ({subset}/train.parquet) from "
            f"the Hugging Face hub: {type(err).__name__}: {err}. Without hub access, download it on a connected "
            f"machine (`huggingface-cli download {source} --repo-type dataset --local-dir DIR`) and pass path=DIR "
            f"(or the config knob release_data: DIR), or pass path= a parquet/jsonl file with the columns "
            f"{list(REQUIRED_COLUMNS)}.") from err


def _local_file(folder: Path, subset: str) -> Path | None:
    """The data file of ``subset`` in a snapshot folder (``<subset>/train.*``) or in a subset folder itself."""
    for base in (folder / subset, folder):
        for suffix in _FILE_BUILDERS:
            if (base / f"train{suffix}").is_file():
                return base / f"train{suffix}"
    return None


def _from_local(path: Path, subset: str, cache_dir):
    import datasets

    if not path.exists():
        raise ReleaseDataError(f"release data: no such file or folder: {path}")
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = _attempt(path, lambda: datasets.load_from_disk(str(path)))
        if isinstance(loaded, datasets.DatasetDict):  # the release has one split, "train"
            return loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
        return loaded
    file = _local_file(path, subset) if path.is_dir() else path
    if file is None:
        subsets = sorted(p.name for p in path.iterdir() if p.is_dir() and _local_file(p, "") is not None)
        raise ReleaseDataError(f"release data: {path} holds no {subset}/train.parquet (nor train.jsonl); "
                               f"subsets found there: {subsets}")
    builder = _FILE_BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise ReleaseDataError(f"release data: cannot read {file}; use a {'/'.join(_FILE_BUILDERS)} file or a folder")
    return _attempt(file, lambda: datasets.load_dataset(builder, data_files=str(file), split="train",
                                                        cache_dir=cache_dir))


def _attempt(path: Path, loader):
    try:
        return loader()
    except Exception as err:  # datasets raises many types for a bad local copy; all name the file
        raise ReleaseDataError(f"release data: could not read {path}: {type(err).__name__}: {err}") from err


def check_columns(columns: Sequence[str], where: str = "release data") -> list[str]:
    """The documented optional columns absent from ``columns``; raises `ReleaseDataError` naming the required
    columns that are missing and the columns found.

    >>> check_columns(["uuid", "question", "response_reasoning", "response_content", "qwen_text"])[:2]
    ['correctness', '_uuid_index']
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ReleaseDataError(f"{where}: missing the column(s) {missing} that the release loader needs; found "
                               f"{list(columns)}. Expected the schema of {HUB_ID}: required {list(REQUIRED_COLUMNS)}, "
                               f"optional {list(OPTIONAL_COLUMNS)}")
    return [c for c in OPTIONAL_COLUMNS if c not in columns]


def load_release(source: str = HUB_ID, subset: str = "sample_964", path: str | Path | None = None,
                 cache_dir: str | None = None):
    """The raw release rows (a ``datasets.Dataset``), columns checked (`check_columns`).

    From the hub by id (``datasets.load_dataset(HUB_ID, data_files="<subset>/train.parquet")``); `HubLoadError`
    names the local alternative when the hub cannot be reached. From a local copy when ``path`` is given or
    ``source`` is a path: a parquet/jsonl file, a ``save_to_disk`` folder, a snapshot folder holding
    ``<subset>/train.parquet`` (as ``huggingface-cli download`` writes it) or a subset folder holding
    ``train.parquet``.

    >>> import json, pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "train.jsonl"
    >>> _ = f.write_text(json.dumps({"uuid": "u1", "question": "1+1?", "response_reasoning": "1+1=2",
    ...                              "response_content": "\\\\boxed{2}"}) + "\\n")
    >>> load_release(path=f).num_rows
    1
    """
    local = Path(path).expanduser() if path is not None else _as_local(str(source))
    raw = _from_hub(str(source), subset, cache_dir) if local is None else _from_local(local, subset, cache_dir)
    where = str(local if local is not None else f"{source} ({subset})")
    check_columns(raw.column_names, where)
    if raw.num_rows == 0:
        raise ReleaseDataError(f"release data: {where} has no rows")
    return raw


# -------------------------------------------------------------------------------------------- normalising
def _text(row: dict, column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value)


def _fix_gap(before: str, after: str, text: str, variants: list[str]) -> str:
    """The canonical whitespace (`Block.gap`) at a structural position between two block tags, if ``text`` there
    is whitespace (or nothing); text that is not whitespace stays, for strict parsing to name."""
    position = _GAPS.get((before, after))
    if position is None:
        return text
    canon = _CANONICAL_GAP(position)
    if text == canon or text.strip():
        return text
    variants.append(f"whitespace/{position}")
    return canon


def _fix_body(kind: str, body: str, variants: list[str]) -> str:
    """An outline (``"1: A"``) or thread (``"\\n1: A=1\\n"``) body laid out as `Block.from_plan` writes it:
    the number right after the tag (a thread's after one newline), one space after ``N:``, and for a thread
    exactly one newline before ``</Thread>``.

    >>> v = []; _fix_body("outline", "1:A ", v), _fix_body("thread", "1:\\n x\\n\\n", v), v
    ('1: A', '\\n1: x\\n', ['outline_no_space', 'outline_whitespace', 'thread_whitespace'])
    """
    m = _NUMBERED_RE.fullmatch(body)
    if m is None or not m.group(4):  # no "N:" or no text after it: left for strict parsing to name
        return body
    lead = end = "" if kind == "outline" else "\n"
    before, number, after, rest, tail = m.groups()
    if after == "":
        variants.append(f"{kind}_no_space")
    if before != lead or after not in ("", " ") or tail != end:
        variants.append(f"{kind}_whitespace")
    return f"{lead}{number}: {rest}{end}"


def _fix_structure(reasoning: str, variants: list[str]) -> str:
    """The reasoning with canonical whitespace at every structural position of its blocks (docs/design.md §4);
    text outside blocks is the model's own and stays as it is.

    >>> v = []; _fix_structure("<Thread>\\n1: a\\n</Thread>\\n<Thread>\\n2: b\\n</Thread>", v), v
    ('<Thread>\\n1: a\\n</Thread><Thread>\\n2: b\\n</Thread>', ['whitespace/between_threads'])
    """
    parts = _SPLIT_RE.split(reasoning)  # text, tag, text, ..., tag, text
    for k in range(2, len(parts) - 1, 2):
        pair = (parts[k - 1], parts[k + 1])
        if pair == (OUTLINE_OPEN, OUTLINE_CLOSE):
            parts[k] = _fix_body("outline", parts[k], variants)
        elif pair == (THREAD_OPEN, THREAD_CLOSE):
            parts[k] = _fix_body("thread", parts[k], variants)
        else:
            parts[k] = _fix_gap(*pair, parts[k], variants)
    return "".join(parts)


def _unwrap_reasoning(reasoning: str, variants: list[str]) -> str:
    """``response_reasoning`` without its ``<think>``/``</think>`` (when the row has them) and edge whitespace."""
    inner = reasoning.strip()
    if inner.startswith(THINK_OPEN) or inner.endswith(THINK_CLOSE):
        variants.append("think_tags_in_reasoning")
        inner = inner.removeprefix(THINK_OPEN).removesuffix(THINK_CLOSE).strip()
    elif inner != reasoning:
        variants.append("reasoning_edge_whitespace")
    return inner


def format_reason(err: FormatError) -> str:
    """The reason code of a strict-parse error.

    >>> format_reason(FormatError("2 outlines but 1 threads"))
    'format/count_mismatch'
    """
    problem = getattr(err, "problem", str(err))
    return next((code for pattern, code in _FORMAT_REASONS if re.search(pattern, problem)), "format/other")


def normalise(row: dict) -> tuple[str, tuple[str, ...]]:
    """``(canonical text, variants fixed)`` for a release row; raises `Rejected` when no fix gives a trajectory.

    The text is ``<think>\\n`` + reasoning + ``\\n</think>\\n\\n`` + answer, blocks as
    `twlib.format.Block.render` writes them, and passes ``parse(text, strict=True)`` (docs/design.md §4).

    >>> normalise({"response_reasoning": "x", "response_content": "no box"})
    Traceback (most recent call last):
    twlib.tasks.release.Rejected: answer/no_boxed: response_content has no complete \\boxed{}: 'no box'
    """
    variants: list[str] = []
    reasoning, content = _text(row, "response_reasoning"), _text(row, "response_content")
    if "\r\n" in reasoning + content:
        variants.append("crlf")
        reasoning, content = reasoning.replace("\r\n", "\n"), content.replace("\r\n", "\n")
    reasoning = _unwrap_reasoning(reasoning, variants)
    if not reasoning:
        raise Rejected("reasoning/empty", "response_reasoning is empty")
    answer = content.strip()
    if not answer:
        raise Rejected("answer/empty", "response_content is empty")
    if answer != content:
        variants.append("answer_edge_whitespace")
    if extract_boxed(THINK_CLOSE + answer) is None:
        raise Rejected("answer/no_boxed", f"response_content has no complete \\boxed{{}}: {answer[-60:]!r}")
    text = f"{THINK_OPEN}\n{_fix_structure(reasoning, variants)}\n{THINK_CLOSE}\n\n{answer}"
    try:
        parse(text, strict=True)
    except FormatError as err:
        raise Rejected(format_reason(err), str(err)) from None
    return text, tuple(dict.fromkeys(variants))


# ----------------------------------------------------------------------------------------------- examples
def _ids(uuids: Sequence[Any]) -> list[str]:
    """``uuid`` as the example id; a uuid on several rows (``sample_964_8x`` repeats each question) gets
    ``-k`` for its k-th row, so ids are unique; an empty uuid gives ``release-<row index>``.

    >>> _ids(["a", "b", "a", None])
    ['a-0', 'b', 'a-1', 'release-3']
    """
    counts, seen, out = {}, {}, []
    for u in uuids:
        counts[u] = counts.get(u, 0) + 1
    for i, u in enumerate(uuids):
        if u is None or str(u) == "":
            out.append(f"release-{i}")
        elif counts[u] > 1:
            out.append(f"{u}-{seen.get(u, 0)}")
            seen[u] = seen.get(u, 0) + 1
        else:
            out.append(str(u))
    return out


def is_incorrect(value: Any) -> bool:
    """Whether a ``correctness`` value marks the row's answer wrong (False, 0, "false"); None is unknown.

    >>> is_incorrect(False), is_incorrect(None), is_incorrect("False"), is_incorrect(1.0)
    (True, False, True, False)
    """
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip().lower() in ("false", "0", "no", "incorrect")
    return not value


def _example(row: dict, example_id: str, keep_incorrect: bool) -> tuple[dict, tuple[str, ...]]:
    """One SFT example ``{"id", "question", "text", "answer"}`` and the variants fixed; raises `Rejected`."""
    question = _text(row, "question")
    if not question.strip():
        raise Rejected("question/empty", "question is empty")
    if not keep_incorrect and is_incorrect(row.get("correctness")):
        raise Rejected("correctness/false", f"correctness is {row.get('correctness')!r} and keep_incorrect=False")
    text, variants = normalise(row)
    return {"id": example_id, "question": question, "text": text, "answer": extract_boxed(text)}, variants


def _columns(rows) -> list[str]:
    if hasattr(rows, "column_names"):
        return list(rows.column_names)
    return list(rows[0]) if rows else []


def release_examples(rows: Iterable[dict], keep_incorrect: bool = True) -> tuple[list[dict], dict]:
    """SFT examples from release rows (`load_release`) and a report of what was kept, fixed and rejected.

    Examples are ``{"id", "question", "text", "answer"}``: ``text`` what `normalise` returns, ``answer`` the
    last ``\\boxed{}`` of its answer (`twlib.format.extract_boxed`). Rows whose ``correctness`` is false are kept
    by default, so that training sees the release as the authors published it (their SFT set, not a filtered
    one); the report counts them (``incorrect_kept``), and ``keep_incorrect=False`` rejects them as
    ``correctness/false``. The report: ``rows``, ``accepted``, ``rejected_by_reason`` (code → count),
    ``variants`` (name → rows fixed), ``missing_optional_columns``, ``incorrect_kept``, ``without_blocks``
    (accepted rows with no ``<Parallel>``) and ``rejected`` (``{"id", "reason", "detail"}`` per rejected row).

    >>> rows = [{"uuid": "u", "question": "2+2?", "response_reasoning": "<think>\\n2+2=4", "response_content": "4"}]
    >>> release_examples(rows)[1]["rejected_by_reason"]
    {'answer/no_boxed': 1}
    """
    rows = rows if hasattr(rows, "column_names") else list(rows)
    missing_optional = check_columns(_columns(rows))
    examples, rejected, variants = [], [], {}
    incorrect = without_blocks = 0
    uuids = rows["uuid"] if hasattr(rows, "column_names") else [row.get("uuid") for row in rows]
    for row, example_id in zip(rows, _ids(list(uuids))):
        try:
            example, names = _example(row, example_id, keep_incorrect)
        except Rejected as r:
            rejected.append({"id": example_id, "reason": r.reason, "detail": r.detail})
            continue
        examples.append(example)
        for name in names:
            variants[name] = variants.get(name, 0) + 1
        incorrect += is_incorrect(row.get("correctness"))
        without_blocks += PARALLEL_OPEN not in example["text"]
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return examples, {"rows": len(examples) + len(rejected), "accepted": len(examples),
                      "rejected_by_reason": dict(sorted(reasons.items())), "variants": dict(sorted(variants.items())),
                      "missing_optional_columns": missing_optional, "incorrect_kept": incorrect,
                      "without_blocks": without_blocks, "rejected": rejected}


def examples_dataset(examples: Sequence[dict]):
    """Examples as a ``datasets.Dataset`` with the `DATASET_COLUMNS`: TRL's ``prompt``/``completion`` chat
    messages, which `twlib.sft.dataset_examples(ds, parallel=True)` reads (``question``, ``completion``)."""
    import datasets

    string = datasets.Value("string")
    chat = [{"role": string, "content": string}]
    features = datasets.Features({"id": string, "question": string, "answer": string, "prompt": chat,
                                  "completion": chat})
    return datasets.Dataset.from_dict({
        "id": [e["id"] for e in examples], "question": [e["question"] for e in examples],
        "answer": [e["answer"] for e in examples],
        "prompt": [[{"role": "user", "content": e["question"]}] for e in examples],
        "completion": [[{"role": "assistant", "content": e["text"]}] for e in examples]}, features=features)


def release_dataset(source: str = HUB_ID, subset: str = "sample_964", path: str | Path | None = None,
                    cache_dir: str | None = None, limit: int | None = None, keep_incorrect: bool = True):
    """The release as notebook 02's training rows (`examples_dataset`): `load_release`, then `release_examples`;
    ``limit`` keeps the first accepted examples. Raises `ReleaseDataError` when no row is accepted."""
    examples, report = release_examples(load_release(source, subset, path, cache_dir), keep_incorrect)
    if not examples:
        raise ReleaseDataError(f"no release row was accepted; rejected by reason: {report['rejected_by_reason']}")
    return examples_dataset(examples[:limit] if limit is not None else examples)


def release_for_stage(cfg, root: str | Path = ".", cache_dir: str | None = None):
    """`release_dataset` from notebook 02's parameters: ``release_data`` (a hub id, or a local copy read relative
    to ``root``, e.g. ``tests/fixtures/release`` under the project root), ``release_subset`` and, when the config
    has it, ``release_limit`` (0: every accepted row)."""
    value = str(getattr(cfg, "release_data", "") or HUB_ID)
    local = Path(root) / Path(value).expanduser()
    return release_dataset(value, getattr(cfg, "release_subset", "") or "sample_964",
                           path=local if local.exists() else None, cache_dir=cache_dir,
                           limit=getattr(cfg, "release_limit", 0) or None)


__all__ = ["HUB_ID", "SUBSETS", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "DATASET_COLUMNS", "ReleaseDataError",
           "Rejected", "HubLoadError", "check_columns", "load_release", "normalise", "format_reason", "is_incorrect",
           "release_examples", "examples_dataset", "release_dataset", "release_for_stage"]
