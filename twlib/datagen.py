r"""Stage 1 of the paper's two-stage parallel trajectory generator (DESIGN §9): an LLM rewrites
sequential reasoning traces into fork-join ones.

Steps, each saved per trace as ``<run_dir>/traces/<id>/<n>_<step>.json``:

1. ``steps``: the LLM cuts the numbered reasoning lines into gapless steps (`parse_steps`);
2. ``groups``: the LLM groups adjacent independent steps into threads (`parse_groups`);
3. ``splice``: rules turn groups into blocks: ≥ 2 threads, no overlap, diversity (`splice`);
4. ``edits``: the LLM removes references to earlier sibling threads with ``{src, dest}`` edits (`parse_edits`);
5. ``outlines``: the LLM writes one outline per thread (`parse_outlines`);
6. ``result``: strict format check, gold answer, statistics (`finish`).

A malformed answer is sent back with the problem named, at most ``max_retries`` times; then the
trace is rejected with the reason (``steps/gap``, ``edits/src_not_found``, ...). The pure steps,
on a five-line trace::

    >>> lines = ["x=1+1", "=2", "y=3*1", "=3", "x+y=5"]
    >>> steps = parse_steps('{"steps": [{"start": 1, "end": 2}, {"start": 3, "end": 4}, {"start": 5, "end": 5}]}', 5)
    >>> groups = parse_groups('{"groups": [{"threads": [[1], [2]]}]}', len(steps))
    >>> draft, skipped = splice(lines, block_ranges(groups, steps), min_diversity=1)
    >>> draft
    [{'threads': ['x=1+1\n=2', 'y=3*1\n=3']}, {'lines': ['x+y=5']}]
    >>> draft[0]["outlines"] = parse_outlines('{"outlines": ["x", "y"]}', 2)
    >>> print(render(draft, "</think>\n\n\\boxed{5}"))  # doctest: +NORMALIZE_WHITESPACE
    <think> <Parallel> <Outlines> <Outline>1: x</Outline> <Outline>2: y</Outline> </Outlines>
    <Thread> 1: x=1+1 =2 </Thread><Thread> 2: y=3*1 =3 </Thread> </Parallel> x+y=5 </think>
    \boxed{5}
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from . import format as fmt
from .llm import CachedChat, ChatLLM, Malformed, Question, ask_all, json_list, prompt
from .runs import atomic_write_json

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
    twlib.llm.Malformed: steps/gap: line 3 belongs to no step (between steps 1 and 2)
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
    twlib.llm.Malformed: groups/single_thread: group 1 has 1 thread; a group needs at least 2
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
    twlib.llm.Malformed: outlines/count: 3 outlines for 2 threads
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
    r"""Canonical text (DESIGN §4) of a draft whose blocks carry ``outlines``; ``tail`` starts at ``</think>``.

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
    twlib.llm.Malformed: format/no_block: the trajectory has no <Parallel> block
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


def _context(draft: list[dict], block: int, n: int) -> str:
    """The last ``n`` lines before item ``block`` of a draft."""
    before = [x for item in draft[:block] for x in (item.get("lines") or "\n".join(item["threads"]).split("\n"))]
    return "\n".join(before[-n:]) if before else "(the block opens the reasoning)"


def _shorten(text: str, n: int) -> str:
    lines = text.split("\n")
    return text if len(lines) <= 2 * n else "\n".join(lines[:n] + ["..."] + lines[-n:])


# ------------------------------------------------------------------------------------ pipeline
@dataclass
class _State:
    """One trace on its way through the steps."""
    trace: Trace
    lines: list[str]
    tail: str
    folder: Path
    rejection: dict | None = None
    steps: list[dict] = field(default_factory=list)
    draft: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def save(self, step: str, record: dict) -> None:
        atomic_write_json(self.folder / f"{step}.json", record)

    def reject(self, step: str, reason: str, detail: str) -> None:
        self.rejection = {"id": self.trace.id, "step": step, "reason": reason, "detail": detail}


