"""Stage-1 rewriting: each step against recorded LLM answers (good and malformed), the cache, the clients,
and an end-to-end run against a real ``vllm serve``."""
import json
import random
from pathlib import Path

import pytest
from scripted_engines import END, TOK, ScriptEngine
from test_engines_openai import stand_in  # noqa: F401  (a fixture)

from twlib import format as fmt
from twlib.engines import EngineError
from twlib.rewriter import (
    Stage1Settings,
    Trace,
    as_traces,
    block_ranges,
    finish,
    parse_edits,
    parse_groups,
    parse_outlines,
    parse_steps,
    render,
    run_stage1,
    splice,
    split_response,
)
from twlib.rewriter.chat import CachedChat, CacheWarning, EngineChat, HTTPChat, Malformed, cache_key, json_list, prompt
from twlib.tasks import ExpressionParams, make_problem

FIXTURES = Path(__file__).parent / "fixtures" / "rewriter"
TRACE = json.loads((FIXTURES / "trace.json").read_text())
# Small enough for the short synthetic threads (35, 27 and 35 characters); the paper uses 200.
SETTINGS = Stage1Settings(min_diversity=20, max_retries=2)
HEADINGS = {"# Step extraction": "steps", "# Parallel grouping": "groups",
            "# Removing cross-thread references": "edits", "# Outlines": "outlines"}


def reply(name: str) -> str:
    return (FIXTURES / "replies" / f"{name}.txt").read_text()


class ScriptedLLM:
    """Answers each step's requests with the next recorded reply of that step; counts calls."""

    model_id = "scripted"

    def __init__(self, **script):
        self.script = {step: list(names) for step, names in script.items()}
        self.calls: list[tuple[str, list[dict]]] = []

    def chat(self, messages, max_tokens, temperature):
        step = HEADINGS[messages[0]["content"].split("\n", 1)[0]]
        self.calls.append((step, messages))
        queue = self.script.get(step)
        if not queue:
            raise AssertionError(f"unexpected {step} request #{self.count(step)}")
        return reply(queue.pop(0))

    def count(self, step=None):
        return sum(1 for s, _ in self.calls if step is None or s == step)


GOOD = dict(steps=["steps_good"], groups=["groups_good"], edits=["edits_none"] * 2, outlines=["outlines_good"])


def good(**changes):
    return ScriptedLLM(**(GOOD | changes))


def problem():
    return make_problem("expressions", random.Random(5), ExpressionParams(
        groups_min=3, groups_max=3, repeats_min=2, repeats_max=3, balanced_fraction=1.0))


def trace():
    return Trace(TRACE["id"], TRACE["question"], TRACE["answer"], TRACE["response"])


def run(llm, tmp_path, settings=SETTINGS, **kw):
    return run_stage1([trace()], llm, tmp_path / "run", settings, progress=False, **kw)


# ------------------------------------------------------------------------------ whole pipeline
def test_fixture_trace_is_what_the_task_generator_makes():
    p = problem()
    assert (p.question, p.answer, p.plan.sequential_text()) == (TRACE["question"], TRACE["answer"], TRACE["response"])


def test_good_answers_rebuild_the_planned_parallel_trajectory(tmp_path):
    llm = good()
    result = run(llm, tmp_path)
    expected = problem().plan.parallel_text()
    assert [r["completion"][0]["content"] for r in result.rows] == [expected]
    assert result.rejected == []
    assert [llm.count(s) for s in ("steps", "groups", "edits", "outlines")] == [1, 1, 2, 1]
    stats = fmt.statistics(fmt.parse(expected, count=len))
    rep = result.report
    assert (rep["traces"], rep["accepted"], rep["rejected"], rep["retries"], rep["llm_calls"], rep["cache_hits"]) == \
        (1, 1, 0, 0, 5, 0)
    assert rep["rejected_by_reason"] == {} and rep["malformed_answers_by_reason"] == {}
    assert rep["mean_acceleration_ratio"] == pytest.approx(stats.acceleration_ratio)
    assert rep["mean_parallel_ratio"] == pytest.approx(stats.parallel_ratio)
    assert rep["mean_threads_per_block"] == 3 and rep["mean_blocks"] == 1
    assert rep["mean_tokens_per_block"] == fmt.parse(expected, count=len).blocks[0].n_tokens
    assert rep["token_unit"] == "characters"
    row = result.rows[0]
    assert row["prompt"] == [{"role": "user", "content": TRACE["question"]}]
    assert row["sequential_completion"][0]["content"] == TRACE["response"]
    # Characters with each tag counting one, plus EOS: 150 characters, 15 of them in <think> and </think>.
    assert (row["par_critical_tokens"], row["seq_tokens"]) == (stats.critical_path_tokens + 1, 150 - 15 + 2 + 1)
    assert result.dataset.num_rows == 1 and result.dataset[0]["answer"] == "5"

    folder = tmp_path / "run" / "traces" / TRACE["id"]
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{n}.json" for n in ("0_input", "1_steps", "2_groups", "3_splice", "4_edits", "5_outlines",
                                           "6_result")]
    splice_file = json.loads((folder / "3_splice.json").read_text())
    assert splice_file["thread_line_ranges"] == [[[1, 5], [6, 9], [10, 14]]]
    assert splice_file["draft"][1] == {"lines": ["A1+B5:1+5=6", "6+C9:6+9=5"]}
    assert json.loads((folder / "6_result.json").read_text())["text"] == expected
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == rep


