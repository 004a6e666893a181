"""Trie packing: one packed forward gives every unit's log-probs (docs/design.md §5 acceptance test)."""
import random

import pytest
import torch

from twlib import masks, models, trie
from twlib import tokenizer as tokenizers
from twlib.tasks import ExpressionParams, ProductParams, make_problem

TOK = tokenizers.build_char_tokenizer()


def _model(attn: str):
    spec = models.TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                                intermediate_size=128, initializer_range=0.2)
    model = models.build_tiny_model(TOK, spec, seed=0)
    model.config._attn_implementation = attn
    return model.eval()


def _problems(seed: int):
    rng = random.Random(seed)
    # several blocks with 2-4 threads (products of 6-8 factors), uneven thread lengths, and a chain
    return ([make_problem("products", rng, ProductParams(factors_min=6, factors_max=8)) for _ in range(2)]
            + [make_problem("expressions", rng, ExpressionParams(groups_min=2, groups_max=6, repeats_min=1,
                                                                 repeats_max=4, balanced_fraction=0.8))
               for _ in range(3)])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logprobs_equal_per_unit_logprobs(attn):
    model = _model(attn)
    row, starts, all_units = trie.PackedTrie(), [], []
    for p in _problems(0):
        prompt = tokenizers.prompt_ids(TOK, p.question)
        units = trie.units(prompt, p.plan.parallel_trajectory(), TOK)
        starts.append(len(row))
        row.extend(trie.build_trie(prompt, units))
        all_units.append(units)
    batch = masks.collate([row], TOK.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=batch["attention_mask"])
    packed = torch.log_softmax(out.logits[0], -1)
    covered, worst = [], 0.0
    for start, units in zip(starts, all_units):
        for u in units:
            seq = list(u.context) + list(u.completion)
            with torch.no_grad():
                ref = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0], -1)
            path = trie.trie_path(row, seq, start)
            for k in range(len(u.context), len(seq)):
                i = path[k]
                assert row.trained[i] and batch["shift_labels"][0, row.parent[i]] == seq[k]
                worst = max(worst, abs(packed[row.parent[i], seq[k]] - ref[k - 1, seq[k]]).item())
                covered.append(i)
    assert worst <= 1e-4
    # every trained token belongs to exactly one unit completion, and every completion token is trained
    assert sorted(covered) == [i for i, t in enumerate(row.trained) if t]