@dataclass
class Stage1Result:
    """Accepted rows (the columns of `twlib.data.problem_row` where they apply), rejections, the report."""
    rows: list[dict]
    rejected: list[dict]
    report: dict

    @property
    def dataset(self):
        from datasets import Dataset
        return Dataset.from_list(self.rows)


def _user(name: str, **values) -> list[dict]:
    return [{"role": "user", "content": prompt(name, **values)}]


class _Run:
    """The LLM steps over all live traces at once, so that an engine batches them."""

    def __init__(self, llm: CachedChat, settings: Stage1Settings, progress: bool):
        self.llm, self.s, self.progress = llm, settings, progress
        self.malformed: Counter = Counter()
        self.retries = 0

    def ask(self, live: list[_State], qs: list[Question], step: str, record) -> list[Question]:
        """Ask, save each trace's answers, reject a trace at its first failed question; the other traces' questions."""
        s = self.s
        self.malformed += ask_all(self.llm, qs, s.max_retries, s.max_tokens, s.temperature, f"stage 1: {step}",
                                  self.progress)
        self.retries += sum(len(q.attempts) - 1 for q in qs)
        for st in live:
            mine = [q for q in qs if q.tag[0] is st]
            st.save(step, {"questions": [record(q) for q in mine]})
            if failed := next((q for q in mine if q.error), None):
                where = "".join(f"{k} {v}, " for k, v in zip(("item", "thread"), failed.tag[1:]))
                st.reject(step, failed.error.reason, where + failed.error.detail)
        return [q for q in qs if q.tag[0].rejection is None]

    def steps(self, live: list[_State]) -> None:
        qs = [Question(_user("stage1_steps", question=st.trace.question, n_lines=len(st.lines),
                             numbered_lines=number_lines(st.lines)),
                       lambda r, n=len(st.lines): parse_steps(r, n), (st,)) for st in live]
        for q in self.ask(live, qs, "1_steps", lambda q: {"attempts": q.attempts, "steps": q.value}):
            q.tag[0].steps = q.value

    def groups(self, live: list[_State]) -> None:
        qs = []
        for st in live:
            listing = "\n".join(f"S{i} (lines {s['start']}-{s['end']}): {s['summary']}" for i, s in enumerate(st.steps, 1))
            qs.append(Question(_user("stage1_groups", question=st.trace.question, n_lines=len(st.lines),
                                     numbered_lines=number_lines(st.lines), step_list=listing),
                               lambda r, n=len(st.steps): parse_groups(r, n), (st,)))
        for q in self.ask(live, qs, "2_groups", lambda q: {"attempts": q.attempts, "groups": q.value}):
            st = q.tag[0]
            if not q.value:
                st.reject("2_groups", "groups/none", "the LLM found no steps to run in parallel")
                continue
            ranges = block_ranges(q.value, st.steps)
            st.draft, st.skipped = splice(st.lines, ranges, self.s.min_diversity)
            st.save("3_splice", {"thread_line_ranges": ranges, "draft": st.draft, "skipped_blocks": st.skipped})
            if not any("threads" in item for item in st.draft):
                st.reject("3_splice", "splice/no_block", f"every group was skipped: {st.skipped}")

    def edits(self, live: list[_State]) -> None:
        n, qs = self.s.edit_context_lines, []
        for st in live:
            for b, item in enumerate(st.draft):
                for k, thread in enumerate(item.get("threads", [])[1:], 2):
                    siblings = "\n\n".join(f"### Thread {j}\n{_shorten(t, n)}" for j, t in enumerate(item["threads"][:k - 1], 1))
                    qs.append(Question(_user("stage1_edits", question=st.trace.question, thread=k, siblings=siblings,
                                             context=_context(st.draft, b, n), thread_text=thread),
                                       lambda r, t=thread: parse_edits(r, t, self.s.min_keep), (st, b, k)))
        for q in self.ask(live, qs, "4_edits", lambda q: {"item": q.tag[1], "thread": q.tag[2], "attempts": q.attempts,
                                                          "edits": q.value and q.value[1], "text": q.value and q.value[0]}):
            st, b, k = q.tag
            st.draft[b]["threads"][k - 1] = q.value[0]

    def outlines(self, live: list[_State]) -> None:
        qs = []
        for st in live:
            for b, item in enumerate(st.draft):
                if "threads" in item:
                    threads = "\n\n".join(f"### Thread {j}\n{t}" for j, t in enumerate(item["threads"], 1))
                    qs.append(Question(_user("stage1_outlines", question=st.trace.question, threads=threads,
                                             n_threads=len(item["threads"]),
                                             context=_context(st.draft, b, self.s.outline_context_lines)),
                                       lambda r, k=len(item["threads"]): parse_outlines(r, k), (st, b)))
        for q in self.ask(live, qs, "5_outlines", lambda q: {"item": q.tag[1], "attempts": q.attempts,
                                                             "outlines": q.value}):
            q.tag[0].draft[q.tag[1]]["outlines"] = q.value


