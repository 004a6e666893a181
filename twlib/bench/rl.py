"""``python -m twlib.bench rl``: one P-GRPO step on the same rollouts of the parallel SFT model (the profile's
notebook-04 prompts per step, rollouts per prompt, temperature and budgets): tokens scored and seconds for the
policy-gradient forward + backward with the trie (one sample per rollout, ancestor mask) vs expanded units
(each engine call its own causal sequence, as the official RL did). Needs notebooks 01 and 02's outputs."""
from __future__ import annotations

import time
from typing import Iterator

import torch

from ..config import PGRPOConfig, Profile
from ..dataset import load_parquet
from ..engines import Sampling
from ..engines.hf import HFEngine
from ..models import context_length, load_model
from ..orchestrator import Orchestrator, OrchestratorConfig
from ..pgrpo import rollout_sample, tree_log_probs, tree_tensors
from ..tokenizer import load_tokenizer, prompt_ids
from .common import outputs


def run(profile: Profile, repeats: int = 3) -> Iterator[dict]:
    """Trie vs expanded units for one RL step of the profile's notebook-04 settings (prompts per step,
    rollouts per prompt, temperature, budgets) on rollouts of its parallel SFT model and, once notebook 04
    has run, of the P-GRPO model (the policies at the start and the end of RL; docs/design.md §8)."""
    root = outputs(profile)
    path = root / "02_trie_sft" / "parallel_model"
    if not path.is_dir():
        raise SystemExit(f"no parallel model at {path}: run notebooks 01 and 02 of this profile first")
    policies = {"parallel_sft": path}
    if (root / "04_pgrpo" / "pgrpo_model").is_dir():  # the policy at the end of RL, when notebook 04 has run
        policies["pgrpo"] = root / "04_pgrpo" / "pgrpo_model"
    for policy, model_path in policies.items():
        yield from _bench_rl_policy(profile, policy, model_path, repeats)


def _rollouts(profile: Profile, model, tok, path) -> tuple[list, float]:
    """The profile's notebook-04 rollouts of one policy (prompts per step × rollouts per prompt) and their seconds."""
    train = load_parquet(outputs(profile) / "01_trajectories" / "data")["train"]
    rl = (profile.stage_config("04_pgrpo") if "04_pgrpo" in profile.stages
          else PGRPOConfig.from_dict({"profile": profile.name}))
    questions = [r["question"] for r in train.select(range(rl.prompts_per_step))]
    torch.manual_seed(rl.seed)
    orch = Orchestrator(HFEngine(model, tok.eos_token_id), tok, OrchestratorConfig.for_stage(
        rl, context_length(path), Sampling(temperature=rl.temperature, top_p=rl.top_p, seed=rl.seed)))
    t0 = time.perf_counter()
    results = orch.run([prompt_ids(tok, q) for q in questions for _ in range(rl.num_generations)])
    return results, time.perf_counter() - t0


def _trie_step(model, tok, results, advantages):
    """One policy-gradient forward + backward over the rollouts as tries; and the tokens it scores."""
    samples = [rollout_sample(r) for r in results]
    P, C = max(len(s.prompt_ids) for s in samples), max(len(s.completion_ids) for s in samples)
    ids = torch.full((len(samples), P + C), tok.pad_token_id)
    completion = torch.full((len(samples), C), tok.pad_token_id)
    scored = torch.zeros((len(samples), C))
    for b, s in enumerate(samples):
        ids[b, P - len(s.prompt_ids):P + len(s.completion_ids)] = torch.tensor(s.prompt_ids + s.completion_ids)
        completion[b, :len(s.completion_ids)] = torch.tensor(s.completion_ids)
        scored[b, :len(s.scored)] = torch.tensor(s.scored, dtype=torch.float)
    tree = tree_tensors(samples, P, C)

    def step():
        logps, _ = tree_log_probs(model, ids, completion, scored, tree)
        (-(advantages[:, None] * logps * scored).sum() / scored.sum()).backward()

    return step, sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)


def _units_step(model, tok, results, advantages):
    """The same step with every engine call as its own causal sequence (micro-batches of 16); and its tokens
    and sequences."""
    units = [(u, a) for r, a in zip(results, advantages) for u in r.units if u.completion]
    L = max(len(u.context) + len(u.completion) for u, _ in units)
    uids = torch.full((len(units), L), tok.pad_token_id)
    umask = torch.zeros((len(units), L), dtype=torch.long)
    ulabels = torch.zeros((len(units), L), dtype=torch.long)
    uscored = torch.zeros((len(units), L))
    uadv = torch.tensor([float(a) for _, a in units])
    for j, (u, _) in enumerate(units):
        seq = list(u.context) + list(u.completion)
        uids[j, :len(seq)] = torch.tensor(seq)
        umask[j, :len(seq)] = 1
        ulabels[j, len(u.context) - 1:len(seq) - 1] = torch.tensor(u.completion)
        uscored[j, len(u.context) - 1:len(seq) - 1] = 1

    def step():
        for start in range(0, len(units), 16):  # bounded memory, like a micro-batched trainer
            sl = slice(start, start + 16)
            logps = torch.log_softmax(model(input_ids=uids[sl], attention_mask=umask[sl]).logits.float(), -1)
            lp = logps.gather(-1, ulabels[sl].unsqueeze(-1)).squeeze(-1)
            (-(uadv[sl, None] * lp * uscored[sl]).sum() / uscored.sum()).backward()

    return step, sum(len(u.context) + len(u.completion) for u, _ in units), len(units)


def _best_seconds(model, step, repeats: int) -> float:
    """The fastest of ``repeats`` timed runs of ``step`` after one warm-up run."""
    step()
    model.zero_grad(set_to_none=True)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return best


def _bench_rl_policy(profile: Profile, policy: str, path, repeats: int) -> Iterator[dict]:
    tok = load_tokenizer(path)
    model = load_model(path)
    results, rollout_seconds = _rollouts(profile, model, tok, path)
    model.train()
    advantages = torch.randn(len(results))
    trie_step, trie_tokens = _trie_step(model, tok, results, advantages)
    units_step, unit_tokens, sequences = _units_step(model, tok, results, advantages)
    t_trie, t_units = _best_seconds(model, trie_step, repeats), _best_seconds(model, units_step, repeats)
    yield {"bench": "rl", "profile": profile.name, "policy": policy, "rollouts": len(results),
           "activation": round(sum(r.metrics["activated"] for r in results) / len(results), 3),
           "trie_tokens": trie_tokens, "expanded_tokens": unit_tokens,
           "trie_over_expanded": round(trie_tokens / unit_tokens, 3), "expanded_sequences": sequences,
           "trie_step_seconds": round(t_trie, 3), "expanded_step_seconds": round(t_units, 3),
           "trie_speedup": round(t_units / t_trie, 2), "rollout_seconds": round(rollout_seconds, 1)}
