"""P-GRPO: advantages as TRL computes them, the tree-scored loss and gradient against a unit-by-unit
reference, rewards by hand, real training steps, resume, and guard-hitting rollouts."""
import importlib.util
import os
import random
from collections import defaultdict, deque

import pytest
import torch
from scripted_engines import END, EOS, TOK, ScriptEngine

from twlib import format as fmt
from twlib import models, trie
from twlib.engines import Completion, finish_reason
from twlib.orchestrator import Orchestrator, OrchestratorConfig
from twlib.pgrpo import ParallelGRPOTrainer, PGRPOSettings, grpo_args, rollout_sample, tree_log_probs, tree_tensors
from twlib.rewards import RewardConfig, reward_function, score
from twlib.tasks import ExpressionParams, make_problem
from twlib.tokenizer import prompt_ids, token_counter

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
G = 3
ORCH = OrchestratorConfig(max_new_tokens=600, max_context=1024)


def _problems(n=2, seed=0):
    rng = random.Random(seed)
    params = ExpressionParams(balanced_fraction=1.0, groups_min=2, groups_max=3, repeats_min=1, repeats_max=3)
    return [make_problem("expressions", rng, params) for _ in range(n)]


def _variants(p):
    """Three rollouts of one question: parallel and right, sequential and right, parallel and wrong."""
    wrong = str((int(p.answer) + 1) % 10)
    par = p.plan.parallel_text()
    return [par, p.plan.sequential_text(), par.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{wrong}}}")]


class VariantEngine:
    """Replays trajectories; a context shared by several (the prompt) hands them out in order."""

    def __init__(self, problems):
        self.table = defaultdict(deque)
        for p in problems:
            prompt = prompt_ids(TOK, p.question)
            for text in _variants(p):
                for u in trie.units(prompt, fmt.parse(text), TOK):
                    self.table[u.context].append(u.completion)
        self.eos_token_id = EOS

    def generate(self, requests):
        out = []
        for r in requests:
            queue = self.table[r.prompt]
            ids = queue[0]
            queue.rotate(-1)
            out.append(Completion(ids, finish_reason(ids, r.stop_ids, EOS)))
        return out


def _dataset(problems):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p.question}] for p in problems],
                              "answer": [p.answer for p in problems], "question": [p.question for p in problems]})


def _model(seed=0):
    spec = models.TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                initializer_range=0.2)
    model = models.build_tiny_model(TOK, spec, seed=seed)
    model.config._attn_implementation = "eager"
    return model


def _trainer(tmp_path, problems, engine=None, std=False, max_steps=2, save_steps=50, objective="corrected",
             rewards=RewardConfig(), seed=0, model=None):
    args = grpo_args(tmp_path / "run", max_steps=max_steps, prompts_per_step=len(problems), num_generations=G,
                     learning_rate=1e-3, std_advantages=std, save_steps=save_steps, seed=seed)
    args.weight_decay = 0.0  # a parameter change must come from the policy gradient alone
    settings = PGRPOSettings(rewards=rewards, orchestrator=ORCH, objective=objective)
    Trainer = ParallelGRPOTrainer
    return Trainer(model or _model(), TOK, _dataset(problems), args, settings, engine=engine)


