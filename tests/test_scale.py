"""The GPU scale path, as far as a CPU checks it: flex BlockMask = dense mask, gradient checkpointing
changes no gradient, pretrained checkpoints with the tags, accelerate/DeepSpeed configs, the
multi-process entry point, the GPU bench. ``gpu`` tests (skipped without CUDA) run the same paths on
a GPU with a tiny locally built model: no hub access anywhere."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from test_sft import SPEC, TOK, _examples, _reference_loss
from vllm_script import run_vllm_script

from twlib import config, dataset, launch, masks, models, pgrpo, sft, tasks, trie
from twlib import format as fmt
from twlib import tokenizer as tokenizers

ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
NEEDS_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def _rows(n: int = 6, max_tokens: int = 1024, seed: int = 0):
    return sft.rows_dataset(sft.trajectory_tries(_examples(n, seed=seed), TOK), max_tokens=max_tokens)


# ------------------------------------------------------------------------------- masks and SFT
def test_block_mask_from_exit_times_is_the_dense_ancestor_mask():
    from torch.nn.attention.flex_attention import create_mask

    rows = trie.pack_rows(sft.trajectory_tries(_examples(8), TOK), 700)
    assert len(rows) >= 2 and max(r.sequence[-1] for r in rows) >= 1  # several rows, several tries per row
    batch = sft.row_tensors(rows, TOK.pad_token_id)
    B, L = batch["tree_exit"].shape
    assert L > 3 * sft.FLEX_BLOCK and (batch["tree_exit"] == -1).any()  # several tiles, some padding
    bm = sft.ancestor_block_mask(batch["tree_exit"])
    allowed = create_mask(bm.mask_mod, B, 1, L, L, device="cpu")
    assert torch.equal(allowed, masks.dense_mask(rows) == 0)
    # the older builder from PackedTrie rows agrees too
    assert torch.equal(create_mask(masks.block_mask(rows).mask_mod, B, 1, L, L, device="cpu"), allowed)
    # tiles wholly outside every query's ancestors (above the diagonal, across trajectories) are skipped
    tiles = -(-L // sft.FLEX_BLOCK)
    assert int(bm.kv_num_blocks.sum()) < B * tiles * (tiles + 1) // 2


def test_flex_collator_sends_exit_times_not_a_mask():
    rows = _rows()
    records = [rows[i] for i in range(len(rows))]
    dense = sft.TrieCollator(TOK.pad_token_id)(records)
    flex = sft.TrieCollator(TOK.pad_token_id, pad_to_multiple_of=sft.FLEX_BLOCK, attention="flex")(records)
    assert "attention_mask" not in flex and flex["tree_exit"].dim() == 2
    L = flex["input_ids"].shape[1]
    assert L % sft.FLEX_BLOCK == 0 and dense["attention_mask"].shape[-1] == dense["input_ids"].shape[1]
    for b, r in enumerate(records):
        n = len(r["input_ids"])
        assert flex["tree_exit"][b, :n].tolist() == r["exit"] and (flex["tree_exit"][b, n:] == -1).all()
        assert torch.equal(flex["labels"][b, :n], dense["labels"][b, :n])
    assert max(v.numel() for v in flex.values()) == flex["input_ids"].numel()  # nothing L×L
    with pytest.raises(ValueError, match="attention must be one of"):
        sft.TrieCollator(TOK.pad_token_id, attention="sparse")(records)


def test_train_settings_reject_bad_switches():
    with pytest.raises(ValueError, match="attention must be one of"):
        sft.TrainSettings(attention="sparse")
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1"):
        sft.TrainSettings(gradient_accumulation_steps=0)


def _captured_model_inputs(model):
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    return seen


def test_flex_trainer_loss_equals_dense_loss_and_unit_reference_on_cpu(tmp_path):
    """flex attention runs forward on CPU (no backward there): the loss through the trainer with a
    BlockMask equals the dense-mask loss and the unit-by-unit causal reference."""
    from torch.nn.attention.flex_attention import BlockMask

    examples = _examples(6)
    rows = sft.rows_dataset(sft.trajectory_tries(examples, TOK), max_tokens=1024)
    losses, masks = {}, {}
    for attention in sft.ATTENTION_KINDS:
        model = models.build_tiny_model(TOK, SPEC, seed=1)
        settings = sft.TrainSettings(max_steps=1, attention=attention)
        trainer = sft.make_trainer(model, TOK, rows, tmp_path / attention, settings)
        seen = _captured_model_inputs(model)
        batch = trainer.data_collator([rows[i] for i in range(len(rows))])
        model.eval()
        with torch.no_grad():
            losses[attention] = trainer.compute_loss(model, dict(batch)).item()
        masks[attention] = seen[-1]
        if attention == "flex":
            assert model.config._attn_implementation == "flex_attention"
            with torch.no_grad():
                reference = _reference_loss(model, examples).item()
    assert isinstance(masks["flex"], BlockMask) and masks["dense"].dim() == 4
    assert abs(losses["flex"] - losses["dense"]) < 1e-5
    assert abs(losses["flex"] - reference) < 1e-4


def _first_step_gradients(tmp_path, settings: sft.TrainSettings, rows, seed: int = 3):
    """Gradients the trainer hands to the optimizer at step 1, and how often layer 0 ran."""
    from transformers import TrainerCallback

    model = models.build_tiny_model(TOK, SPEC, seed=seed)
    calls = []
    # a pre-hook: the recomputation stops early, once it has what the backward needs, so a hook at
    # the end of the layer's forward would not see it
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    grads = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer = sft.make_trainer(model, TOK, rows, tmp_path, settings)
    trainer.add_callback(Grab())
    trainer.train()
    return grads, len(calls), model, trainer


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    rows = _rows(4)
    base = sft.TrainSettings(max_steps=1, per_device_train_batch_size=len(rows), logging_steps=1, save_steps=100)
    plain, plain_calls, _, _ = _first_step_gradients(tmp_path / "plain", base, rows)
    ckpt, ckpt_calls, model, trainer = _first_step_gradients(
        tmp_path / "ckpt", dataclasses.replace(base, gradient_checkpointing=True), rows)
    assert model.is_gradient_checkpointing
    assert (plain_calls, ckpt_calls) == (1, 2)  # the checkpointed layer ran again in the backward pass
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name
    assert any(g.abs().max() > 0 for g in plain.values())
    # TRL's token count is a count, not the sum of an additive mask's −3.4e38 entries
    tokens = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    assert tokens and all(math.isfinite(t) and t > 0 for t in tokens)
    # the multi-process way of saving (the trainer gathers, the main process writes) gives the same model
    folder = sft.save_trained(trainer, TOK, tmp_path / "saved", distributed=True)
    again = models.load_model(folder).eval()
    ids = torch.tensor([tokenizers.prompt_ids(TOK, "1+2")])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, again(ids).logits)
    assert tokenizers.load_tokenizer(folder).encode("<Thread>") == TOK.encode("<Thread>")
    assert not any(p.name.startswith(".saved") for p in tmp_path.iterdir())  # no temporary left behind


# ------------------------------------------------------------------------- pretrained checkpoints
# Qwen3's added tokens after <|im_end|> (151645), so <think> lands on its real id 151667.
QWEN3_ADDED = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
               "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
               "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
               "<think>", "</think>")


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A folder laid out like a hub Qwen3 base checkpoint (real Qwen vocabulary, EOS <|endoftext|>,
    151,936 embedding rows, untied head), with a tiny random model: the stand-in for a download."""
    from tokenizers import AddedToken
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tokenizers.qwen_tokenizer()
    tok.add_tokens([AddedToken(t, special=not t.endswith("think>") and "tool" not in t, normalized=False)
                    for t in QWEN3_ADDED])
    tok.eos_token = tokenizers.END_OF_TEXT
    tok.chat_template = None
    assert tok.convert_tokens_to_ids("<think>") == 151667
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=models.QWEN3_VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=32, tie_word_embeddings=False, max_position_embeddings=4096,
                                         initializer_range=0.2, eos_token_id=151643))
    folder = tmp_path_factory.mktemp("hub") / "Qwen3-tiny-Base"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_load_pretrained_adds_atomic_tags_with_mean_of_name_rows(hub_folder):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(hub_folder)
    emb0 = original.get_input_embeddings().weight.detach()
    head0 = original.get_output_embeddings().weight.detach()
    model, tok = models.load_pretrained(hub_folder, max_position_embeddings=32768)

    ids = tokenizers.check_tags_atomic(tok)  # every tag one non-special id
    assert ids["<think>"] == 151667 and ids["</think>"] == 151668  # kept, not added again
    new = sorted(ids[t] for t in fmt.STRUCTURE_TAGS)
    assert new == list(range(151669, 151669 + len(fmt.STRUCTURE_TAGS)))
    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert emb.shape[0] == models.QWEN3_VOCAB  # the spare rows hold the new tags: no resize
    for tag in fmt.STRUCTURE_TAGS:
        name_ids = tok.encode(tag.strip("<>"), add_special_tokens=False)
        assert name_ids and max(name_ids) < 151643
        assert torch.allclose(emb[ids[tag]], emb0[name_ids].mean(0), atol=1e-7), tag
        assert torch.allclose(head[ids[tag]], head0[name_ids].mean(0), atol=1e-7), tag
    untouched = [i for i in range(emb.shape[0]) if i not in new]
    assert torch.equal(emb[untouched], emb0[untouched]) and torch.equal(head[untouched], head0[untouched])
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 151645
    assert model.config.max_position_embeddings == 32768
    # the tags survive decoding with skip_special_tokens (vLLM's default), EOS does not
    text = "<think>\n<Parallel>\n<Outlines>\n</Outlines>\n</Parallel>\n</think>"
    assert tok.decode(tok.encode(text, add_special_tokens=False) + [151645], skip_special_tokens=True) == text


