"""Stage-2 self-training: the rollout filter on hand-built trajectories, resumable rollouts, merging, reports."""
import pytest
from scripted_engines import END, EOS, TOK, ReplayEngine, ScriptEngine

from twlib import format as fmt
from twlib import models, self_training, trie
from twlib.engines import Completion, Sampling, finish_reason
from twlib.engines.hf import HFEngine
from twlib.orchestrator import Orchestrator, OrchestratorConfig
from twlib.tokenizer import prompt_ids, segment_ids

PARALLEL = ("<think>\nsplit\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
            "<Thread>\n1: 2+1=3\n</Thread><Thread>\n2: 1+3=4\n</Thread>\n</Parallel>\n3+4=7\n</think>\n\n\\boxed{7}")
SEQUENTIAL = "<think>\n2+1=3\n3+4=7\n</think>\n\n\\boxed{7}"


def _replayed(text, question="q"):
    prompt = prompt_ids(TOK, question)
    engine = ReplayEngine(trie.units(prompt, fmt.parse(text), TOK))
    return Orchestrator(engine, TOK).run([prompt])[0]


def _scripted(policy, config=OrchestratorConfig()):
    return Orchestrator(ScriptEngine(policy), TOK, config).run([prompt_ids(TOK, "q")])[0]


class CharByChar:
    """Writes a fixed text with ``\\boxed{`` spelt as 7 one-character ids instead of its one token."""

    eos_token_id = EOS

    def __init__(self, text):
        boxed = TOK.convert_tokens_to_ids("\\boxed{")
        self.ids = []
        for i in TOK.encode(text, add_special_tokens=False):
            self.ids += [TOK.convert_tokens_to_ids(c) for c in "\\boxed{"] if i == boxed else [i]
        self.ids.append(EOS)

    def generate(self, requests):
        return [Completion(tuple(self.ids), finish_reason(self.ids, r.stop_ids, EOS)) for r in requests]


def test_verdict_keeps_a_correct_parallel_rollout_with_its_exact_ids():
    result = _replayed(PARALLEL)
    reason, text = self_training.verdict(result, "7", TOK)
    assert (reason, text) == ("kept", PARALLEL)
    # What the retrained model is trained on is exactly what it generated.
    assert segment_ids(fmt.parse(text), TOK).ids == result.response_ids


@pytest.mark.parametrize("case, expected", [
    ("wrong_gold", "incorrect"),
    ("budget", "guard"),
    ("unclosed_think", "format"),
    ("char_by_char", "drift"),
])
def test_verdict_names_the_first_failed_check(case, expected):
    if case == "wrong_gold":
        result, gold = _replayed(SEQUENTIAL), "8"
    elif case == "budget":
        result, gold = _scripted(lambda p: SEQUENTIAL + END, OrchestratorConfig(max_new_tokens=8)), "7"
        assert result.flags["budget"] == 1
    elif case == "unclosed_think":
        result, gold = _scripted(lambda p: "<think>\n2+1=3\n\\boxed{7}" + END), "7"
        assert not result.flags
    else:
        result = Orchestrator(CharByChar(SEQUENTIAL), TOK).run([prompt_ids(TOK, "q")])[0]
        gold = "7"
        assert result.text.startswith(SEQUENTIAL) and not result.flags
    assert self_training.verdict(result, gold, TOK) == (expected, None)


def _record(question, reason, text=None, correct=True, blocks=1):
    return {"question": question, "reason": reason, "text": text, "correct": correct, "num_blocks": blocks}


def test_duplicates_yield_and_merge_by_hand():
    records = [_record("q1", "kept", "A"), _record("q1", "kept", "A"), _record("q1", "guard", correct=False),
               _record("q2", "kept", "B", blocks=0), _record("q2", "incorrect", correct=False),
               _record("q3", "format", correct=True)]
    self_training.mark_duplicates(records)
    assert [r["reason"] for r in records] == ["kept", "duplicate", "guard", "kept", "incorrect", "format"]
    report = self_training.yield_report(records)
    assert report["counts"] == {"kept": 2, "guard": 1, "format": 1, "drift": 0, "incorrect": 1, "duplicate": 1}
    assert report["yield"] == 2 / 6
    assert report["format_correct_rate"] == 4 / 6   # kept, duplicate, kept, incorrect
    assert report["accuracy"] == 4 / 6
    assert report["kept_activation"] == 0.5 and report["problems_with_kept"] == 2 and report["problems"] == 3
    kept = self_training.kept_examples(records)
    assert kept == [{"question": "q1", "text": "A"}, {"question": "q2", "text": "B"}]
    stage1 = [{"question": "q1", "text": "A"}, {"question": "q1", "text": "C"}, {"question": "q9", "text": "D"}]
    merged = self_training.merged_examples(kept, stage1, seed=3)
    assert sorted((e["question"], e["text"]) for e in merged) == [("q1", "A"), ("q1", "C"), ("q2", "B"), ("q9", "D")]
    with pytest.raises(ValueError, match="no rollouts"):
        self_training.yield_report([])


