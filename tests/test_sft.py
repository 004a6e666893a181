"""Trie SFT through TRL: the trainer's loss equals a unit-by-unit reference; resume reproduces a run."""
import random
import warnings

import pytest
import torch

from twlib import format as fmt
from twlib import models, sft, trie
from twlib import tokenizer as tokenizers
from twlib.tasks import ExpressionParams, make_problem

TOK = tokenizers.build_char_tokenizer()
SPEC = models.TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                            initializer_range=0.2)


def _examples(n: int, parallel: bool = True, seed: int = 0):
    rng = random.Random(seed)
    params = ExpressionParams(groups_min=2, groups_max=3, repeats_min=2, repeats_max=4, balanced_fraction=0.8)
    problems = [make_problem("expressions", rng, params) for _ in range(n)]
    return [{"question": p.question, "text": p.plan.parallel_text() if parallel else p.plan.sequential_text()}
            for p in problems]


def _reference_loss(model, examples) -> torch.Tensor:
    """Mean next-token loss over every unit completion, each unit run alone as a causal sequence."""
    total, count = 0.0, 0
    for ex in examples:
        prompt = tokenizers.prompt_ids(TOK, ex["question"])
        for u in trie.units(prompt, fmt.parse(ex["text"]), TOK):
            seq = torch.tensor([list(u.context) + list(u.completion)])
            logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1], -1)
            targets = seq[0, 1:]
            picked = logp[torch.arange(len(targets)), targets][len(u.context) - 1:]
            total = total - picked.sum()
            count += len(u.completion)
    return total / count


@pytest.mark.parametrize("parallel", [True, False])
def test_trainer_loss_equals_unit_reference(tmp_path, parallel):
    examples = _examples(6, parallel)
    rows = sft.rows_dataset(sft.trajectory_tries(examples, TOK), max_tokens=4096)
    model = models.build_tiny_model(TOK, SPEC, seed=1)
    trainer = sft.make_trainer(model, TOK, rows, tmp_path, sft.TrainSettings(max_steps=1))
    batch = sft.TrieCollator(TOK.pad_token_id)([rows[i] for i in range(len(rows))])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        reference = _reference_loss(model, examples)
    assert abs(loss.item() - reference.item()) < 1e-4


def test_bf16_autocast_on_cpu_trains_with_the_fp32_loss(tmp_path):
    """cpu-demo trains under bf16 autocast on the CPU: same first losses as fp32 up to bf16 rounding."""
    rows = sft.rows_dataset(sft.trajectory_tries(_examples(8), TOK), max_tokens=1024)
    losses = {}
    for bf16 in (False, True):
        model = models.build_tiny_model(TOK, SPEC, seed=1)
        settings = sft.TrainSettings(max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_steps=100,
                                     learning_rate=1e-3, bf16=bf16, use_cpu=True)
        trainer = sft.make_trainer(model, TOK, rows, tmp_path / str(bf16), settings)
        assert trainer.data_collator.dtype == ("bfloat16" if bf16 else "float32")
        losses[bf16] = [r["loss"] for r in sft.train(trainer) if "loss" in r]
        assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert len(losses[True]) == len(losses[False]) == 2
    for lo_fp32, lo_bf16 in zip(losses[False], losses[True]):
        assert lo_bf16 != lo_fp32 and abs(lo_bf16 - lo_fp32) < 0.02 * lo_fp32