def test_qwen3_chat_template_prompts_and_think_turns(hub_folder):
    _, tok = models.load_pretrained(hub_folder)
    q = "What is 12*34?"
    expected = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tokenizers.prompt_ids(tok, q)) == expected
    assert tokenizers.prompt_ids(tok, q) == tok.encode(expected, add_special_tokens=False)
    # the char tokenizer's template writes the same prompt: one format across scales
    char = tokenizers.build_char_tokenizer()
    assert char.decode(tokenizers.prompt_ids(char, q)) == expected
    turn = [{"role": "user", "content": q},
            {"role": "assistant", "reasoning_content": "12*34 = 408.", "content": "\\boxed{408}"}]
    assert tok.apply_chat_template(turn, tokenize=False) == (
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>\n12*34 = 408.\n</think>\n\n"
        "\\boxed{408}<|im_end|>\n")
    no_think = tok.apply_chat_template(turn[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think == expected + "<think>\n\n</think>\n\n"


def test_saved_pretrained_folder_reloads_with_identical_logits(hub_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = models.load_pretrained(hub_folder)
    folder = models.save_model(model, tok, tmp_path / "tagged")
    again = AutoModelForCausalLM.from_pretrained(folder)
    tok2 = AutoTokenizer.from_pretrained(folder)
    ids = tokenizers.prompt_ids(tok, "1+1") + tok.encode("<think>\n<Parallel>\n<Outlines>\n", add_special_tokens=False)
    assert tokenizers.prompt_ids(tok2, "1+1") == tokenizers.prompt_ids(tok, "1+1")
    assert tokenizers.check_tags_atomic(tok2) == tokenizers.check_tags_atomic(tok)
    assert tok2.eos_token_id == 151645 and again.generation_config.eos_token_id == 151645
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, again(torch.tensor([ids])).logits)
    # notebook 01's tokenizer-only load gives the same tokenizer
    alone = models.pretrained_tokenizer(hub_folder)
    assert alone.get_vocab() == tok.get_vocab() and alone.chat_template == tok.chat_template
    assert (alone.eos_token_id, alone.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    # a run's tokenizer from another checkpoint is refused, naming the difference
    with pytest.raises(ValueError, match="tokens with the tags"):
        models.pretrained_for(tokenizers.build_char_tokenizer(), hub_folder)


def test_train_model_from_a_pretrained_checkpoint(hub_folder, tmp_path):
    """Notebook 02's training on a pretrained base: the run's tokenizer (saved by notebook 01 from the
    same checkpoint) is checked against it, the loss drops, the saved model reloads."""
    from transformers import AutoModelForCausalLM

    from twlib.runs import RunFolder

    _, tok = models.load_pretrained(hub_folder)
    # Short trajectories, few steps: a 151,936-token LM head costs seconds per step on a CPU.
    cfg = config.TrieSFTConfig(profile="scale", output_root=str(tmp_path), max_steps=3, batch_rows=1, row_tokens=2048,
                               learning_rate=5e-3, warmup_steps=0, logging_steps=1, save_steps=100)
    mix = config.TrajectoriesConfig(profile="scale", families=["products"], family_weights=[1.0], prod_factors_min=2,
                                    prod_factors_max=2, prod_factor_max=9)
    mix = tasks.task_mix(mix)
    problems = tasks.generate_splits(mix, {"train": 2, "validation": 1, "test": 1}, 0)
    train = dataset.build_dataset_dict(problems, tok)["train"]
    run = RunFolder.open(cfg)
    result = sft.train_model("parallel", cfg, tok, train, run, base_model=str(hub_folder))
    losses = sft.loss_history(result["log"]).loss.tolist()
    assert result["rows"] == 1 and len(losses) == 3 and losses[-1] < losses[0]
    assert result["parameters"] == models.count_parameters(AutoModelForCausalLM.from_pretrained(result["model_path"]))


VLLM_GREEDY = textwrap.dedent('''
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


def _vllm_matches_hf(hub_folder, tmp_path, device: str):
    model, tok = models.load_pretrained(hub_folder)
    folder = models.save_model(model, tok, tmp_path / "tagged")
    prompts = [tokenizers.prompt_ids(tok, "12*34=?") + tok.encode("<think>\n<Parallel>\n", add_special_tokens=False),
               tokenizers.prompt_ids(tok, "7+8")]
    hf = models.load_model(folder).to(device)
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p], device=device), attention_mask=torch.ones(1, len(p), dtype=torch.long,
                              device=device), do_sample=False, max_new_tokens=16, min_new_tokens=16)
        expected.append(out[0, len(p):].tolist())
    assert all(len(set(e)) > 1 for e in expected)
    assert run_vllm_script(tmp_path, VLLM_GREEDY, str(folder), json.dumps(prompts)) == expected


@pytest.mark.engines
@NEEDS_VLLM
def test_vllm_cpu_loads_a_load_pretrained_folder(hub_folder, tmp_path):
    _vllm_matches_hf(hub_folder, tmp_path, "cpu")


# --------------------------------------------------------------------------- accelerate configs
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_the_four_accelerate_configs_exist():
    assert [p.stem for p in CONFIGS] == ["deepspeed_zero2", "deepspeed_zero3", "multi_gpu", "single_gpu"]
    assert launch.accelerate_config("deepspeed_zero3") == ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"
    with pytest.raises(FileNotFoundError, match="known: deepspeed_zero2, deepspeed_zero3"):
        launch.accelerate_config("zero4")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_names_valid_keys_and_launches(path, monkeypatch):
    """Parsed by accelerate itself (unknown keys raise), run through ``accelerate launch``'s own
    validation, and the environment it hands each process checked value by value."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    cluster = ClusterConfig.from_yaml_file(path)
    assert cluster.mixed_precision == "bf16" and not cluster.use_cpu
    parser = launch_command_parser()
    known = {a.dest for a in parser._actions}
    assert set(cluster.deepspeed_config) <= known  # each key maps to a launch option, none is ignored
    argv = launch.accelerate_command("sft", "p.json", "parallel", path)
    args = parser.parse_args(argv[argv.index("--config_file"):])
    args, defaults, _ = _validate_launch_command(args)
    kind = path.stem
    assert args.num_processes == (1 if kind == "single_gpu" else 8)
    assert args.use_deepspeed == kind.startswith("deepspeed") and args.multi_gpu == (kind == "multi_gpu")
    assert args.training_script == "twlib.launch" and args.module
    if kind == "multi_gpu":
        assert prepare_multi_gpu_env(args)["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        for k, v in env.items():
            if k.startswith("ACCELERATE_"):
                monkeypatch.setenv(k, v)
        ds = DeepSpeedPlugin().deepspeed_config  # what DeepSpeed itself will be given
        stage = int(kind[-1])
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
        # the trainer's own arguments fill these ("auto"), so the config cannot contradict them
        assert ds["gradient_accumulation_steps"] == ds["gradient_clipping"] == "auto"
        if stage == 3:
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
            assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"


# ------------------------------------------------------------------------- multi-process entry
def test_accelerate_command_and_stage_params_round_trip(tmp_path):
    cmd = launch.accelerate_command("pgrpo", "p.json", "pgrpo", "c.yaml", num_processes=6, main_process_port=29501)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[3:9] == ["--config_file", "c.yaml", "--num_processes", "6", "--main_process_port", "29501"]
    assert cmd[-6:] == ["-m", "twlib.launch", "pgrpo", "p.json", "--name", "pgrpo"]
    with pytest.raises(ValueError, match="job must be one of"):
        launch.accelerate_command("dpo", "p.json", "x", "c.yaml")
    cfg = config.TrieSFTConfig(profile="scale", output_root=str(tmp_path), max_steps=7, row_tokens=4096)
    path = launch.write_stage_params(cfg, tmp_path)
    assert launch.load_stage(path, "02_trie_sft") == cfg
    with pytest.raises(config.ConfigError, match="not '04_pgrpo'"):
        launch.load_stage(path, "04_pgrpo")
    profile_cfg = launch.load_stage(ROOT / "params" / "smoke.yaml", "02_trie_sft")
    assert profile_cfg == config.load_profile(ROOT / "params" / "smoke.yaml").stage_config("02_trie_sft")
    settings = sft.train_settings(cfg)
    assert settings.use_cpu == (not torch.cuda.is_available()) and settings.max_steps == 7


def test_rollout_server_command_is_trls_vllm_serve(tmp_path):
    cmd, env = pgrpo.rollout_server_command(tmp_path / "model", port=8123, tensor_parallel_size=2, max_model_len=8192)
    assert cmd[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", str(tmp_path / "model")]
    for flag, value in [("--port", "8123"), ("--tensor-parallel-size", "2"), ("--max-model-len", "8192"),
                        ("--dtype", "bfloat16")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-prefix-caching" in cmd and "--weight-transfer-config" in cmd
    assert env == {"VLLM_SERVER_DEV_MODE": "1"}


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    """Notebook 01's outputs for a tiny profile, and a params file naming it (absolute output root)."""
    from twlib.files import atomic_write_json
    from twlib.runs import stage_dir

    root = tmp_path_factory.mktemp("outputs")
    traj = config.TrajectoriesConfig(profile="scale", output_root=str(root), n_train=8, n_validation=2, n_test=2,
                                     expr_groups_min=2, expr_groups_max=3, expr_repeats_min=2, expr_repeats_max=3,
                                     expr_chain_repeats_min=2, expr_chain_repeats_max=3)
    folder = stage_dir(traj.output_root, traj.profile, traj.stage)
    problems = tasks.generate_splits(tasks.task_mix(traj), traj.sizes(), traj.seed)
    dataset.save_parquet(dataset.build_dataset_dict(problems, TOK), folder / "data")
    tokenizers.save_tokenizer(TOK, folder / "tokenizer")
    atomic_write_json(folder / "metrics.json", {"status": "complete", "params": traj.to_dict()})
    sft_cfg = config.TrieSFTConfig(profile="scale", output_root=str(root), hidden_size=64, num_layers=1, num_heads=2,
                                   num_kv_heads=1, intermediate_size=128, max_steps=2, batch_rows=2, row_tokens=2048,
                                   learning_rate=1e-3, warmup_steps=0, logging_steps=1, save_steps=100)
    return root, sft_cfg


@pytest.fixture(scope="module")
def trained_profile(tiny_profile):
    """Notebook 02 of the tiny profile run through `launch.worker` (both models), marked complete."""
    from twlib.files import atomic_write_json
    from twlib.runs import stage_dir

    root, cfg = tiny_profile
    params = launch.write_stage_params(cfg, root / "params")
    results = {kind: launch.worker("sft", params, kind) for kind in ("sequential", "parallel")}
    atomic_write_json(stage_dir(cfg.output_root, cfg.profile, cfg.stage) / "metrics.json",
                      {"status": "complete", "params": cfg.to_dict()})
    return root, cfg, params, results


def test_sft_job_trains_and_reports_like_the_notebook(trained_profile):
    from transformers import AutoModelForCausalLM

    root, cfg, params, results = trained_profile
    for kind, result in results.items():
        written = json.loads(launch.result_path(cfg, "sft", kind).read_text())
        assert written["model_path"] == result["model_path"] and len(sft.loss_history(written["log"])) == 2
        model = AutoModelForCausalLM.from_pretrained(result["model_path"])
        assert models.count_parameters(model) == result["parameters"] > 0
    with pytest.raises(ValueError, match="'parallel' or 'sequential'"):
        launch.worker("sft", params, "both")


def test_pgrpo_job_runs_a_step_from_the_sft_model(trained_profile, monkeypatch):
    """Notebook 04's RL run through the launch worker (HF rollouts, one process): a real step, the
    trained model saved loadable, the main process's record written."""
    from transformers import AutoModelForCausalLM

    root, _, _, _ = trained_profile
    cfg = config.PGRPOConfig(profile="scale", output_root=str(root), max_steps=1, prompts_per_step=2, num_generations=2,
                             learning_rate=1e-3, max_new_tokens=24, max_thread_tokens=8, save_steps=10)
    params = launch.write_stage_params(cfg, root / "params")
    result = launch.worker("pgrpo", params, "pgrpo")
    assert json.loads(launch.result_path(cfg, "pgrpo", "pgrpo").read_text())["model_path"] == result["model_path"]
    step = [r for r in result["log"] if "loss" in r]
    assert len(step) == 1 and 0 < step[0]["rollout/total_tokens"] <= 24
    sft_folder = Path(result["model_path"]).parent.parent / "02_trie_sft"
    before = AutoModelForCausalLM.from_pretrained(sft_folder / "parallel_model")
    after = AutoModelForCausalLM.from_pretrained(result["model_path"])
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    with pytest.raises(ValueError, match="the RL run is one of"):
        launch.worker("pgrpo", params, "dpo")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # what accelerate sets from deepspeed_zero3.yaml
    with pytest.raises(config.ConfigError, match="roll out with vLLM"):
        launch.worker("pgrpo", params, "pgrpo")


def test_launch_runs_the_entry_point_under_accelerate(tiny_profile, tmp_path):
    """The real ``accelerate launch -m twlib.launch sft …`` in a child process (one CPU process here)."""
    root, cfg = tiny_profile
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n"
                   "mixed_precision: 'no'\nuse_cpu: true\n")
    lines = []
    result = launch.launch("sft", cfg, "parallel", cpu, echo=lines.append)
    assert Path(result["model_path"]).is_dir() and result["trajectories"] > 0 and result["rows"] >= 1
    assert (Path(result["model_path"]) / "model.safetensors").is_file()
    bad = config.TrieSFTConfig(**{**cfg.to_dict(), "profile": "missing"})
    with pytest.raises(RuntimeError, match="failed"):
        launch.launch("sft", bad, "parallel", cpu, echo=None)


def test_jobs_side_by_side_keep_each_result_and_resume(tiny_profile, capsys):
    """``concurrent_jobs: 2``: both SFT models train at once, each in its own process with one core's threads; each
    result is kept as the run's step when it ends, so a second call (a resumed or re-opened run) launches nothing,
    and a failing job is reported by name after the other one has finished and been kept."""
    from twlib.runs import RunFolder

    root, base = tiny_profile
    cfg = dataclasses.replace(base, profile="side", concurrent_jobs=2)
    (root / "side").mkdir(exist_ok=True)  # the same notebook-01 outputs under this profile's name
    if not (root / "side" / "01_trajectories").exists():
        (root / "side" / "01_trajectories").symlink_to(root / "scale" / "01_trajectories")
    run = RunFolder.open(cfg)
    results = sft.fit(cfg, ["sequential", "parallel"], run)
    assert set(results) == {"sequential", "parallel"}
    for name, result in results.items():
        assert (Path(result["model_path"]) / "model.safetensors").is_file()
        assert run.has_step(f"sft-{name}") and run.timings[f"train_{name}"] > 0
        log = (run.folder / "launch" / f"sft-{name}.log").read_text()
        assert "2/2 [" in log  # the job's own progress bar, which the notebook's bar follows
    assert "sequential" in capsys.readouterr().out
    again = RunFolder.open(cfg)
    assert sft.fit(cfg, ["sequential", "parallel"], again) == results and not again.timings
    other = dataclasses.replace(cfg, max_steps=1)
    (run.folder / "steps" / "sft-parallel.json").unlink()
    with pytest.raises(RuntimeError, match=r"sft 'nonsense' failed .*sft-nonsense\.log[\s\S]*'parallel' or 'sequential'"):
        launch.run_jobs("sft", sft.sft_job, other, ["parallel", "nonsense"], RunFolder.existing(other))
    assert RunFolder.existing(other).has_step("sft-parallel")  # kept although its sibling failed


def test_concurrent_jobs_knob_is_checked():
    with pytest.raises(config.ConfigError, match="concurrent_jobs"):
        config.TrieSFTConfig.from_dict({"profile": "p", "concurrent_jobs": 0})
    with pytest.raises(config.ConfigError, match="concurrent_jobs.*accelerate_config"):
        config.PGRPOConfig.from_dict({"profile": "p", "concurrent_jobs": 2, "accelerate_config": "multi_gpu"})


# ---------------------------------------------------------------------------------- GPU bench
def test_bench_gpu_runs_on_cpu_with_the_dense_mask():
    from twlib import bench
    from twlib.bench import gpu as bench_gpu

    assert "gpu" in bench.BENCHES
    records = list(bench_gpu.bench_sft("tiny", lengths=(256,), steps=1))
    by = {r["attention"]: r for r in records}
    if not torch.cuda.is_available():
        assert by["flex"]["status"] == "skipped"
    ok = by["dense"]
    assert ok["status"] == "ok" and 0.85 * 256 <= ok["row_tokens"] <= 256 and 0 < ok["trained_tokens"] < 256
    assert ok["tokens_per_s"] == pytest.approx(256 / ok["step_seconds"], rel=0.01)
    assert math.log(models.QWEN3_VOCAB) - 1 < ok["loss"] < math.log(models.QWEN3_VOCAB) + 1  # a random model
    (dec,) = bench_gpu.bench_decode("tiny", prefix=32, tokens=16, threads=(4,), repeats=1)
    assert dec["thread_tokens"] == 4 and dec["token_latency_speedup"] == 4.0
    assert dec["wall_clock_speedup"] == pytest.approx(dec["sequential_seconds"] / dec["parallel_seconds"], rel=0.02)


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@CUDA
def test_flex_bf16_sft_on_a_32k_row_with_checkpointing(tmp_path):
    """One packed 32k-token row trains on the GPU in bf16 with flex attention and gradient
    checkpointing, in far less memory than the dense mask alone would take (2 GiB in bf16)."""
    from datasets import Dataset

    from twlib.bench.gpu import packed_row

    row, tok = packed_row(32768)
    rows = Dataset.from_dict({"input_ids": [row.input_ids], "position_ids": [row.position_ids],
                              "exit": [row.exit], "labels": [row.labels]})
    spec = models.TinyModelSpec(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
                                max_position_embeddings=32768)
    model = models.build_tiny_model(tok, spec, seed=0)
    settings = sft.TrainSettings(max_steps=3, per_device_train_batch_size=1, learning_rate=1e-3, warmup_steps=0,
                                 logging_steps=1, save_steps=100, bf16=True, use_cpu=False, attention="flex",
                                 gradient_checkpointing=True)
    torch.cuda.reset_peak_memory_stats()
    trainer = sft.make_trainer(model, tok, rows, tmp_path, settings)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert model.is_gradient_checkpointing and model.config._attn_implementation == "flex_attention"
    assert torch.cuda.max_memory_allocated() < 1.5 * 2**30


@pytest.mark.gpu
@CUDA
def test_flex_equals_dense_loss_and_gradients_on_gpu(tmp_path):
    """fp32 on CUDA, where flex attention has a backward: same loss and gradients as the dense mask,
    with and without gradient checkpointing."""
    rows = _rows(6, max_tokens=2048)
    results = {}
    for attention in sft.ATTENTION_KINDS:
        for ckpt in (False, True):
            settings = sft.TrainSettings(max_steps=1, per_device_train_batch_size=len(rows), logging_steps=1,
                                         save_steps=100, use_cpu=False, attention=attention,
                                         gradient_checkpointing=ckpt)
            grads, _, _, trainer = _first_step_gradients(tmp_path / f"{attention}-{ckpt}", settings, rows)
            results[attention, ckpt] = ([r["loss"] for r in trainer.state.log_history if "loss" in r][0], grads)
    loss0, grads0 = results["dense", False]
    for key, (loss, grads) in results.items():
        assert loss == pytest.approx(loss0, abs=1e-4), key
        for name in grads0:
            assert torch.allclose(grads[name], grads0[name], atol=1e-4, rtol=1e-3), (key, name)


@pytest.mark.gpu
@CUDA
@NEEDS_VLLM
def test_vllm_gpu_loads_a_load_pretrained_folder(hub_folder, tmp_path):
    _vllm_matches_hf(hub_folder, tmp_path, "cuda")


@pytest.mark.gpu
@CUDA
def test_bench_gpu_smoke():
    from twlib.bench import gpu as bench_gpu

    records = {r["attention"]: r for r in bench_gpu.bench_sft("tiny", lengths=(2048,), steps=2)}
    assert all(r["status"] == "ok" and r["peak_memory_gb"] > 0 and r["tokens_per_s"] > 0 for r in records.values())
    assert records["flex"]["loss"] == pytest.approx(records["dense"]["loss"], abs=0.05)  # bf16, same row and init
    (dec,) = bench_gpu.bench_decode("tiny", prefix=256, tokens=256, threads=(4,))
    assert dec["wall_clock_speedup"] > 1.0  # four batched threads beat one sequence four times as long


@pytest.mark.gpu
@CUDA
def test_launch_sft_on_one_gpu(tiny_profile):
    root, cfg = tiny_profile
    result = launch.launch("sft", cfg, "parallel", launch.accelerate_config("single_gpu"), echo=None)
    assert (Path(result["model_path"]) / "model.safetensors").is_file()