def test_the_step_prompt_shows_numbered_lines_and_the_groups_prompt_the_steps(tmp_path):
    llm = good()
    run(llm, tmp_path)
    steps_prompt = llm.calls[0][1][0]["content"]
    assert "[1] a8+b1*c3\n[2] 3:8+1=9\n" in steps_prompt and "[16] 6+C9:6+9=5" in steps_prompt
    assert "Reasoning (16 lines)" in steps_prompt and TRACE["question"] in steps_prompt
    groups_prompt = llm.calls[1][1][0]["content"]
    assert "S2 (lines 6-9): work out d3+e1*f2: B is 5" in groups_prompt
    edits_prompt = llm.calls[3][1][0]["content"]  # thread 3 sees threads 1 and 2 as forbidden context
    assert "### Thread 1\na8+b1*c3" in edits_prompt and "### Thread 2\nd3+e1*f2" in edits_prompt
    assert "## Thread 3\n\ng1+h6*i3" in edits_prompt


def test_a_second_run_is_served_from_the_cache(tmp_path):
    first = run(good(), tmp_path)
    silent = ScriptedLLM()  # any request is an error
    again = run(silent, tmp_path)
    assert silent.calls == []
    assert again.report["llm_calls"] == 0 and again.report["cache_hits"] == 5
    assert again.rows == first.rows


def test_an_interrupted_run_resumes_without_asking_again(tmp_path):
    crashing = ScriptedLLM(steps=["steps_good"], groups=["groups_good"])  # dies at the first edit request
    with pytest.raises(AssertionError, match="unexpected edits request"):
        run(crashing, tmp_path)
    llm = good()
    result = run(llm, tmp_path)
    assert [llm.count(s) for s in ("steps", "groups", "edits", "outlines")] == [0, 0, 2, 1]
    assert (result.report["llm_calls"], result.report["cache_hits"], result.report["accepted"]) == (3, 2, 1)


def test_an_edit_is_applied_to_its_thread(tmp_path):
    result = run(good(edits=["edits_good", "edits_none"]), tmp_path)
    text = result.rows[0]["completion"][0]["content"]
    assert text == problem().plan.parallel_text().replace("\nB5\n</Thread>", "\nso B5\n</Thread>")


def test_two_thread_groups_and_other_outlines(tmp_path):
    result = run(good(groups=["groups_two_threads"], edits=["edits_none"], outlines=["outlines_two"]), tmp_path)
    traj = fmt.parse(result.rows[0]["completion"][0]["content"])
    (block,) = traj.blocks
    assert [t.body for t in block.threads] == [" a8+b1*c3\n3:8+1=9\n2:9+1=0\n1:0+1=1\nA1\nd3+e1*f2\n2:3+1=4\n1:4+1=5\nB5\n",
                                               " g1+h6*i3\n3:1+6=7\n2:7+6=3\n1:3+6=9\nC9\n"]
    assert [o.body for o in block.outlines] == [" A", " B"]