def _row(t: Trace, text: str, traj: fmt.Trajectory, count, tokenizer) -> dict:
    seq, par = fmt.statistics(fmt.parse(t.response, strict=True, count=count)), fmt.statistics(traj)
    # EOS is generated too, so it counts as one response token (as in twlib.data.problem_row).
    row = {"id": t.id, **t.meta, "question": t.question, "answer": t.answer,
           "prompt": [{"role": "user", "content": t.question}],
           "completion": [{"role": "assistant", "content": text}],
           "sequential_completion": [{"role": "assistant", "content": t.response}],
           "seq_tokens": seq.total_tokens + 1, "par_total_tokens": par.total_tokens + 1,
           "par_critical_tokens": par.critical_path_tokens + 1, "num_blocks": par.num_blocks,
           "max_threads": max(par.threads_per_block),
           "ideal_speedup": (seq.total_tokens + 1) / (par.critical_path_tokens + 1), "source": "stage1"}
    if tokenizer is not None:
        from .tokenizer import drift, prompt_ids
        d = drift(traj, tokenizer)
        row |= {"prompt_tokens": len(prompt_ids(tokenizer, t.question)),
                "drift_tokens": -1 if d.first_mismatch is None else d.first_mismatch}
    return row


def _report(states: list[_State], stats: list[fmt.Trajectory], run: _Run, calls: int, hits: int, unit: str) -> dict:
    rejected = Counter(st.rejection["reason"] for st in states if st.rejection)
    summaries = [fmt.statistics(t) for t in stats]
    blocks = [b for t in stats for b in t.blocks]
    means = {"parallel_ratio": [s.parallel_ratio for s in summaries],
             "acceleration_ratio": [s.acceleration_ratio for s in summaries],
             "total_tokens": [s.total_tokens for s in summaries],
             "critical_path_tokens": [s.critical_path_tokens for s in summaries],
             "blocks": [s.num_blocks for s in summaries], "tokens_per_block": [b.n_tokens for b in blocks],
             "threads_per_block": [len(b.threads) for b in blocks],
             "thread_tokens": [t.n_tokens for b in blocks for t in b.threads]}
    return {"traces": len(states), "accepted": len(stats), "rejected": sum(rejected.values()),
            "acceptance_rate": len(stats) / len(states) if states else None,
            "rejected_by_reason": dict(sorted(rejected.items())),
            "malformed_answers_by_reason": dict(sorted(run.malformed.items())), "retries": run.retries,
            "skipped_blocks_by_reason": dict(sorted(Counter(b["reason"] for st in states for b in st.skipped).items())),
            "llm_calls": calls, "cache_hits": hits, "token_unit": unit,
            **{f"mean_{k}": sum(v) / len(v) if v else None for k, v in means.items()}}


def _prepare(run_dir: Path, header: dict, overwrite: bool) -> None:
    """Refuse to mix runs with different settings in one folder unless ``overwrite`` clears it."""
    path = run_dir / "settings.json"
    if overwrite:
        shutil.rmtree(run_dir / "traces", ignore_errors=True)
    elif path.exists() and (old := json.loads(path.read_text(encoding="utf-8"))) != header:
        diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
        raise FileExistsError(f"{run_dir} holds a stage-1 run with other {diff}; choose another run_dir or "
                              "pass overwrite=True to replace its trace files (the LLM cache is kept)")
    atomic_write_json(path, header)