class CountingEngine:
    def __init__(self, engine):
        self.engine, self.eos_token_id, self.requests = engine, engine.eos_token_id, 0

    def generate(self, requests):
        self.requests += len(requests)
        return self.engine.generate(requests)


def _problems():
    return [{"id": f"p{i}", "shape": "s", "question": f"{i}+{i}", "answer": str(2 * i)} for i in range(3)]


def test_rollouts_resume_after_an_interruption_with_the_same_samples(tmp_path):
    model = models.build_tiny_model(TOK, models.TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2,
                                                              num_kv_heads=1, intermediate_size=128), seed=1)
    config = OrchestratorConfig(max_new_tokens=12, max_thread_tokens=6, sampling=Sampling(temperature=1.0))
    engine = CountingEngine(HFEngine(model, EOS))
    orchestrator = Orchestrator(engine, TOK, config)
    problems = _problems()
    first = self_training.roll_out(orchestrator, problems, TOK, samples=2, folder=tmp_path / "a", chunk_size=4, seed=5)
    assert [(r["id"], r["sample"]) for r in first] == [(f"p{i}", s) for i in range(3) for s in range(2)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["chunk-00000.jsonl", "chunk-00001.jsonl"]
    # samples of one prompt differ (no per-request seed)
    assert all(first[2 * i]["response"] != first[2 * i + 1]["response"] for i in range(3))
    # An interrupted run lost its last chunk: the rerun decodes only that chunk and gets the same records.
    (tmp_path / "a" / "chunk-00001.jsonl").unlink()
    before = engine.requests
    again = self_training.roll_out(orchestrator, problems, TOK, samples=2, folder=tmp_path / "a", chunk_size=4, seed=5)
    assert again == first
    assert engine.requests - before >= 2 and (tmp_path / "a" / "chunk-00001.jsonl").exists()
    # A complete folder costs no engine call at all.
    before = engine.requests
    assert self_training.roll_out(orchestrator, problems, TOK, 2, tmp_path / "a", 4, 5) == first
    assert engine.requests == before
    # Other parameters against the same folder are refused, not mixed in.
    with pytest.raises(ValueError, match="other rollouts"):
        self_training.roll_out(orchestrator, problems[::-1], TOK, 2, tmp_path / "a", 4, 5)


def test_rollouts_refuse_greedy_or_seeded_sampling(tmp_path):
    for sampling in (Sampling(), Sampling(temperature=1.0, seed=3)):
        orchestrator = Orchestrator(ScriptEngine(lambda p: SEQUENTIAL + END), TOK, OrchestratorConfig(sampling=sampling))
        with pytest.raises(ValueError, match="temperature > 0 and no per-request seed"):
            self_training.roll_out(orchestrator, _problems(), TOK, 2, tmp_path)


def test_before_after_table_by_hand():
    recs = [{"correct": True, "format_correct": True, "total_tokens": 30, "critical_path_tokens": 20},
            {"correct": False, "format_correct": False, "total_tokens": 50, "critical_path_tokens": 50}]
    table = self_training.before_after({"m": recs}, [{"seq_tokens": 40}, {"seq_tokens": 50}])
    row = table.loc["m"]
    assert row["accuracy"] == 0.5 and row["format_correct_rate"] == 0.5
    assert row["critical_path_tokens"] == 35 and row["mean_speedup"] == (2.0 + 1.0) / 2
    no_reference = self_training.before_after({"m": recs}, [{}, {}])
    speedup = no_reference.loc["m", "mean_speedup"]
    assert no_reference.loc["m", "accuracy"] == 0.5 and speedup != speedup  # NaN


def test_stage1_examples_take_synthetic_rows_and_what_the_rewriting_accepted(tmp_path):
    import json
    import types

    from datasets import Dataset

    rows = [{"question": f"q{i}", "completion": [{"role": "assistant", "content": f"T{i}"}]} for i in range(5)]
    run = types.SimpleNamespace(profile_root=tmp_path, stage_path=lambda *parts: tmp_path.joinpath(*parts))
    out = self_training.stage1_examples(run, Dataset.from_list(rows), 3, use_rewritten=True, seed=0)
    assert list(out) == ["synthetic"] and len(out["synthetic"]) == 3  # no complete 01b stage: nothing more
    assert {e["question"] for e in out["synthetic"]} <= {r["question"] for r in rows}
    stage = tmp_path / self_training.REWRITING_STAGE
    stage.mkdir()
    (stage / "metrics.json").write_text(json.dumps({"status": "complete"}))
    (stage / "accepted.jsonl").write_text(json.dumps({"question": "r", "completion": [{"content": "R"}]}) + "\n")
    out = self_training.stage1_examples(run, Dataset.from_list(rows), 0, use_rewritten=True)
    assert out == {"synthetic": [], "rewritten": [{"question": "r", "text": "R"}]}
    assert "rewritten" not in self_training.stage1_examples(run, Dataset.from_list(rows), 0, use_rewritten=False)