MALFORMED = [
    # (script changes, retries allowed, rejection reason or None, calls per step, retries made,
    #  malformed answers by reason)
    (dict(steps=["steps_truncated", "steps_good"]), 2, None, [2, 1, 2, 1], 1, {"steps/bad_json": 1}),
    (dict(steps=["steps_good_wrapped"]), 0, None, [1, 1, 2, 1], 0, {}),
    (dict(steps=["steps_prose"] * 3), 2, "steps/bad_json", [3, 0, 0, 0], 2, {"steps/bad_json": 3}),
    (dict(steps=["steps_gap"] * 3), 2, "steps/gap", [3, 0, 0, 0], 2, {"steps/gap": 3}),
    (dict(steps=["steps_overlap", "steps_short"]), 1, "steps/coverage", [2, 0, 0, 0], 1,
     {"steps/overlap": 1, "steps/coverage": 1}),
    (dict(steps=["steps_strings"]), 0, "steps/bad_schema", [1, 0, 0, 0], 0, {"steps/bad_schema": 1}),
    (dict(groups=["groups_overlap"] * 2), 1, "groups/overlap", [1, 2, 0, 0], 1, {"groups/overlap": 2}),
    (dict(groups=["groups_single"] * 3), 2, "groups/single_thread", [1, 3, 0, 0], 2, {"groups/single_thread": 3}),
    (dict(groups=["groups_not_adjacent", "groups_unknown_step", "groups_good"]), 2, None, [1, 3, 2, 1], 2,
     {"groups/not_adjacent": 1, "groups/unknown_step": 1}),
    (dict(groups=["groups_none"]), 2, "groups/none", [1, 1, 0, 0], 0, {}),
    # Edits of threads 2 and 3 go out together; only thread 2's is asked again.
    (dict(edits=["edits_src_missing", "edits_none", "edits_none"]), 2, None, [1, 1, 3, 1], 1,
     {"edits/src_not_found": 1}),
    (dict(edits=["edits_src_missing", "edits_none", "edits_src_missing", "edits_src_missing"]), 2,
     "edits/src_not_found", [1, 1, 4, 0], 2, {"edits/src_not_found": 3}),
    (dict(edits=["edits_shrink", "edits_none", "edits_shrink"]), 1, "edits/shrunk", [1, 1, 3, 0], 1,
     {"edits/shrunk": 2}),
    (dict(edits=["edits_tag", "edits_none"]), 0, "edits/bad_schema", [1, 1, 2, 0], 0, {"edits/bad_schema": 1}),
    (dict(outlines=["outlines_count"] * 3), 2, "outlines/count", [1, 1, 2, 3], 2, {"outlines/count": 3}),
    (dict(outlines=["outlines_duplicate", "outlines_multiline", "outlines_good"]), 2, None, [1, 1, 2, 3], 2,
     {"outlines/duplicate": 1, "outlines/bad_schema": 1}),
]


@pytest.mark.parametrize("changes,allowed,reason,calls,retries,malformed", MALFORMED)
def test_malformed_answers_are_retried_then_rejected(tmp_path, changes, allowed, reason, calls, retries, malformed):
    llm = good(**changes)
    result = run(llm, tmp_path, Stage1Settings(min_diversity=20, max_retries=allowed))
    rep = result.report
    assert [llm.count(s) for s in ("steps", "groups", "edits", "outlines")] == calls
    assert rep["llm_calls"] == sum(calls) and rep["retries"] == retries
    assert rep["malformed_answers_by_reason"] == malformed
    if reason is None:
        assert rep["accepted"] == 1 and rep["rejected_by_reason"] == {}
    else:
        assert rep["accepted"] == 0 and rep["rejected_by_reason"] == {reason: 1}
        assert result.rows == [] and result.rejected[0]["reason"] == reason
        saved = json.loads((tmp_path / "run" / "traces" / TRACE["id"] / "6_result.json").read_text())
        assert saved["status"] == "rejected" and saved["reason"] == reason


