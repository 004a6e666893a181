"""The stage-1 steps that need no LLM (paper §3.2, stage 1): reading traces, parsing the LLM's answers,
rule-based splicing, rendering and the final check. Pure Python; each step names what went wrong in a
`Malformed` with a reason such as ``steps/gap``.

>>> parse_outlines('{"outlines": ["x", "y"]}', 2)
['x', 'y']
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .. import format as fmt
from ..config import RewritingConfig
from .chat import Malformed, json_list

META_KEYS = ("split", "family", "shape")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Stage1Settings:
    """Knobs of stage 1. ``min_diversity`` is the paper's Σ thread chars − longest thread chars ≥ 200."""
    max_retries: int = 2
    min_diversity: int = 200
    min_keep: float = 0.5            # an edited thread keeps at least this fraction of its characters
    edit_context_lines: int = 5      # lines shown before a block, and of each end of an earlier sibling
    outline_context_lines: int = 50
    max_tokens: int = 4096
    temperature: float = 0.0

    def __post_init__(self):
        checks = {"max_retries": self.max_retries >= 0, "min_diversity": self.min_diversity >= 0,
                  "min_keep": 0.0 <= self.min_keep <= 1.0, "edit_context_lines": self.edit_context_lines >= 1,
                  "outline_context_lines": self.outline_context_lines >= 1, "max_tokens": self.max_tokens >= 1,
                  "temperature": self.temperature >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"Stage1Settings.{name} = {getattr(self, name)!r} is out of range")

    @classmethod
    def for_stage(cls, cfg: RewritingConfig) -> "Stage1Settings":
        """The knobs of notebook 01b's parameters (`twlib.config.RewritingConfig`)."""
        return cls(max_retries=cfg.max_retries, min_diversity=cfg.min_diversity, max_tokens=cfg.max_tokens,
                   temperature=cfg.temperature)


# -------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Trace:
    r"""A sequential response ``<think>\n...\n</think>\n\n... \boxed{x}`` with its question and gold answer."""
    id: str
    question: str
    answer: str
    response: str
    meta: dict = field(default_factory=dict, compare=False)


def split_response(response: str) -> tuple[list[str], str]:
    r"""Reasoning lines and the tail from ``</think>`` on.

    >>> split_response("<think>\na\nb\n</think>\n\n\\boxed{1}")
    (['a', 'b'], '</think>\n\n\\boxed{1}')
    """
    if not isinstance(response, str) or not response.startswith(fmt.THINK_OPEN):
        raise ValueError(f"the response must start with {fmt.THINK_OPEN}, got {str(response)[:40]!r}")
    if response.count(fmt.THINK_CLOSE) != 1:
        raise ValueError(f"the response must hold exactly one {fmt.THINK_CLOSE}")
    cut = response.index(fmt.THINK_CLOSE)
    body = response[len(fmt.THINK_OPEN):cut]
    if tags := [t for t in fmt.STRUCTURE_TAGS + (fmt.THINK_OPEN,) if t in body]:
        raise ValueError(f"the reasoning already holds {tags[0]}; stage 1 rewrites sequential traces only")
    body = body[1:] if body.startswith("\n") else body
    body = body[:-1] if body.endswith("\n") else body
    if not body.strip():
        raise ValueError("no reasoning between <think> and </think>")
    return body.split("\n"), response[cut:]


def _content(value):
    if isinstance(value, list):  # chat form: the last assistant message
        said = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
        return said[-1] if said else None
    return value


