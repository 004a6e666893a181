"""Cross-engine greedy equality: the orchestrator over vLLM (CPU) and over HF writes the same ids."""
import importlib.util
import json
import random
import textwrap
import time

import pytest
from vllm_script import run_vllm_script

from twlib import format as fmt
from twlib import models, sft
from twlib.engines import EngineError, Request
from twlib.engines.hf import HFEngine
from twlib.engines.openai import OpenAIEngine
from twlib.engines.server import VLLMServer, free_port
from twlib.orchestrator import Orchestrator, OrchestratorConfig
from twlib.tasks import ExpressionParams, make_problem
from twlib.tokenizer import build_char_tokenizer, prompt_ids, segment_ids

TOK = build_char_tokenizer()

SCRIPT = textwrap.dedent('''
    import json
    import sys

    if __name__ == "__main__":
        from twlib.engines.vllm import VLLMEngine
        from twlib.orchestrator import Orchestrator, OrchestratorConfig
        from twlib.tokenizer import load_tokenizer

        folder, prompts = sys.argv[1], json.loads(sys.argv[2])
        tok = load_tokenizer(folder)
        engine = VLLMEngine.from_pretrained(folder, tok.eos_token_id, max_model_len=1024)
        results = Orchestrator(engine, tok).run(prompts)
        print("RESULT " + json.dumps([{"ids": r.response_ids, "calls": len(r.calls), "flags": dict(r.flags)}
                                      for r in results]), flush=True)
''')


NEEDS_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny model that has memorised two parallel trajectories, saved; its prompts and reference ids."""
    tmp = tmp_path_factory.mktemp("memorised")
    rng = random.Random(3)
    params = ExpressionParams(groups_min=2, groups_max=3, repeats_min=2, repeats_max=3, balanced_fraction=1.0)
    problems = [make_problem("expressions", rng, params) for _ in range(2)]
    examples = [{"question": p.question, "text": p.plan.parallel_text()} for p in problems]
    spec = models.TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                initializer_range=0.2)
    model = models.build_tiny_model(TOK, spec, seed=0)
    settings = sft.TrainSettings(max_steps=150, learning_rate=1e-2, warmup_steps=0, save_steps=1000,
                                 lr_scheduler_type="constant", logging_steps=50)
    rows = sft.rows_dataset(sft.trajectory_tries(examples, TOK), max_tokens=4096)
    sft.train(sft.make_trainer(model, TOK, rows, tmp / "run", settings))
    folder = models.save_model(model, TOK, tmp / "model")
    prompts = [prompt_ids(TOK, ex["question"]) for ex in examples]
    reference = [segment_ids(fmt.parse(ex["text"]), TOK).ids for ex in examples]
    hf = Orchestrator(HFEngine(model, TOK.eos_token_id), TOK).run(prompts)
    assert [r.response_ids for r in hf] == reference
    return folder, prompts, reference, [len(r.calls) for r in hf]


@pytest.mark.engines
@NEEDS_VLLM
def test_orchestrator_on_offline_vllm_equals_hf_and_the_reference(memorised, tmp_path):
    folder, prompts, reference, hf_calls = memorised
    got = run_vllm_script(tmp_path, SCRIPT, str(folder), json.dumps(prompts))
    assert [g["ids"] for g in got] == reference
    assert [g["calls"] for g in got] == hf_calls
    assert all(g["flags"] == {} for g in got)


@pytest.mark.engines
@NEEDS_VLLM
def test_orchestrator_on_vllm_serve_then_the_server_dies(memorised):
    folder, prompts, reference, hf_calls = memorised
    with VLLMServer(folder, model_name="tiny", max_model_len=1024) as server:
        engine = OpenAIEngine(server.url, "tiny", TOK.eos_token_id, concurrency=4, timeout_s=60, retries=2,
                              backoff_s=0.2)
        orchestrator = Orchestrator(engine, TOK, OrchestratorConfig(max_context=1024))  # the server's length
        results = orchestrator.run(prompts)
        assert [r.response_ids for r in results] == reference
        assert [len(r.calls) for r in results] == hf_calls
        # The server dies between two calls of a run: the next call is an error within seconds, not a hang.
        server.kill()
        start = time.monotonic()
        with pytest.raises(EngineError, match="no completion after 3 tries; last cause: cannot reach"):
            orchestrator.run(prompts)
        assert time.monotonic() - start < 30
        engine.close()


def test_openai_engine_on_a_closed_port_fails_fast():
    engine = OpenAIEngine(f"http://127.0.0.1:{free_port()}", "tiny", TOK.eos_token_id, retries=1, backoff_s=0.1)
    start = time.monotonic()
    with pytest.raises(EngineError, match="cannot reach the server"):
        engine.generate([Request((1, 2, 3), 4)])
    assert time.monotonic() - start < 10


def test_cpu_kv_cache_holds_what_the_model_needs_and_no_more(tmp_path):
    from transformers import Qwen3Config

    from twlib.engines.vllm import cpu_kv_cache_bytes

    Qwen3Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=128,
                max_position_embeddings=2048).save_pretrained(tmp_path)
    per_token = 2 * 2 * 2 * 64 * 4  # K and V, layers, KV heads, head dim, float32 bytes
    assert cpu_kv_cache_bytes(tmp_path) == per_token * 131_072
    assert cpu_kv_cache_bytes(tmp_path, "bfloat16") == per_token // 2 * 131_072
    assert cpu_kv_cache_bytes(tmp_path, max_model_len=65_536) == per_token * 4 * 65_536
    assert cpu_kv_cache_bytes(tmp_path, host_bytes=10 * 2**20) == 3 * 2**20  # capped at 30% of the host