def test_a_rejection_names_the_problem_and_the_retry_shows_it(tmp_path):
    llm = good(steps=["steps_gap"] * 2)
    result = run(llm, tmp_path, Stage1Settings(min_diversity=20, max_retries=1))
    assert result.rejected == [{"id": TRACE["id"], "step": "1_steps", "reason": "steps/gap",
                                "detail": "line 6 belongs to no step (between steps 1 and 2)"}]
    retry = llm.calls[1][1]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == reply("steps_gap")
    assert retry[2]["content"].startswith("That answer cannot be used: steps/gap: line 6 belongs to no step")
    saved = json.loads((tmp_path / "run" / "traces" / TRACE["id"] / "1_steps.json").read_text())
    assert [a["error"] for a in saved["questions"][0]["attempts"]] == \
        ["steps/gap: line 6 belongs to no step (between steps 1 and 2)"] * 2

    edits = good(edits=["edits_src_missing", "edits_none", "edits_src_missing"])
    result = run(edits, tmp_path / "other", Stage1Settings(min_diversity=20, max_retries=1))
    assert result.rejected[0]["detail"] == "item 0, thread 2, edit 1: src 'A1+B5' does not occur in the thread"


def test_the_diversity_rule_skips_blocks(tmp_path):
    llm = good()
    result = run(llm, tmp_path, Stage1Settings(min_diversity=63))  # Σ − longest = 35 + 27 + 35 − 35 = 62
    assert result.report["rejected_by_reason"] == {"splice/no_block": 1}
    assert result.report["skipped_blocks_by_reason"] == {"low_diversity": 1}
    assert [llm.count(s) for s in ("steps", "groups", "edits", "outlines")] == [1, 1, 0, 0]
    assert run(good(), tmp_path / "b", Stage1Settings(min_diversity=62)).report["accepted"] == 1


def test_a_wrong_sequential_answer_is_rejected_without_calls(tmp_path):
    t = Trace("wrong", TRACE["question"], "7", TRACE["response"])
    llm = ScriptedLLM()
    result = run_stage1([t], llm, tmp_path / "run", SETTINGS, progress=False)
    assert result.report["rejected_by_reason"] == {"input/answer_mismatch": 1} and llm.calls == []


def test_many_traces_share_one_batch_per_step(tmp_path):
    calls = []

    class Batched(ScriptedLLM):
        def chat_batch(self, conversations, max_tokens, temperature, on_reply=None):
            calls.append(len(conversations))
            out = [self.chat(m, max_tokens, temperature) for m in conversations]
            for i, r in enumerate(out):
                on_reply(i, r)
            return out

    # Another question over the same reasoning: a different prompt.
    traces = [trace(), Trace("copy", TRACE["question"].replace("Work out", "Compute"), TRACE["answer"], TRACE["response"])]
    llm = Batched(steps=["steps_good", "steps_gap"], groups=["groups_good"], edits=["edits_none"] * 2,
                  outlines=["outlines_good"])
    result = run_stage1(traces, llm, tmp_path / "run", Stage1Settings(min_diversity=20, max_retries=0), progress=False)
    assert calls == [2, 1, 2, 1]
    assert [r["id"] for r in result.rows] == [TRACE["id"]] and result.rejected[0]["id"] == "copy"


def test_rerunning_with_other_settings_in_the_same_folder_is_refused(tmp_path):
    run(good(), tmp_path)
    with pytest.raises(FileExistsError, match="other \\['settings'\\]"):
        run(ScriptedLLM(), tmp_path, Stage1Settings(min_diversity=30))
    result = run(ScriptedLLM(), tmp_path, Stage1Settings(min_diversity=30), overwrite=True)  # cache still answers
    assert result.report["accepted"] == 1 and result.report["llm_calls"] == 0


def test_the_pipeline_over_a_token_engine(tmp_path):
    """EngineChat: chat template applied, ids generated, reply decoded, batched per step."""
    answers = {"# Step extraction": "steps_good", "# Parallel grouping": "groups_good",
               "# Removing cross-thread references": "edits_none", "# Outlines": "outlines_good"}

    def policy(prompt_text):
        assert prompt_text.startswith("<|im_start|>user\n# ") and prompt_text.endswith("<|im_start|>assistant\n")
        heading = prompt_text[len("<|im_start|>user\n"):].split("\n", 1)[0]
        return reply(answers[heading]) + END

    engine = ScriptEngine(policy)
    result = run(EngineChat(engine, TOK, "script-engine"), tmp_path, tokenizer=TOK)
    assert result.rows[0]["completion"][0]["content"] == problem().plan.parallel_text()
    assert engine.batches == [1, 1, 2, 1]
    assert result.report["token_unit"].startswith("tokens")
    assert result.rows[0]["drift_tokens"] == -1 and result.rows[0]["prompt_tokens"] > len(TRACE["question"])


