"""twlib.models: tiny Qwen3 models, save/load, tags on a pretrained vocabulary, and (engines tier)
greedy equality between vLLM and HF generate on a saved tiny model."""
from __future__ import annotations

import copy
import importlib.util
import json
import textwrap

import pytest
import torch
from vllm_script import run_vllm_script

from twlib import format as fmt
from twlib.models import (
    TinyModelSpec,
    add_tags_to_model,
    build_tiny_model,
    count_parameters,
    load_model,
    qwen3_config,
    save_model,
    spec_dict,
)
from twlib.tokenizer import build_char_tokenizer, load_tokenizer, prompt_ids, qwen_tokenizer

SMALL = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_build_is_deterministic_in_seed(char_tok):
    ids = prompt_ids(char_tok, "12*34")
    a = logits(build_tiny_model(char_tok, SMALL, seed=0), ids)
    b = logits(build_tiny_model(char_tok, SMALL, seed=0), ids)
    c = logits(build_tiny_model(char_tok, SMALL, seed=1), ids)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (1, len(ids), 112)


def test_config_from_spec(char_tok):
    m = build_tiny_model(char_tok, SMALL)
    cfg = m.config
    assert cfg.vocab_size == 112 >= len(char_tok) == 111
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.head_dim) == (32, 2, 1, 1, 64, 32)
    assert cfg.eos_token_id == char_tok.eos_token_id and cfg.pad_token_id == char_tok.pad_token_id
    assert m.generation_config.eos_token_id == char_tok.eos_token_id
    assert m.get_input_embeddings().weight.shape == (112, 32)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight  # tied by default
    untied = build_tiny_model(char_tok, TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                                                      intermediate_size=64, tie_word_embeddings=False))
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    assert spec_dict(SMALL)["hidden_size"] == 32 and spec_dict(SMALL)["initializer_range"] == 0.02


@pytest.mark.parametrize("extra,vocab", [(0, 112), (1, 112), (2, 128), (17, 128), (18, 144)])
def test_vocab_rounded_up_to_16(extra, vocab):
    tok = build_char_tokenizer()
    tok.add_tokens([f"@{i}@" for i in range(extra)])
    assert len(tok) == 111 + extra
    cfg = qwen3_config(tok, SMALL)
    assert cfg.vocab_size == vocab and cfg.vocab_size % 16 == 0 and cfg.vocab_size >= len(tok)


def test_initializer_range_is_used(char_tok):
    small = build_tiny_model(char_tok, SMALL)
    big = build_tiny_model(char_tok, TinyModelSpec(hidden_size=32, num_layers=2, num_heads=1, num_kv_heads=1,
                                                   intermediate_size=64, initializer_range=0.2))
    w_small = small.model.layers[0].mlp.up_proj.weight.std().item()
    w_big = big.model.layers[0].mlp.up_proj.weight.std().item()
    assert w_small == pytest.approx(0.02, rel=0.15) and w_big == pytest.approx(0.2, rel=0.15)


def test_count_parameters_by_hand(char_tok):
    V, H, L, nh, nkv, I = 112, 32, 2, 1, 1, 64
    hd = H // nh
    per_layer = (H * nh * hd + 2 * H * nkv * hd + nh * hd * H   # q, k, v, o projections (no bias)
                 + 2 * hd                                       # q_norm, k_norm
                 + 3 * H * I                                    # gate, up, down
                 + 2 * H)                                       # the two RMSNorms
    tied = V * H + L * per_layer + H                            # embeddings (tied head) + layers + final norm
    m = build_tiny_model(char_tok, SMALL)
    assert count_parameters(m) == tied == sum(p.numel() for p in m.parameters())
    untied = build_tiny_model(char_tok, TinyModelSpec(hidden_size=32, num_layers=2, num_heads=1, num_kv_heads=1,
                                                      intermediate_size=64, tie_word_embeddings=False))
    assert count_parameters(untied) == tied + V * H
    # the default spec is "~1.1M parameters with the character vocabulary"
    assert 0.9e6 < count_parameters(build_tiny_model(char_tok)) < 1.3e6


def test_save_load_identical_logits(char_tok, tmp_path):
    m = build_tiny_model(char_tok, SMALL, seed=3)
    folder = save_model(m, char_tok, tmp_path / "model")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    loaded = load_model(folder)
    assert loaded.dtype == torch.float32
    ids = char_tok.encode(fmt.THINK_OPEN + "\n12*34=", add_special_tokens=False)
    assert torch.equal(logits(m, ids), logits(loaded, ids))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vocab_size"] == 112 and cfg["eos_token_id"] == char_tok.eos_token_id
    tok2 = load_tokenizer(folder)
    assert tok2.encode("<Thread>\n1: x", add_special_tokens=False) == \
        char_tok.encode("<Thread>\n1: x", add_special_tokens=False)


