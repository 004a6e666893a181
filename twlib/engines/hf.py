"""`HFEngine`: a transformers causal LM as an orchestrator engine (CPU or CUDA).

Requests of one batch whose prompts all have the same length are decoded together; their longest common
prefix — the block head, for the threads of one block — is run through the model once and its KV cache
is repeated for every row, so K threads cost one prefill of the shared context plus K short headers.
Requests of several lengths (problems in flight side by side) are padded on the left into one batch,
each row at the positions it would have alone. Rows leave the batch as soon as they stop, so a long
thread does not make short ones pay.

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

from . import Completion, Request, Sampling, finish_reason


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
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            if not r.prompt:
                raise ValueError(f"request {i} has an empty prompt")
            by_length[len(r.prompt)].append(i)
        # One prompt length (the threads of one block): share their prefix. Several (many problems in flight):
        # one left-padded batch, which on a small model costs about what a single row does.
        padded = len(by_length) > 1
        order = list(range(len(requests))) if padded else next(iter(by_length.values()))
        out: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.max_batch):
            chunk = order[start:start + self.max_batch]
            batch = [requests[i] for i in chunk]
            for i, c in zip(chunk, self._decode_padded(batch) if padded else self._decode(batch)):
                out[i] = c
        return out

    def _decode(self, requests: list[Request]) -> list[Completion]:
        """Prompts of one length: their common prefix runs once and its KV cache is repeated for every row."""
        device = next(self.model.parameters()).device
        prompts = [r.prompt for r in requests]
        # Keep at least one token per row out of the shared part: it yields the first logits.
        shared = min(common_prefix_length(prompts), len(prompts[0]) - 1)
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
            first = self.model(input_ids=torch.tensor([prompts[i][shared:] for i in active], device=device),
                               past_key_values=cache, use_cache=True)
            return self._continue(requests, active, first, lambda ids, cache, keep: self.model(
                input_ids=ids, past_key_values=cache, use_cache=True))

    def _decode_padded(self, requests: list[Request]) -> list[Completion]:
        """Prompts of several lengths, padded on the left; each row keeps the positions it would have alone."""
        device = next(self.model.parameters()).device
        active = [i for i, r in enumerate(requests) if r.max_new_tokens >= 1]
        if not active:
            return [Completion((), "length") for _ in requests]
        width = max(len(requests[i].prompt) for i in active)
        ids = torch.tensor([(0,) * (width - len(requests[i].prompt)) + requests[i].prompt for i in active],
                           device=device)
        mask = torch.tensor([[0] * (width - len(requests[i].prompt)) + [1] * len(requests[i].prompt)
                             for i in active], device=device)
        state = {"mask": mask, "next": mask.sum(-1, keepdim=True)}

        def step(token_ids, cache, keep):
            if keep is not None:
                state["mask"], state["next"] = state["mask"][keep], state["next"][keep]
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((len(token_ids), 1))], dim=-1)
            out = self.model(input_ids=token_ids, attention_mask=state["mask"], position_ids=state["next"],
                             past_key_values=cache, use_cache=True)
            state["next"] = state["next"] + 1
            return out

        with torch.no_grad():
            first = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                               use_cache=True)
            return self._continue(requests, active, first, step)

    def _continue(self, requests: list[Request], active: list[int], step, forward) -> list[Completion]:
        """Pick a token for every row of ``active`` from ``step``'s last logits and run ``forward(ids, cache,
        keep)`` on them until every row has stopped; a row leaves the batch (``keep``: the rows that stay) as
        soon as it stops."""
        device = step.logits.device
        generators = [self._generator(r, device) for r in requests]
        generated: list[list[int]] = [[] for _ in requests]
        while True:
            cache, logits = step.past_key_values, step.logits[:, -1].float()
            tokens = self._pick_batch(logits, [requests[i] for i in active], [generators[i] for i in active])
            keep = []
            for row, i in enumerate(active):
                token = tokens[row]
                generated[i].append(token)
                r = requests[i]
                if not (token == self.eos_token_id or token in r.stop_ids or len(generated[i]) >= r.max_new_tokens):
                    keep.append(row)
            if not keep:
                break
            rows = None
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=device)
                cache.batch_select_indices(rows)
                active = [active[row] for row in keep]
            step = forward(torch.tensor([[generated[i][-1]] for i in active], device=device), cache, rows)
        return [Completion(tuple(g), finish_reason(g, r.stop_ids, self.eos_token_id))
                for g, r in zip(generated, requests)]

    @classmethod
    def _pick_batch(cls, logits, requests: list[Request], generators: list) -> list[int]:
        """A token for every row. Rows that share one sampling setting and no per-request seed (the usual
        batch: every row greedy, or every rollout sampled at one temperature) are picked in one call, from
        the distribution `_pick` uses row by row; rows with a seed keep their own generator."""
        first = requests[0].sampling
        if any(g is not None for g in generators) or any(r.sampling != first for r in requests):
            return [cls._pick(logits[row], r, g) for row, (r, g) in enumerate(zip(requests, generators))]
        if first.greedy:
            return logits.argmax(-1).tolist()
        return torch.multinomial(sampling_probs(logits, first), 1).squeeze(-1).tolist()

    @staticmethod
    def _generator(r: Request, device):
        if r.sampling.greedy or r.sampling.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(r.sampling.seed)

    @staticmethod
    def _pick(logits, r: Request, generator) -> int:
        if r.sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(sampling_probs(logits, r.sampling), 1, generator=generator))


def sampling_probs(logits, sampling: Sampling):
    """The distribution a sampled token is drawn from, per row of ``logits`` (``[..., vocab]``): softmax at
    ``temperature``, cut to the smallest set of top tokens whose mass reaches ``top_p`` (always at least the
    top one) and renormalised.

    >>> sampling_probs(torch.tensor([[2.0, 1.0, 0.0]]).log(), Sampling(temperature=1.0, top_p=0.6)).tolist()
    [[1.0, 0.0, 0.0]]
    """
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