# ------------------------------------------------------------------------------ pure steps
def test_parse_steps_checks_ranges():
    assert [(s["start"], s["end"]) for s in parse_steps(reply("steps_good"), 16)] == [(1, 5), (6, 9), (10, 14), (15, 16)]
    cases = {"steps_overlap": "steps/overlap: step 2 starts at line 6, inside step 1 (which ends at line 6)",
             "steps_short": "steps/coverage: the steps end at line 14; the reasoning has 16 lines"}
    for name, message in cases.items():
        with pytest.raises(Malformed) as e:
            parse_steps(reply(name), 16)
        assert str(e.value) == message
    with pytest.raises(Malformed, match="steps/out_of_range: step 4 spans lines 15-16; there are lines 1-15"):
        parse_steps(reply("steps_good"), 15)
    with pytest.raises(Malformed, match="steps/gap: lines 1-2 belong to no step \\(before step 1\\)"):
        parse_steps('{"steps": [{"start": 3, "end": 4}]}', 4)


def test_parse_groups_checks_threads():
    assert parse_groups(reply("groups_good"), 4) == [[[1], [2], [3]]]
    assert parse_groups('{"groups": [{"threads": [[3], [4]]}, {"threads": [[1], [2]]}]}', 4) == [[[1], [2]], [[3], [4]]]
    for name, message in {"groups_overlap": "groups/overlap: groups [[1], [2]] and [[2], [3]] share step 2",
                          "groups_not_adjacent": "groups/not_adjacent: group 1's threads [[1], [3]] are not "
                                                 "consecutive steps",
                          "groups_unknown_step": "groups/unknown_step: group 1 names step 5; steps are 1-4"}.items():
        with pytest.raises(Malformed) as e:
            parse_groups(reply(name), 4)
        assert str(e.value) == message
    with pytest.raises(Malformed, match="groups/bad_schema"):
        parse_groups('{"groups": [[[1], [2]]]}', 4)


def test_splice_rules():
    lines = ["a", "bb", "ccc", "dddd", "e"]
    draft, skipped = splice(lines, [[(1, 2), (3, 4)]], min_diversity=3)  # sizes 4 ("a\nbb") and 8
    assert draft == [{"threads": ["a\nbb", "ccc\ndddd"]}, {"lines": ["e"]}] and skipped == []
    assert splice(lines, [[(1, 2), (3, 4)]], min_diversity=5)[1] == [{"block": 0, "reason": "low_diversity",
                                                                      "ranges": [[1, 2], [3, 4]]}]
    assert splice(lines, [[(2, 3), (3, 4)]], 0)[1][0]["reason"] == "overlap"
    assert splice(lines, [[(2, 3)]], 0)[1][0]["reason"] == "too_few_threads"
    # A block overlapping an earlier kept one is skipped; lines a block leaves uncovered are dropped.
    draft, skipped = splice(lines, [[(1, 1), (3, 3)], [(3, 3), (4, 5)]], 0)
    assert draft == [{"threads": ["a", "ccc"]}, {"lines": ["dddd", "e"]}] and skipped[0]["reason"] == "overlap"
    with pytest.raises(ValueError, match="outside lines 1-5"):
        splice(lines, [[(1, 2), (5, 6)]], 0)


def test_edits_and_outlines():
    thread = "d3+e1*f2\n2:3+1=4\n1:4+1=5\nB5"
    assert parse_edits(reply("edits_good"), thread) == (thread.replace("\nB5", "\nso B5"),
                                                        [{"src": "\nB5", "dest": "\nso B5"}])
    with pytest.raises(Malformed, match="edits/shrunk: the thread shrinks from 27 to 2 characters \\(below 50%\\)"):
        parse_edits(reply("edits_shrink"), thread)
    assert parse_edits(reply("edits_shrink"), thread, min_keep=0.0)[0] == "B5"
    with pytest.raises(Malformed, match="outlines/duplicate: outline 2 repeats outline 1"):
        parse_outlines(reply("outlines_duplicate"), 3)
    with pytest.raises(Malformed, match="outlines/bad_schema: outline 1 must be one non-empty line"):
        parse_outlines(reply("outlines_multiline"), 3)