def as_traces(items: Iterable) -> list[Trace]:
    """`Trace` list from Traces, `twlib.tasks.Problem` objects, or dicts / dataset rows with ``question``,
    ``answer`` and a sequential response in ``sequential_completion``, ``response`` or ``completion``
    (text or chat messages). Raises `ValueError` naming the first bad item."""
    out: list[Trace] = []
    for i, item in enumerate(items):
        default_id = f"trace-{i:06d}"
        if isinstance(item, Trace):
            t = item
        elif hasattr(item, "plan") and hasattr(item, "question"):
            t = Trace(default_id, item.question, item.answer, item.plan.sequential_text(),
                      {"family": item.family, "shape": item.shape})
        elif isinstance(item, dict):
            key = next((k for k in ("sequential_completion", "response", "completion") if k in item), None)
            missing = [k for k in ("question", "answer") if k not in item] + ([] if key else ["response"])
            if missing:
                raise ValueError(f"input {i} lacks {missing}; give question, answer and a sequential response")
            t = Trace(str(item.get("id", default_id)), item["question"], str(item["answer"]), _content(item[key]),
                      {k: item[k] for k in META_KEYS if k in item})
        else:
            raise TypeError(f"input {i} is a {type(item).__name__}; expected a Trace, a Problem or a dict")
        if not _ID.fullmatch(t.id):
            raise ValueError(f"input {i}: id {t.id!r} cannot name a folder (letters, digits, . _ -)")
        if not isinstance(t.question, str) or not t.question.strip() or not t.answer.strip():
            raise ValueError(f"input {i} ({t.id}): empty question or answer")
        try:
            split_response(t.response)
            fmt.parse(t.response, strict=True)
        except ValueError as e:  # FormatError included
            raise ValueError(f"input {i} ({t.id}): {e}") from None
        out.append(t)
    if dup := sorted(k for k, n in Counter(t.id for t in out).items() if n > 1):
        raise ValueError(f"trace ids must be unique; repeated: {dup[:5]}")
    return out


# ---------------------------------------------------------------------------------- pure steps
def number_lines(lines: list[str]) -> str:
    return "\n".join(f"[{i}] {line}" for i, line in enumerate(lines, 1))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_steps(reply: str, n_lines: int) -> list[dict]:
    """Step ``{start, end, summary}`` dicts (1-based, inclusive) that cover lines 1..n_lines in order, without gaps.

    >>> parse_steps('{"steps": [{"start": 1, "end": 2}, {"start": 4, "end": 4}]}', 4)
    Traceback (most recent call last):
    twlib.rewriter.chat.Malformed: steps/gap: line 3 belongs to no step (between steps 1 and 2)
    """
    items = json_list(reply, "steps", "steps")
    if not items:
        raise Malformed("steps/bad_schema", "the step list is empty")
    steps = []
    for i, s in enumerate(items, 1):
        if not (isinstance(s, dict) and _is_int(s.get("start")) and _is_int(s.get("end"))):
            raise Malformed("steps/bad_schema", f"step {i} needs integer start and end, got {s!r:.80}")
        if s["start"] > s["end"]:
            raise Malformed("steps/bad_schema", f"step {i} ends (line {s['end']}) before it starts ({s['start']})")
        if s["start"] < 1 or s["end"] > n_lines:
            raise Malformed("steps/out_of_range", f"step {i} spans lines {s['start']}-{s['end']}; there are "
                                                  f"lines 1-{n_lines}")
        steps.append({"start": s["start"], "end": s["end"], "summary": str(s.get("summary", ""))})
    nxt = 1
    for i, s in enumerate(steps, 1):
        if s["start"] > nxt:
            gap = f"line {nxt}" if s["start"] == nxt + 1 else f"lines {nxt}-{s['start'] - 1}"
            where = f"between steps {i - 1} and {i}" if i > 1 else "before step 1"
            raise Malformed("steps/gap", f"{gap} belong{'s' if s['start'] == nxt + 1 else ''} to no step ({where})")
        if s["start"] < nxt:
            raise Malformed("steps/overlap", f"step {i} starts at line {s['start']}, inside step {i - 1} "
                                             f"(which ends at line {nxt - 1})")
        nxt = s["end"] + 1
    if nxt <= n_lines:
        raise Malformed("steps/coverage", f"the steps end at line {nxt - 1}; the reasoning has {n_lines} lines")
    return steps


