"""Notebook 01b's edges and the configs of the two data stages: model lookup, trace sources, parameter checks."""
import json
import types

import pytest
from scripted_engines import END, TOK, ScriptEngine

from twlib import config
from twlib.rewriter import Stage1Settings
from twlib.rewriter import sources as rewriting


def _run(tmp_path):
    profile_root = tmp_path / "outputs" / "p"
    (profile_root / "02_trie_sft" / "sequential_model").mkdir(parents=True, exist_ok=True)
    (tmp_path / "models" / "mine").mkdir(parents=True, exist_ok=True)
    return types.SimpleNamespace(profile_root=profile_root, project=tmp_path)


def test_models_resolve_to_profile_outputs_then_project_then_hub(tmp_path):
    run = _run(tmp_path)
    assert (rewriting.resolve_model(run, "02_trie_sft/sequential_model")
            == str(run.profile_root / "02_trie_sft" / "sequential_model"))
    assert rewriting.resolve_model(run, "models/mine") == str(tmp_path / "models" / "mine")
    assert rewriting.resolve_model(run, "Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    with pytest.raises(FileNotFoundError, match="run that stage first"):
        rewriting.resolve_model(run, "02_trie_sft/parallel_model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rewriting.resolve_model(run, str(tmp_path / "nowhere"))


def test_generated_traces_keep_correct_answers_only():
    def policy(prompt):
        right = "2+2" in prompt
        # a block opener is plain text here: traces are decoded without the orchestrator
        return ("<think>\n<Parallel>\nx\n</think>\n\n\\boxed{" + ("4" if right else "5") + "}" + END)
    problems = [{"id": "a", "question": "2+2", "answer": "4"}, {"id": "b", "question": "3+3", "answer": "6"}]
    engine = ScriptEngine(policy)
    traces = rewriting.generate_traces(engine, TOK, problems, max_new_tokens=64)
    assert traces == [{"id": "a", "question": "2+2", "answer": "4",
                       "response": "<think>\n<Parallel>\nx\n</think>\n\n\\boxed{4}"}]
    assert engine.batches == [2]  # one plain call each, all in one batch


def test_dataset_traces_need_sequential_cots(tmp_path):
    from datasets import Dataset

    cfg = config.RewritingConfig.from_dict({"profile": "p", "n_traces": 1})
    math_rows = Dataset.from_list([{"id": "m1", "question": "1+1", "answer": "2"}])
    with pytest.raises(ValueError, match="traces_from to 'model'"):
        rewriting.traces(cfg, _run(tmp_path), math_rows)
    rows = Dataset.from_list([{"id": "s1", "question": "1+1", "answer": "2", "sequential_completion":
                               [{"role": "assistant", "content": "<think>\n1+1=2\n</think>\n\n\\boxed{2}"}]}] * 3)
    assert [r["id"] for r in rewriting.traces(cfg, _run(tmp_path), rows)] == ["s1"]


def test_accepted_rows_become_training_examples(tmp_path):
    path = tmp_path / "accepted.jsonl"
    path.write_text(json.dumps({"question": "q", "completion": [{"role": "assistant", "content": "T"}]}) + "\n")
    assert rewriting.accepted_examples(path) == [{"question": "q", "text": "T"}]


@pytest.mark.parametrize("cls, bad, message", [
    (config.RewritingConfig, {"llm_engine": "gpt"}, "'llm_engine'"),
    (config.RewritingConfig, {"llm_engine": "endpoint", "llm_base_url": "127.0.0.1:8000"}, "'llm_base_url'"),
    (config.RewritingConfig, {"traces_from": "model"}, "'trace_model'"),
    (config.RewritingConfig, {"max_retries": -1}, "'max_retries'"),
    (config.SelfTrainingConfig, {"temperature": 0.0}, "'temperature'"),
    (config.SelfTrainingConfig, {"retrain_from": "base"}, "'retrain_from'"),
    (config.SelfTrainingConfig, {"samples_per_prompt": 0}, "'samples_per_prompt'"),
    (config.PGRPOConfig, {"parallel_init": "01_trajectories"}, "'parallel_init'"),
])
def test_data_stage_parameters_are_checked(cls, bad, message):
    with pytest.raises(config.ConfigError, match=message):
        cls.from_dict({"profile": "p", **bad})
    cls.from_dict({"profile": "p"})  # the defaults are valid


def test_endpoint_settings_reach_the_http_client(tmp_path, monkeypatch):
    monkeypatch.setenv("TWLIB_TEST_KEY", "k")
    cfg = config.RewritingConfig.from_dict({"profile": "p", "llm_engine": "endpoint", "llm_model": "big",
                                            "llm_base_url": "http://127.0.0.1:9", "llm_api_key_env": "TWLIB_TEST_KEY"})
    llm = rewriting.make_llm(cfg, _run(tmp_path))
    try:
        assert llm.model_id.startswith("big") and Stage1Settings.for_stage(cfg).min_diversity == 200
    finally:
        llm.close()