def test_sequential_trie_is_a_plain_causal_path():
    row = sft.trajectory_tries(_examples(1, parallel=False), TOK)[0]
    n = len(row)
    assert row.position_ids == list(range(n))
    assert row.parent == [-1] + list(range(n - 1))
    assert row.exit == [n - 1] * n  # every token is an ancestor of all later ones: causal mask


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    rows = sft.rows_dataset(sft.trajectory_tries(_examples(12), TOK), max_tokens=1024)
    settings = sft.TrainSettings(max_steps=6, per_device_train_batch_size=2, save_steps=3, logging_steps=1,
                                 warmup_steps=2, learning_rate=1e-3)
    full = models.build_tiny_model(TOK, SPEC, seed=2)
    sft.train(sft.make_trainer(full, TOK, rows, tmp_path / "full", settings))

    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):  # the same run, stopped right after its step-3 checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 3

    interrupted = models.build_tiny_model(TOK, SPEC, seed=2)
    first = sft.make_trainer(interrupted, TOK, rows, tmp_path / "resumed", settings)
    first.add_callback(Interrupt())
    sft.train(first)
    assert sft.last_checkpoint(tmp_path / "resumed").endswith("checkpoint-3")
    resumed = models.build_tiny_model(TOK, SPEC, seed=99)  # weights come from the checkpoint
    log = sft.train(sft.make_trainer(resumed, TOK, rows, tmp_path / "resumed", settings))
    assert [r["step"] for r in log if "loss" in r][-1] == 6
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    history = sft.loss_history(log)
    assert list(history.columns) == ["step", "loss", "learning_rate"] and (history.loss > 0).all()


def _greedy(model, context, n: int) -> list[int]:
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context):]


def test_reference_match_is_greedy_decoding_unit_by_unit(tmp_path):
    examples = _examples(2, parallel=True, seed=3)
    rows = sft.rows_dataset(sft.trajectory_tries(examples, TOK), max_tokens=4096)
    model = models.build_tiny_model(TOK, SPEC, seed=0)
    settings = sft.TrainSettings(max_steps=150, learning_rate=1e-2, warmup_steps=0, save_steps=1000,
                                 lr_scheduler_type="constant", logging_steps=50)
    sft.train(sft.make_trainer(model, TOK, rows, tmp_path, settings))
    candidates = examples + _examples(2, parallel=True, seed=4)
    matched = sft.reference_match(model, TOK, candidates, batch_size=3)
    assert matched == [True, True, False, False]  # the two memorised trajectories, not two unseen ones
    model.eval()
    for ex, m in zip(candidates, matched):
        prompt = tokenizers.prompt_ids(TOK, ex["question"])
        unit_list = trie.units(prompt, fmt.parse(ex["text"]), TOK)
        assert m == all(_greedy(model, u.context, len(u.completion)) == list(u.completion) for u in unit_list)
    # End to end: the orchestrator over HFEngine writes the memorised trajectories token for token.
    from twlib.engines.hf import HFEngine
    from twlib.orchestrator import Orchestrator

    prompts = [tokenizers.prompt_ids(TOK, ex["question"]) for ex in examples]
    results = Orchestrator(HFEngine(model, TOK.eos_token_id), TOK).run(prompts)
    for ex, r in zip(examples, results):
        assert r.response_ids == tokenizers.segment_ids(fmt.parse(ex["text"]), TOK).ids
        assert not r.flags and r.metrics["num_blocks"] == ex["text"].count("<Parallel>") >= 1


@pytest.mark.parametrize("native, bf16, use_cpu, warned", [
    (False, True, True, True), (True, True, True, False), (None, True, True, False),
    (False, False, True, False), (False, True, False, False)])
def test_bf16_emulated_on_this_cpu_is_named(monkeypatch, native, bf16, use_cpu, warned):
    monkeypatch.setattr(sft, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sft.warn_emulated_bf16(sft.TrainSettings(max_steps=1, bf16=bf16), use_cpu)
    assert [("no bf16 instructions" in str(w.message) and "bf16: false" in str(w.message)) for w in caught] == \
        ([True] if warned else [])


def test_cpu_bf16_flags_read_from_cpuinfo():
    assert models.cpu_has_native_bf16("processor : 0\nflags : fpu avx2 amx_bf16\n") is True
    assert models.cpu_has_native_bf16("Features : fp asimd bf16\n") is True  # Arm
    assert models.cpu_has_native_bf16("flags : fpu avx2 avx512f\nbugs : bf16\n") is False  # only flag lines count