def parse_groups(reply: str, n_steps: int) -> list[list[list[int]]]:
    """Groups → threads → step numbers. A group has ≥ 2 threads of consecutive steps; groups share no step.

    >>> parse_groups('{"groups": [{"threads": [[1], [2, 3]]}]}', 4)
    [[[1], [2, 3]]]
    >>> parse_groups('{"groups": [{"threads": [[1, 2]]}]}', 4)
    Traceback (most recent call last):
    twlib.rewriter.chat.Malformed: groups/single_thread: group 1 has 1 thread; a group needs at least 2
    """
    groups = []
    for g, item in enumerate(json_list(reply, "groups", "groups"), 1):
        threads = item.get("threads") if isinstance(item, dict) else None
        if not isinstance(threads, list) or not all(
                isinstance(t, list) and t and all(_is_int(x) for x in t) for t in threads):
            raise Malformed("groups/bad_schema", f'group {g} must be {{"threads": [[step, ...], ...]}}, '
                                                 f"got {item!r:.80}")
        if bad := [x for t in threads for x in t if not 1 <= x <= n_steps]:
            raise Malformed("groups/unknown_step", f"group {g} names step {bad[0]}; steps are 1-{n_steps}")
        if len(threads) < 2:
            raise Malformed("groups/single_thread", f"group {g} has {len(threads)} thread; a group needs at least 2")
        flat = [x for t in threads for x in t]
        if flat != list(range(flat[0], flat[0] + len(flat))):
            raise Malformed("groups/not_adjacent", f"group {g}'s threads {threads} are not consecutive steps")
        groups.append(threads)
    groups.sort(key=lambda threads: threads[0][0])
    for a, b in zip(groups, groups[1:]):
        if b[0][0] <= a[-1][-1]:
            raise Malformed("groups/overlap", f"groups {a} and {b} share step {b[0][0]}")
    return groups


def block_ranges(groups: list[list[list[int]]], steps: list[dict]) -> list[list[tuple[int, int]]]:
    """Line range (1-based, inclusive) of every thread of every group.

    >>> block_ranges([[[1], [2, 3]]], [{"start": 1, "end": 2}, {"start": 3, "end": 3}, {"start": 4, "end": 6}])
    [[(1, 2), (3, 6)]]
    """
    return [[(steps[t[0] - 1]["start"], steps[t[-1] - 1]["end"]) for t in threads] for threads in groups]


def splice(lines: list[str], blocks: list[list[tuple[int, int]]], min_diversity: int) -> tuple[list[dict], list[dict]]:
    """Rule-based step 3: cut ``lines`` into ``{"lines": [...]}`` and ``{"threads": [...]}`` items.

    A block is skipped (listed in the second value with its reason) if it has < 2 threads
    (``too_few_threads``), ranges that overlap each other or a kept block (``overlap``), or thread
    texts with Σ chars − longest < ``min_diversity`` (``low_diversity``). Lines inside a kept block
    that no thread covers are dropped, as in the paper.

    >>> splice(["a", "b", "c"], [[(1, 1), (2, 2)]], min_diversity=2)
    ([{'lines': ['a', 'b', 'c']}], [{'block': 0, 'reason': 'low_diversity', 'ranges': [[1, 1], [2, 2]]}])
    """
    kept, skipped, end = [], [], 0
    for b, ranges in sorted(enumerate(blocks), key=lambda x: min((r[0] for r in x[1]), default=0)):
        if any(not 1 <= s <= e <= len(lines) for s, e in ranges):
            raise ValueError(f"block {b} has a range outside lines 1-{len(lines)}: {ranges}")
        order = sorted(ranges)
        sizes = [len("\n".join(lines[s - 1:e])) for s, e in ranges]
        if len(ranges) < 2:
            reason = "too_few_threads"
        elif order[0][0] <= end or any(c[0] <= p[1] for p, c in zip(order, order[1:])):
            reason = "overlap"
        elif sum(sizes) - max(sizes) < min_diversity:
            reason = "low_diversity"
        else:
            kept.append(ranges)
            end = order[-1][1]
            continue
        skipped.append({"block": b, "reason": reason, "ranges": [list(r) for r in ranges]})
    items, pos = [], 1
    for ranges in kept:
        first, last = min(s for s, _ in ranges), max(e for _, e in ranges)
        if pos < first:
            items.append({"lines": lines[pos - 1:first - 1]})
        items.append({"threads": ["\n".join(lines[s - 1:e]) for s, e in ranges]})
        pos = last + 1
    if pos <= len(lines):
        items.append({"lines": lines[pos - 1:]})
    return items, skipped


def apply_edits(text: str, edits: list[dict]) -> str:
    """Apply ``{src, dest}`` edits in order, each at the first place its ``src`` occurs.

    >>> apply_edits("so A=3, as above", [{"src": ", as above", "dest": ""}])
    'so A=3'
    """
    for i, e in enumerate(edits, 1):
        if e["src"] not in text:
            raise Malformed("edits/src_not_found", f"edit {i}: src {e['src'][:60]!r} does not occur in the thread")
        text = text.replace(e["src"], e["dest"], 1)
    return text