def test_json_answers_tolerate_think_blocks_and_fences_only():
    assert len(json_list(reply("steps_good_wrapped"), "steps", "steps")) == 4
    with pytest.raises(Malformed, match="steps/bad_json"):
        json_list(reply("steps_truncated"), "steps", "steps")
    with pytest.raises(Malformed, match='steps/bad_schema: the answer must be {"steps": \\[...\\]}'):
        json_list('{"step": []}', "steps", "steps")


def test_finish_checks_format_and_answer():
    lines, tail = split_response(TRACE["response"])
    draft, _ = splice(lines, block_ranges(parse_groups(reply("groups_good"), 4), parse_steps(reply("steps_good"), 16)), 0)
    draft[0]["outlines"] = ["A", "B", "C"]
    assert finish(render(draft, tail), "5").answer == "5"
    with pytest.raises(Malformed, match="format/answer_mismatch: boxed '5', gold '6'"):
        finish(render(draft, tail), "6")
    draft[0]["threads"][1] = "   "
    with pytest.raises(Malformed, match="format/invalid: thread 2 is empty"):
        finish(render(draft, tail), "5")


def test_bad_inputs_are_named():
    base = {"question": "q", "answer": "1", "response": "<think>\nx\n</think>\n\n\\boxed{1}"}
    assert as_traces([base])[0].id == "trace-000000"
    assert as_traces([problem()])[0].meta == {"family": "expressions", "shape": "balanced"}
    row = {"id": "r1", "question": "q", "answer": "1", "family": "f",
           "completion": [{"role": "assistant", "content": "<think>\n<Parallel>"}],
           "sequential_completion": [{"role": "assistant", "content": base["response"]}]}
    assert as_traces([row])[0].response == base["response"]  # the sequential column wins
    bad = [({"question": "q", "response": base["response"]}, "input 0 lacks \\['answer'\\]"),
           (base | {"response": problem().plan.parallel_text()}, "already holds <Parallel>"),
           (base | {"response": "x\n</think>\n\\boxed{1}"}, "must start with <think>"),
           (base | {"response": "<think>\nx\n</think>\n\nno answer"}, "missing \\\\boxed"),
           (base | {"id": "a/b"}, "cannot name a folder"),
           (base | {"question": " "}, "empty question")]
    for item, message in bad:
        with pytest.raises(ValueError, match=message):
            as_traces([item])
    with pytest.raises(ValueError, match="repeated: \\['trace-000000'\\]"):
        as_traces([base, Trace("trace-000000", "q", "1", base["response"])])
    with pytest.raises(TypeError, match="input 0 is a str"):
        as_traces(["text"])
    with pytest.raises(ValueError, match="Stage1Settings.min_keep = 2 is out of range"):
        Stage1Settings(min_keep=2)


# ------------------------------------------------------------------------------ clients and cache
def test_prompts_fill_every_placeholder_once():
    text = prompt("stage1_outlines", question="what is {{threads}}?", context="c", threads="T", n_threads=2)
    assert "what is {{threads}}?" in text and "exactly 2 outlines" in text and "{{" not in text.replace("{{threads}}", "")
    with pytest.raises(KeyError, match="prompt stage1_steps needs values for \\['n_lines', 'numbered_lines'\\]"):
        prompt("stage1_steps", question="q")


class Counting:
    model_id = "count"

    def __init__(self):
        self.n = 0

    def chat(self, messages, max_tokens, temperature):
        self.n += 1
        return f"answer {self.n}"


def test_cache_keys_and_counters(tmp_path):
    inner = Counting()
    llm = CachedChat(inner, tmp_path)
    m = [{"role": "user", "content": "hi"}]
    assert [llm.chat(m, 8, 0.0), llm.chat(m, 8, 0.0), llm.chat(m, 9, 0.0), llm.chat(m, 8, 0.5)] == \
        ["answer 1", "answer 1", "answer 2", "answer 3"]
    assert (llm.calls, llm.hits, inner.n) == (3, 1, 3)
    other = CachedChat(Counting(), tmp_path)
    other.model_id = "other"  # another model never reads these answers
    assert other.chat(m, 8, 0.0) == "answer 1" and other.calls == 1
    batch = CachedChat(Counting(), tmp_path / "batch")
    assert batch.chat_batch([m, m, m + m], 8, 0.0) == ["answer 1", "answer 1", "answer 2"]  # a repeat goes out once
    assert (batch.calls, batch.hits) == (2, 1)
    key = cache_key("count", m, 8, 0.0)
    saved = json.loads(llm.path(key).read_text())
    assert saved["response"] == "answer 1" and saved["messages"] == m
    llm.path(key).write_text("{")
    with pytest.warns(CacheWarning, match="LLM cache file .* is unusable"):  # a torn entry is a miss, asked again
        assert llm.chat(m, 8, 0.0) == "answer 4"
    assert (llm.calls, llm.corrupt, inner.n) == (4, 1, 4) and json.loads(llm.path(key).read_text())["response"] == "answer 4"
    with pytest.raises(ValueError, match="message 0 must be a dict"):
        llm.chat([{"role": "user"}], 8, 0.0)