def run_stage1(traces: Iterable, llm: ChatLLM, run_dir: str | Path, settings: Stage1Settings | None = None,
               tokenizer=None, cache_dir: str | Path | None = None, overwrite: bool = False,
               progress: bool = True) -> Stage1Result:
    """Rewrite sequential traces into parallel trajectories (stage 1, steps 1-6 above).

    ``traces``: see `as_traces`. ``llm``: a `ChatLLM` (`twlib.llm.EngineChat`, `twlib.llm.HTTPChat`);
    it is wrapped in a `CachedChat` on ``cache_dir`` (default ``<run_dir>/llm_cache``) unless it is one.
    ``tokenizer`` counts tokens for the statistics (characters without one). Writes
    ``<run_dir>/settings.json``, ``traces/<id>/<n>_<step>.json`` and ``report.json``; a rerun with the
    same settings reads every answer from the cache. Example (notebook)::

        result = run_stage1(problems, HTTPChat(url, "model"), run.path("stage1"), Stage1Settings())  # doctest: +SKIP
        result.report["rejected_by_reason"], result.dataset                                          # doctest: +SKIP
    """
    settings = settings or Stage1Settings()
    traces, run_dir = as_traces(traces), Path(run_dir)
    cached = llm if isinstance(llm, CachedChat) else CachedChat(llm, Path(cache_dir) if cache_dir else run_dir / "llm_cache")
    calls, hits = cached.calls, cached.hits
    unit = "characters" if tokenizer is None else f"tokens ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__})"
    _prepare(run_dir, {"settings": dataclasses.asdict(settings), "model_id": cached.model_id, "token_unit": unit},
             overwrite)
    count = len if tokenizer is None else (lambda s: len(tokenizer.encode(s, add_special_tokens=False)))

    states = []
    for t in traces:
        st = _State(t, *split_response(t.response), run_dir / "traces" / t.id)
        record = {"id": t.id, "question": t.question, "answer": t.answer, "response": t.response, "meta": t.meta}
        old = st.folder / "0_input.json"
        if old.exists() and json.loads(old.read_text(encoding="utf-8")) != json.loads(json.dumps(record)):
            raise FileExistsError(f"{old} holds another input for id {t.id}; use another run_dir or overwrite=True")
        st.save("0_input", record)
        if (boxed := fmt.parse(t.response).answer or "").strip() != t.answer.strip():
            st.reject("0_input", "input/answer_mismatch", f"the sequential trace boxes {boxed!r}, gold is {t.answer!r}")
        states.append(st)

    run = _Run(cached, settings, progress)
    for step in (run.steps, run.groups, run.edits, run.outlines):
        step([st for st in states if st.rejection is None])

    rows, accepted = [], []
    for st in states:
        if st.rejection is None:
            text = render(st.draft, st.tail)
            try:
                traj = finish(text, st.trace.answer, count)
            except Malformed as e:
                st.reject("6_result", e.reason, e.detail)
            else:
                accepted.append(traj)
                rows.append(_row(st.trace, text, traj, count, tokenizer))
                st.save("6_result", {"status": "accepted", "text": text, "statistics": fmt.statistics(traj).as_dict()})
        if st.rejection is not None:
            st.save("6_result", {"status": "rejected", **st.rejection})
    report = _report(states, accepted, run, cached.calls - calls, cached.hits - hits, unit)
    atomic_write_json(run_dir / "report.json", report)
    return Stage1Result(rows, [st.rejection for st in states if st.rejection], report)


__all__ = ["Stage1Settings", "Stage1Result", "Trace", "Malformed", "as_traces", "split_response", "number_lines",
           "parse_steps", "parse_groups", "block_ranges", "splice", "apply_edits", "parse_edits", "parse_outlines",
           "render", "finish", "run_stage1"]