def parse_edits(reply: str, thread: str, min_keep: float = 0.5) -> tuple[str, list[dict]]:
    """Step 4: the edited thread and the edits; rejects an unknown ``src``, new tags, or a thread cut
    below ``min_keep`` of its characters.

    >>> parse_edits('{"edits": [{"src": " as above", "dest": ""}]}', "By the same method as above, B=2*2=4")[0]
    'By the same method, B=2*2=4'
    """
    edits = json_list(reply, "edits", "edits")
    for i, e in enumerate(edits, 1):
        if not (isinstance(e, dict) and isinstance(e.get("src"), str) and e["src"] and isinstance(e.get("dest"), str)):
            raise Malformed("edits/bad_schema", f'edit {i} must be {{"src": "...", "dest": "..."}}, got {e!r:.80}')
    new = apply_edits(thread, edits)
    if tags := [t for t in fmt.TAGS if new.count(t) > thread.count(t)]:
        raise Malformed("edits/bad_schema", f"the edits bring the tag {tags[0]} into the thread")
    if not new.strip() or len(new) < min_keep * len(thread):
        raise Malformed("edits/shrunk", f"the thread shrinks from {len(thread)} to {len(new)} characters "
                                        f"(below {min_keep:.0%})")
    return new, edits


def parse_outlines(reply: str, n_threads: int) -> list[str]:
    """``n_threads`` distinct one-line outlines without tags.

    >>> parse_outlines('{"outlines": ["A", "B", "C"]}', 2)
    Traceback (most recent call last):
    twlib.rewriter.chat.Malformed: outlines/count: 3 outlines for 2 threads
    """
    items = json_list(reply, "outlines", "outlines")
    if not all(isinstance(o, str) for o in items):
        raise Malformed("outlines/bad_schema", "every outline must be a string")
    items = [o.strip() for o in items]
    if len(items) != n_threads:
        raise Malformed("outlines/count", f"{len(items)} outlines for {n_threads} threads")
    for i, o in enumerate(items, 1):
        if not o or "\n" in o or any(t in o for t in fmt.TAGS):
            raise Malformed("outlines/bad_schema", f"outline {i} must be one non-empty line without tags: {o[:60]!r}")
    folded = [o.casefold() for o in items]
    if len(set(folded)) < len(folded):
        i = next(i for i, o in enumerate(folded) if folded.index(o) != i)
        raise Malformed("outlines/duplicate", f"outline {i + 1} repeats outline {folded.index(folded[i]) + 1}")
    return items


def render(draft: list[dict], tail: str) -> str:
    r"""Canonical text (docs/design.md §4) of a draft whose blocks carry ``outlines``; ``tail`` starts at ``</think>``.

    >>> render([{"lines": ["x"]}], "</think>\n\n\\boxed{1}")
    '<think>\nx\n</think>\n\n\\boxed{1}'
    """
    items, text = [], fmt.THINK_OPEN + "\n"
    for item in draft:
        if "lines" in item:
            text += "".join(line + "\n" for line in item["lines"])
        else:
            items += [fmt.Text(text), fmt.Block.from_plan(item["outlines"], item["threads"])]
            text = "\n"
    return fmt.Trajectory(tuple(items) + (fmt.Text(text + tail),)).render()


def finish(text: str, gold: str, count: Callable[[str], int] = len) -> fmt.Trajectory:
    r"""Step 6: strict parse with token counts, at least one block, the boxed answer equal to ``gold``.

    >>> finish("<think>\nx\n</think>\n\n\\boxed{1}", "1")
    Traceback (most recent call last):
    twlib.rewriter.chat.Malformed: format/no_block: the trajectory has no <Parallel> block
    """
    try:
        traj = fmt.parse(text, strict=True, count=count)
    except fmt.FormatError as e:
        raise Malformed("format/invalid", str(e)) from None
    if not traj.blocks:
        raise Malformed("format/no_block", "the trajectory has no <Parallel> block")
    if (traj.answer or "").strip() != gold.strip():
        raise Malformed("format/answer_mismatch", f"boxed {traj.answer!r}, gold {gold!r}")
    return traj


__all__ = ["Stage1Settings", "Trace", "Malformed", "as_traces", "split_response", "number_lines", "parse_steps",
           "parse_groups", "block_ranges", "splice", "apply_edits", "parse_edits", "parse_outlines", "render", "finish"]
