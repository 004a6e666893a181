"""The fork-join orchestrator against engines that replay known trajectories or scripted (malformed) output."""
import pytest
from scripted_engines import END, ReplayEngine, ScriptEngine

from twlib import format as fmt
from twlib import trie
from twlib.orchestrator import Orchestrator, OrchestratorConfig
from twlib.tokenizer import build_char_tokenizer, prompt_ids, segment_ids

TOK = build_char_tokenizer()
EOS = TOK.eos_token_id


TWO_BLOCKS = ("<think>\nfirst\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
              "</Outlines>\n<Thread>\n1: aa\n</Thread><Thread>\n2: bbbb\n</Thread>\n</Parallel>\nmid\n"
              "<Parallel>\n<Outlines>\n<Outline>1: c</Outline>\n<Outline>2: d</Outline>\n<Outline>3: e</Outline>\n"
              "</Outlines>\n<Thread>\n1: c\n</Thread><Thread>\n2: dd\n</Thread><Thread>\n3: eee\n</Thread>\n"
              "</Parallel>\nend\n</think>\n\n\\boxed{7}")
SEQUENTIAL = "<think>\n1+2=3\n</think>\n\n\\boxed{3}"


def _replay(texts):
    units, prompts, expected = [], [], []
    for q, text in texts:
        prompt = prompt_ids(TOK, q)
        traj = fmt.parse(text)
        units += trie.units(prompt, traj, TOK)
        prompts.append(prompt)
        expected.append(segment_ids(traj, TOK).ids)
    return ReplayEngine(units), prompts, expected


def test_join_reproduces_the_ids_trie_sft_trains_on():
    engine, prompts, expected = _replay([("q1", TWO_BLOCKS), ("q2", SEQUENTIAL)])
    results = Orchestrator(engine, TOK).run(prompts)
    for r, ids, text in zip(results, expected, (TWO_BLOCKS, SEQUENTIAL)):
        assert r.response_ids == ids
        assert r.text == text + "<|im_end|>"
        assert not r.flags
        stats = fmt.statistics(fmt.parse_ids(ids, TOK))
        assert r.metrics["total_tokens"] == stats.total_tokens
        assert r.metrics["critical_path_tokens"] == stats.critical_path_tokens
        assert r.metrics["parallel_tokens"] == stats.parallel_tokens
    assert results[0].metrics["threads_per_block"] == [2, 3]
    assert all(0 < r.engine_seconds <= r.wall_seconds for r in results)
    assert [c.kind for c in results[0].calls] == ["sequential", "thread", "thread", "sequential",
                                                 "thread", "thread", "thread", "sequential"]
    # Round 1: both problems' first calls; round 2: problem 1's two threads together; ...
    assert engine.batches == [2, 2, 1, 3, 1]


def test_critical_path_counts_the_longest_thread_by_hand():
    text = ("<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
            "<Thread>\n1: x\n</Thread><Thread>\n2: yyyy\n</Thread>\n</Parallel>\n</think>\n\n\\boxed{1}")
    engine, prompts, _ = _replay([("q", text)])
    m = Orchestrator(engine, TOK).run(prompts)[0].metrics
    # Tags, \\boxed{ and EOS are one token each, other characters one each:
    # head  <think> \n <Parallel> \n <Outlines> \n (<Outline> "1: a" </Outline> \n)x2 </Outlines>  = 6+14+1 = 21
    # thread 1  (\n, the block's) <Thread> "\n1: x\n" </Thread>                              = 1 + 1+6+1
    # thread 2  <Thread> "\n2: yyyy\n" </Thread>                                             = 1+9+1   = 11
    # tail  \n </Parallel> \n </think> \n \n \\boxed{ 1 } EOS                                  = 10
    assert m["total_tokens"] == 21 + 9 + 11 + 10
    assert m["critical_path_tokens"] == 21 + 1 + 11 + 10
    assert m["parallel_tokens"] == 4 + 14 + 1 + 9 + 11 + 1 + 1  # <Parallel> \n <Outlines> \n .. </Parallel>


def _policy(head, threads, tail=f"</Parallel>\n</think>\n\n\\boxed{{3}}{END}"):
    """Sequential: write ``head`` first, ``tail`` after a block; thread N writes ``threads(N)``."""
    def policy(prompt: str) -> str:
        if prompt.endswith(":") and prompt.rstrip("0123456789:").endswith("<Thread>\n"):
            number = int(prompt[prompt.rindex("\n") + 1:-1])
            return threads(number)
        return tail if "</Thread>" in prompt else head
    return policy


OUTLINES = "<think>\n<Parallel>\n<Outlines>\n{}</Outlines>\n"


def _outlines(numbers):
    return OUTLINES.format("".join(f"<Outline>{n}: t</Outline>\n" for n in numbers))