def _batch(trainer, problems):
    rows = [dict(r) for r in _dataset(problems) for _ in range(G)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before compute_loss
    return trainer._generate_and_score_completions(rows)


def _expected_rewards(problems, rewards=RewardConfig()):
    engine = VariantEngine(problems)
    prompts = [prompt_ids(TOK, p.question) for p in problems for _ in range(G)]
    results = Orchestrator(engine, TOK, ORCH).run(prompts)
    gold = [p.answer for p in problems for _ in range(G)]
    r = torch.tensor([score(x.text, a, x.metrics["acceleration_ratio"], rewards).total for x, a in zip(results, gold)])
    return r, results


@pytest.mark.parametrize("std", [False, True])
def test_advantages_equal_trl_group_statistics(tmp_path, std):
    problems = _problems()
    trainer = _trainer(tmp_path, problems, VariantEngine(problems), std=std)
    out = _batch(trainer, problems)
    r, _ = _expected_rewards(problems)
    groups = r.view(-1, G)
    centred = (groups - groups.mean(1, keepdim=True))
    expected = centred / (groups.std(1, keepdim=True) + 1e-4) if std else centred
    # the rewards are 1 + bonus, 1 and 0 in each group, so centring alone leaves a non-zero mean nowhere
    assert torch.allclose(out["advantages"], expected.flatten(), atol=1e-6)
    assert (r.view(-1, G)[:, 0] > 1.0).all() and (r.view(-1, G)[:, 1] == 1.0).all() and (r.view(-1, G)[:, 2] == 0).all()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tree_loss_and_gradient_equal_unit_by_unit_reference(tmp_path, attn):
    problems = _problems()
    trainer = _trainer(tmp_path, problems, VariantEngine(problems))
    model = trainer.model
    model.config._attn_implementation = attn
    out = _batch(trainer, problems)
    loss = trainer.compute_loss(model, out)
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    _, results = _expected_rewards(problems)
    model.zero_grad()
    total, tokens = 0.0, 0
    for b, res in enumerate(results):
        for u in res.units:
            seq = torch.tensor([list(u.context) + list(u.completion)])
            logps = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
            k = len(u.context)
            lp = logps[k - 1:].gather(-1, seq[0, k:].unsqueeze(-1)).squeeze(-1)
            total = total - (out["advantages"][b] * torch.exp(lp - lp.detach())).sum()
            tokens += len(u.completion)
    reference = total / tokens
    reference.backward()
    assert tokens == int(out["num_items_in_batch"])
    assert abs(loss.item() - reference.item()) <= 1e-5
    worst = max((grads[n] - p.grad).abs().max().item() for n, p in model.named_parameters() if n in grads)
    assert worst <= 1e-5 and any(g.abs().max() > 1e-4 for g in grads.values())


def test_tree_log_probs_match_plain_forward_on_a_sequential_rollout():
    model = _model().eval()
    p = _problems(1)[0]
    prompt = prompt_ids(TOK, p.question)
    r = Orchestrator(VariantEngine([p]), TOK, ORCH).run([prompt, prompt])[1]  # the sequential variant
    s = rollout_sample(r)
    assert s.completion_ids == r.response_ids and all(s.scored)
    tree = tree_tensors([s], len(prompt), len(s.completion_ids))
    ids = torch.tensor([prompt + s.completion_ids])
    with torch.no_grad():
        lp, _ = tree_log_probs(model, ids, torch.tensor([s.completion_ids]), torch.ones(1, len(s.completion_ids)), tree)
        ref = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)[len(prompt) - 1:]
    ref = ref.gather(-1, torch.tensor(s.completion_ids).unsqueeze(-1)).squeeze(-1)
    assert (lp[0] - ref).abs().max() <= 1e-5


def test_rewards_by_hand():
    par = fmt.parse(_problems(1)[0].plan.parallel_text(), count=token_counter(TOK))
    stats = fmt.statistics(par)
    ratio = 1 - stats.critical_path_tokens / stats.total_tokens
    assert ratio > 0.2  # the clip binds for this trajectory
    text, gold = par.render(), _problems(1)[0].answer
    cfg = RewardConfig()
    assert score(text, gold, ratio, cfg).total == pytest.approx(1 + 0.5 * 0.2)
    assert score(text, gold, 0.05, cfg).total == pytest.approx(1 + 0.5 * 0.05)
    assert score(text, gold, 0.0, cfg).total == 1.0  # sequential: no bonus
    assert score(text, gold, ratio, RewardConfig(acceleration=False)).total == 1.0
    wrong = str((int(gold) + 1) % 10)
    assert score(text, wrong, ratio, cfg).total == 0.0
    assert score(text, wrong, ratio, RewardConfig(incorrect_reward=-1.0)).total == -1.0
    assert score("<think>\nno answer", gold, ratio, cfg).correct is False
    logged = {}
    f = reward_function(cfg)
    values = f(None, None, None, answer=[gold, wrong], response_text=[text, text], acceleration_ratio=[ratio, ratio],
               log_extra=lambda k, v: logged.setdefault(k, v), log_metric=lambda k, v: logged.setdefault(k, v))
    assert values == [pytest.approx(1.1), 0.0]
    assert logged["correct"] == [True, False] and logged["accuracy"] == 0.5
    with pytest.raises(ValueError, match="clip"):
        RewardConfig(clip=2.0)


