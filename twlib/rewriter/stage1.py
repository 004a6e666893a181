"""Stage 1 over all traces at once (paper §3.2): the LLM steps batched across traces, every answer cached,
each trace's answers saved, accepted rows and a report (`run_stage1`)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from datasets import Dataset

from .. import format as fmt
from ..dataset import trajectory_row
from ..files import atomic_write_json
from .chat import CachedChat, ChatLLM, Malformed, Question, ask_all, prompt
from .steps import (
    Stage1Settings,
    Trace,
    as_traces,
    block_ranges,
    finish,
    number_lines,
    parse_edits,
    parse_groups,
    parse_outlines,
    parse_steps,
    render,
    splice,
    split_response,
)


def _context(draft: list[dict], block: int, n: int) -> str:
    """The last ``n`` lines before item ``block`` of a draft."""
    before = [x for item in draft[:block] for x in (item.get("lines") or "\n".join(item["threads"]).split("\n"))]
    return "\n".join(before[-n:]) if before else "(the block opens the reasoning)"


def _shorten(text: str, n: int) -> str:
    lines = text.split("\n")
    return text if len(lines) <= 2 * n else "\n".join(lines[:n] + ["..."] + lines[-n:])


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
    """Accepted rows (`twlib.dataset.trajectory_row` plus id, meta and source), rejections, the report."""
    rows: list[dict]
    rejected: list[dict]
    report: dict

    @property
    def dataset(self) -> Dataset:
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

    ``traces``: see `as_traces`. ``llm``: a `ChatLLM` (`twlib.rewriter.chat.EngineChat`, `HTTPChat`);
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
                t = st.trace
                rows.append({"id": t.id, **t.meta, **trajectory_row(t.question, t.answer, text, t.response, count,
                                                                    tokenizer), "source": "stage1"})
                st.save("6_result", {"status": "accepted", "text": text, "statistics": fmt.statistics(traj).as_dict()})
        if st.rejection is not None:
            st.save("6_result", {"status": "rejected", **st.rejection})
    report = _report(states, accepted, run, cached.calls - calls, cached.hits - hits, unit)
    atomic_write_json(run_dir / "report.json", report)
    return Stage1Result(rows, [st.rejection for st in states if st.rejection], report)


__all__ = ["Stage1Result", "run_stage1"]