def test_http_chat_retries_and_reads_the_message(stand_in):  # noqa: F811
    ok = (200, {"choices": [{"message": {"role": "assistant", "content": '{"steps": []}'}}]})
    url, script = stand_in([(503, {"error": "busy"}), (429, {"error": "slow down"}), ok])
    llm = HTTPChat(url, "hosted-model", api_key="k", retries=2, backoff_s=0.01, extra_body={"top_p": 0.9})
    assert llm.chat([{"role": "user", "content": "hi"}], 32, 0.6) == '{"steps": []}'
    assert script.bodies[-1] == {"model": "hosted-model", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 32, "temperature": 0.6, "top_p": 0.9}
    assert llm.model_id == 'hosted-model|{"top_p": 0.9}'
    url, script = stand_in([(400, {"error": "context too long"})])
    with pytest.raises(EngineError, match="HTTP 400.*context too long"):
        HTTPChat(url + "/v1", "m", retries=3, backoff_s=0.01).chat([{"role": "user", "content": "hi"}], 8, 0.0)
    assert len(script.bodies) == 1


# ------------------------------------------------------------------------------ a real server
@pytest.mark.engines
def test_stage1_against_vllm_serve(tmp_path):
    """Plumbing with a real ``vllm serve`` of an untrained tiny model: its answers are nonsense, so every
    trace is rejected after its retries, every call is counted, and a rerun asks nothing."""
    pytest.importorskip("vllm")
    from twlib import models
    from twlib.engines.openai import OpenAIEngine
    from twlib.engines.server import VLLMServer

    spec = models.TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                initializer_range=0.2, max_position_embeddings=4096)
    folder = models.save_model(models.build_tiny_model(TOK, spec, seed=0), TOK, tmp_path / "model")
    other = make_problem("expressions", random.Random(6), ExpressionParams(balanced_fraction=1.0, repeats_min=2, repeats_max=3))
    traces = [trace(), Trace("second", other.question, other.answer, other.plan.sequential_text())]
    settings = Stage1Settings(min_diversity=20, max_retries=1, max_tokens=24)
    replies = {}
    with VLLMServer(folder, model_name="tiny", max_model_len=4096) as server:
        clients = {"http": HTTPChat(server.url, "tiny", retries=1, timeout_s=60),
                   "engine": EngineChat(OpenAIEngine(server.url, "tiny", TOK.eos_token_id, timeout_s=60,
                                                     retries=1), TOK, "tiny")}
        for name, llm in clients.items():
            first = run_stage1(traces, llm, tmp_path / name, settings, tokenizer=TOK, progress=False)
            rep = first.report
            # Both traces fail step 1 on each of their 2 tries.
            assert rep["accepted"] == 0 and sum(rep["rejected_by_reason"].values()) == 2
            assert set(rep["rejected_by_reason"]) <= {"steps/bad_json", "steps/bad_schema"}
            assert rep["llm_calls"] == 4 and rep["cache_hits"] == 0 and rep["retries"] == 2
            assert sum(rep["malformed_answers_by_reason"].values()) == 4
            saved = json.loads((tmp_path / name / "traces" / "second" / "1_steps.json").read_text())
            replies[name] = [a["reply"] for a in saved["questions"][0]["attempts"]]
            assert len(replies[name]) == 2 and any(replies[name])
            again = run_stage1(traces, llm, tmp_path / name, settings, tokenizer=TOK, progress=False)
            assert again.report["llm_calls"] == 0 and again.report["cache_hits"] == 4
            assert again.rejected == first.rejected
        clients["http"].close()
        clients["engine"].engine.close()
    # Greedy: the server's chat template and ours give the same prompt, hence the same answers.
    assert replies["http"] == replies["engine"]