def _run(policy, **config):
    engine = ScriptEngine(policy)
    result = Orchestrator(engine, TOK, OrchestratorConfig(**config)).run([prompt_ids(TOK, "q")])[0]
    return result, engine


def test_well_formed_block_runs_clean():
    r, engine = _run(_policy(_outlines([1, 2]), lambda n: f" t{n}\n</Thread>"))
    assert not r.flags and r.metrics["threads_per_block"] == [2]
    assert r.trajectory is not None and r.trajectory.issues == ()
    assert fmt.extract_boxed(r.text) == "3" and engine.batches == [1, 2, 1]


def test_zero_outlines_keeps_decoding_sequentially():
    r, _ = _run(_policy(OUTLINES.format(""), lambda n: "never"), max_new_tokens=200)
    assert r.flags["no_outlines"] >= 1 and r.metrics["num_blocks"] == 0
    assert all(c.kind == "sequential" for c in r.calls)


def test_hundred_outlines_are_capped_at_max_threads():
    r, engine = _run(_policy(_outlines(range(1, 101)), lambda n: "x\n</Thread>"), max_threads=8)
    assert r.flags["threads_dropped"] == 92
    assert r.metrics["threads_per_block"] == [8] and 8 in engine.batches


def test_repeated_or_skipped_outline_numbers_are_renumbered():
    r, _ = _run(_policy(_outlines([1, 1, 3]), lambda n: f" {n}\n</Thread>"))
    assert r.flags["outline_numbering"] == 1
    assert "<Thread>\n1: 1\n</Thread><Thread>\n2: 2\n</Thread><Thread>\n3: 3\n</Thread>" in r.text


def test_thread_that_never_closes_is_closed_at_its_budget():
    r, _ = _run(_policy(_outlines([1, 2]), lambda n: "x" * 500 if n == 2 else " ok\n</Thread>"),
                max_thread_tokens=40)
    assert r.flags["thread_unclosed"] == 1
    assert "<Thread>\n2:" + "x" * 40 + "</Thread>\n</Parallel>" in r.text
    assert max(c.generated_tokens for c in r.calls if c.kind == "thread") == 40


def test_eos_in_a_thread_ends_the_trajectory_after_the_join():
    r, engine = _run(_policy(_outlines([1, 2]), lambda n: f" done{END}" if n == 1 else " ok\n</Thread>"))
    assert r.flags["eos_in_thread"] == 1
    assert r.text.endswith("<Thread>\n1: done</Thread><Thread>\n2: ok\n</Thread>\n")
    assert engine.batches == [1, 2]  # no sequential call after the join


def test_nested_tags_in_a_thread_stay_text():
    r, _ = _run(_policy(_outlines([1, 2]), lambda n: "<Parallel>\n<Outlines>\n</Thread>"))
    assert r.flags["nested_tags"] == 2 and r.metrics["num_blocks"] == 1


def test_endless_sequential_output_stops_at_the_budget():
    r, _ = _run(lambda prompt: "y" * 1000, max_new_tokens=64)
    assert r.flags["budget"] == 1 and r.metrics["total_tokens"] == 64


def test_context_limit_is_a_guard_too():
    prompt_len = len(prompt_ids(TOK, "q"))
    r, _ = _run(lambda prompt: "y" * 1000, max_context=prompt_len + 30)
    assert r.flags["context"] == 1 and r.metrics["total_tokens"] == 30


def test_blocks_past_max_blocks_are_not_forked():
    block = _outlines([1, 2])[len("<think>\n"):]
    policy = _policy("<think>\n" + block, lambda n: " x\n</Thread>",
                     tail=f"</Parallel>\n{block}")  # every continuation opens another block
    r, _ = _run(policy, max_blocks=2, max_new_tokens=400)
    assert r.metrics["num_blocks"] == 2 and r.flags["max_blocks"] >= 1


def test_budget_too_small_for_a_block_ends_at_the_outlines():
    head = _outlines([1, 2, 3])
    r, _ = _run(_policy(head, lambda n: "z" * 100), max_new_tokens=len(TOK.encode(head)) + 5)
    assert r.flags["budget"] == 1 and r.metrics["num_blocks"] == 0
    assert r.text == head.rstrip("\n") and r.metrics["total_tokens"] <= len(TOK.encode(head)) + 5


@pytest.mark.parametrize("budget", [60, 90, 150])
def test_long_threads_never_overrun_the_total_budget(budget):
    r, _ = _run(_policy(_outlines([1, 2, 3]), lambda n: "z" * 500), max_new_tokens=budget, max_thread_tokens=400)
    assert r.metrics["total_tokens"] <= budget and r.metrics["num_blocks"] == 1
    assert r.flags["thread_unclosed"] == 3 and r.flags["budget"] >= 1


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"max_threads": 0}, {"max_blocks": -1}])
def test_config_names_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        OrchestratorConfig(**bad)
