"""`HFEngine`: a transformers causal LM as an orchestrator engine (CPU or CUDA).

Requests of one batch whose prompts have the same length are decoded together; their longest common
prefix — the block head, for the threads of one block — is run through the model once and its KV cache
is repeated for every row, so K threads cost one prefill of the shared context plus K short headers.
Rows leave the batch as soon as they stop, so a long thread does not make short ones pay.

>>> from twlib.tokenizer import build_char_tokenizer
>>> from twlib.models import build_tiny_model, TinyModelSpec
>>> tok = build_char_tokenizer()
>>> engine = HFEngine(build_tiny_model(tok, TinyModelSpec(num_layers=1)), tok.eos_token_id)
>>> [len(c.ids) for c in engine.generate([Request((1, 5, 6), max_new_tokens=3)])]
[3]
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from . import Completion, Request, finish_reason


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix every prompt shares: ``common_prefix_length([(1, 2, 3), (1, 2, 4)])`` → 2."""
    first, n = prompts[0], min(len(p) for p in prompts)
    for i in range(n):
        if any(p[i] != first[i] for p in prompts):
            return i
    return n


class HFEngine:
    """Greedy or sampled decoding with a transformers model; ``eos_token_id`` always stops a row."""

    def __init__(self, model, eos_token_id: int, max_batch: int = 64):
        self.model = model.eval()
        self.eos_token_id = eos_token_id
        self.max_batch = max_batch

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        out: list[Completion | None] = [None] * len(requests)
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            if not r.prompt:
                raise ValueError(f"request {i} has an empty prompt")
            by_length[len(r.prompt)].append(i)
        for indices in by_length.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start:start + self.max_batch]
                for i, c in zip(chunk, self._decode([requests[i] for i in chunk])):
                    out[i] = c
        return out

    def _decode(self, requests: list[Request]) -> list[Completion]:
        device = next(self.model.parameters()).device
        prompts = [r.prompt for r in requests]
        # Keep at least one token per row out of the shared part: it yields the first logits.
        shared = min(common_prefix_length(prompts), len(prompts[0]) - 1)
        generators = [self._generator(r, device) for r in requests]
        generated: list[list[int]] = [[] for _ in requests]
        active = [i for i, r in enumerate(requests) if r.max_new_tokens >= 1]  # request of each batch row
        if not active:
            return [Completion((), "length") for _ in requests]
        with torch.no_grad():
            cache = None
            if shared:
                prefix = torch.tensor([prompts[0][:shared]], device=device)
                cache = self.model(input_ids=prefix, use_cache=True).past_key_values
                if len(active) > 1:
                    cache.batch_repeat_interleave(len(active))
            step = self.model(input_ids=torch.tensor([prompts[i][shared:] for i in active], device=device),
                              past_key_values=cache, use_cache=True)
            while True:
                cache, logits = step.past_key_values, step.logits[:, -1].float()
                keep = []
                for row, i in enumerate(active):
                    token = self._pick(logits[row], requests[i], generators[i])
                    generated[i].append(token)
                    r = requests[i]
                    if not (token == self.eos_token_id or token in r.stop_ids or len(generated[i]) >= r.max_new_tokens):
                        keep.append(row)
                if not keep:
                    break
                if len(keep) < len(active):
                    cache.batch_select_indices(torch.tensor(keep, device=device))
                    active = [active[row] for row in keep]
                step = self.model(input_ids=torch.tensor([[generated[i][-1]] for i in active], device=device),
                                  past_key_values=cache, use_cache=True)
        return [Completion(tuple(g), finish_reason(g, r.stop_ids, self.eos_token_id))
                for g, r in zip(generated, requests)]

    @staticmethod
    def _generator(r: Request, device):
        if r.sampling.greedy or r.sampling.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(r.sampling.seed)

    @staticmethod
    def _pick(logits, r: Request, generator) -> int:
        if r.sampling.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits / r.sampling.temperature, dim=-1)
        if r.sampling.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p (always at least the top token).
            outside = sorted_probs.cumsum(-1) - sorted_probs >= r.sampling.top_p
            probs = probs.clone()
            probs[order[outside]] = 0
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=generator))