def test_spec_validation():
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_heads 4"):
        TinyModelSpec(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_heads 4 is not divisible by num_kv_heads 3"):
        TinyModelSpec(hidden_size=32, num_heads=4, num_kv_heads=3)
    TinyModelSpec(hidden_size=128, num_heads=4, num_kv_heads=4)  # fine
    with pytest.raises(ValueError, match="head size .* = 8 cannot run on vLLM for CPU"):
        TinyModelSpec(hidden_size=32, num_heads=4, num_kv_heads=4)
    with pytest.raises(ValueError, match="qk_norm_init must be > 0"):
        TinyModelSpec(qk_norm_init=0.0)


def test_qk_norm_init_and_rope_theta_reach_the_model(char_tok, tmp_path):
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                         qk_norm_init=1.5, rope_theta=1e6)
    model = build_tiny_model(char_tok, spec)
    for layer in model.model.layers:
        assert torch.all(layer.self_attn.q_norm.weight == 1.5) and torch.all(layer.self_attn.k_norm.weight == 1.5)
    save_model(model, char_tok, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert torch.all(again.model.layers[1].self_attn.k_norm.weight == 1.5)
    assert again.config.rope_parameters["rope_theta"] == 1e6


# -------------------------------------------------------------------------- tags on the Qwen vocab
@pytest.fixture(scope="module")
def qwen_tok():
    return qwen_tokenizer()


def test_add_tags_to_model_qwen(qwen_tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = copy.deepcopy(qwen_tok)
    n_old = len(tok)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=n_old, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=8, tie_word_embeddings=False))
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()

    added = add_tags_to_model(model, tok)

    assert added == list(fmt.TAGS) and len(added) == 10
    assert len(tok) == n_old + 10
    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    rows = ((len(tok) + 15) // 16) * 16  # grown to the tokenizer, padded to a multiple of 16
    assert emb.shape == head.shape == (rows, 16)
    assert model.config.vocab_size == rows
    assert torch.equal(emb[:n_old], old_emb) and torch.equal(head[:n_old], old_head)
    for tag in fmt.TAGS:
        tag_id = tok.convert_tokens_to_ids(tag)
        assert tag_id >= n_old and tok.encode(tag, add_special_tokens=False) == [tag_id]
        name_ids = tok.encode(tag.strip("<>"), add_special_tokens=False)
        assert name_ids and max(name_ids) < n_old
        assert torch.allclose(emb[tag_id], old_emb[name_ids].mean(0), atol=1e-7), tag
        assert torch.allclose(head[tag_id], old_head[name_ids].mean(0), atol=1e-7), tag
    # different tags get different rows ("Parallel" vs "/Parallel")
    p, q = tok.convert_tokens_to_ids(["<Parallel>", "</Parallel>"])
    assert not torch.allclose(emb[p], emb[q])
    # the model runs on tagged ids
    ids = tok.encode("<think>\n<Parallel>\n</Parallel>", add_special_tokens=False)
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits
    assert out.shape == (1, len(ids), rows) and torch.isfinite(out).all()


def test_add_tags_to_model_tied_and_already_present(char_tok):
    """Tags already atomic are not added again; a tied head stays tied."""
    m = build_tiny_model(char_tok, SMALL)
    before = m.get_input_embeddings().weight.detach().clone()
    assert add_tags_to_model(m, char_tok) == []
    # existing rows unchanged
    assert torch.equal(m.get_input_embeddings().weight.detach()[:len(char_tok)], before[:len(char_tok)])
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


# ----------------------------------------------------------------------- engines: vLLM == HF greedy
VLLM_SCRIPT = textwrap.dedent('''
    import json
    import sys

    if __name__ == "__main__":
        from vllm import SamplingParams

        from twlib.engines.vllm import VLLMEngine

        folder, prompts = sys.argv[1], json.loads(sys.argv[2])
        # the settings every stage loads a model with (fp32, eager, prefix caching; on CPU the in-process core)
        llm = VLLMEngine.from_pretrained(folder, eos_token_id=None, max_model_len=512).llm
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, skip_special_tokens=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
''')


@pytest.mark.engines
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_greedy_equals_hf(char_tok, tmp_path):
    # vLLM's CPU attention supports head sizes 32, 64, 80, ... only (16 crashes at the first forward)
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                         initializer_range=0.2)
    folder = save_model(build_tiny_model(char_tok, spec, seed=0), char_tok, tmp_path / "model")
    prompts = [prompt_ids(char_tok, "12*34=?"), prompt_ids(char_tok, "7+8*(2+3)")]

    hf = load_model(folder)
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=16, min_new_tokens=16)
        expected.append(out[0, len(p):].tolist())
    assert all(len(e) == 16 for e in expected)
    assert all(len(set(e)) > 1 for e in expected)  # not one token repeated: a meaningful comparison

    assert run_vllm_script(tmp_path, VLLM_SCRIPT, str(folder), json.dumps(prompts)) == expected


def test_add_tags_never_shrinks_a_padded_vocabulary(qwen_tok):
    """Qwen3 checkpoints carry spare rows past the tokenizer: adding tags must keep them."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = copy.deepcopy(qwen_tok)
    spare = len(tok) + 100
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=spare, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=8, tie_word_embeddings=True))
    added = add_tags_to_model(model, tok)
    emb = model.get_input_embeddings().weight.detach()
    assert len(added) == 10 and emb.shape[0] == spare
    tag_id = tok.convert_tokens_to_ids("<Thread>")
    assert torch.allclose(emb[tag_id], emb[tok.encode("Thread", add_special_tokens=False)].mean(0))