def test_real_steps_change_parameters_and_resume_matches(tmp_path):
    problems = _problems()
    straight = _trainer(tmp_path / "a", problems, VariantEngine(problems), max_steps=3)
    before = {n: p.detach().clone() for n, p in straight.model.named_parameters()}
    straight.train()
    losses = [r["loss"] for r in straight.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert max((p - before[n]).abs().max().item() for n, p in straight.model.named_parameters()) > 1e-4

    first = _trainer(tmp_path / "b", problems, VariantEngine(problems), max_steps=3, save_steps=2)
    first.args.max_steps = 2  # an interruption after the checkpoint at step 2
    first.train()
    resumed = _trainer(tmp_path / "b", problems, VariantEngine(problems), max_steps=3, save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    worst = max((p - dict(straight.model.named_parameters())[n]).abs().max().item()
                for n, p in resumed.model.named_parameters())
    assert worst <= 1e-5


def test_guard_hitting_rollouts_are_scored_and_counted(tmp_path):
    """A policy that never closes its threads and writes EOS in one: the samples are scored, not dropped."""
    def policy(prompt):
        if prompt.endswith(("1:", "2:")) and "<Thread>\n" in prompt[-12:]:
            return " y" * 300 if prompt.endswith("2:") else f" done{END}"
        return "<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
    problems = _problems()
    trainer = _trainer(tmp_path, problems, ScriptEngine(policy))
    out = _batch(trainer, problems)
    assert trainer.guard_counts["thread_unclosed"] == 2 * G and trainer.guard_counts["eos_in_thread"] == 2 * G
    assert trainer._metrics["train"]["rollout/guard_hit_ratio"][-1] == 1.0
    loss = trainer.compute_loss(trainer.model, out)
    assert torch.isfinite(loss)
    # thread 1's EOS (replaced by </Thread> in the joined text) is scored on its own branch
    s = trainer._last_samples[0]
    assert EOS in [t for t, m in zip(s.completion_ids, s.scored) if m]


def test_real_policy_rollouts_through_hf_engine(tmp_path):
    """One real step with the policy itself as the engine: an untrained model hits the budget guard."""
    problems = _problems()
    trainer = _trainer(tmp_path, problems, engine=None, max_steps=1)
    trainer.settings = PGRPOSettings(orchestrator=OrchestratorConfig(max_new_tokens=24, max_context=256))
    trainer.train()
    log = [r for r in trainer.state.log_history if "loss" in r][0]
    assert 0 < log["rollout/total_tokens"] <= 24 and trainer.guard_counts["budget"] >= 1
    assert torch.isfinite(torch.tensor(log["loss"]))
    questions = [p.question for p in problems for _ in range(G)]
    assert sorted(tuple(s.prompt_ids) for s in trainer._last_samples) == sorted(
        tuple(prompt_ids(TOK, q)) for q in questions)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")
def test_vllm_colocate_rollouts_on_gpu(tmp_path):
    """TRL's colocated vLLM generates the rollouts (weights synced from the policy); one real step."""
    problems = _problems()
    model_dir = tmp_path / "model"
    models.save_model(_model(), TOK, model_dir)
    args = grpo_args(tmp_path / "run", max_steps=1, prompts_per_step=len(problems), num_generations=G,
                     learning_rate=1e-3, use_cpu=False, use_vllm=True, vllm_gpu_memory_utilization=0.2)
    Trainer = ParallelGRPOTrainer
    trainer = Trainer(str(model_dir), TOK, _dataset(problems), args,
                      PGRPOSettings(orchestrator=OrchestratorConfig(max_new_tokens=24, max_context=256)))
    trainer.train()
    log = [r for r in trainer.state.log_history if "loss" in r][0]
    assert 0 < log["rollout/total_tokens"] <= 24 and torch.isfinite(torch.tensor(log["loss"]))
    assert len(trainer._last_samples) == len(problems) * G


def test_official_objective_switch_scores_every_flat_token_from_its_flat_predecessor():
    p = _problems(1)[0]
    prompt = prompt_ids(TOK, p.question)
    r = Orchestrator(VariantEngine([p]), TOK, ORCH).run([prompt])[0]  # the parallel variant
    assert r.metrics["num_blocks"] == 1
    corrected, official = rollout_sample(r), rollout_sample(r, "official")
    assert corrected.completion_ids == official.completion_ids
    n = len(prompt)
    assert all(official.scored) and official.sources == [n + j - 1 for j in range(len(official.completion_ids))]
    # the corrected objective scores exactly the model's own tokens, each once
    assert sum(corrected.scored) == sum(len(u.completion) for u in r.units) < len(corrected.completion_ids)
