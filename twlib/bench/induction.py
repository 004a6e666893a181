"""``python -m twlib.bench induction``: how many steps the profile's notebook-02 model needs, at the profile's
learning rate and at 3× and 10× it, to copy a random 20-letter string (a task only an induction circuit
solves: find the earlier copy of the current letter and read the one after it). Every lookup in the
synthetic tasks runs on that circuit; too high a learning rate delays it by hundreds of steps."""
from __future__ import annotations

import random
import string
import time
from typing import Iterator

import torch
import torch.nn.functional as F

from ..config import Profile
from ..models import build_tiny_model, model_spec
from ..tokenizer import build_char_tokenizer


def _copy_batch(tokenizer, rng, size: int = 32, length: int = 20):
    ids, labels = [], []
    for _ in range(size):
        letters = "".join(rng.sample(string.ascii_lowercase, length))
        first = tokenizer.encode(letters + "|", add_special_tokens=False)
        second = tokenizer.encode(letters, add_special_tokens=False)
        ids.append(first + second)
        labels.append([-100] * len(first) + second)
    return torch.tensor(ids), torch.tensor(labels)


def run(profile: Profile, steps: int = 600, factors: tuple[float, ...] = (1.0, 3.0, 10.0),
                    solved_error: float = 0.01, every: int = 25) -> Iterator[dict]:
    """Steps until the copy error of the second half drops below ``solved_error``, per learning rate."""

    cfg = profile.stage_config("02_trie_sft")
    tok = build_char_tokenizer()
    for factor in factors:
        lr = cfg.learning_rate * factor
        model = build_tiny_model(tok, model_spec(cfg), seed=cfg.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        rng, solved_at, error, t0 = random.Random(cfg.seed), None, 1.0, time.perf_counter()
        for step in range(1, steps + 1):
            ids, labels = _copy_batch(tok, rng)
            logits = model(input_ids=ids).logits[:, :-1]
            target = labels[:, 1:]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % every == 0:
                scored = target != -100
                error = float(((logits.argmax(-1) != target) & scored).sum() / scored.sum())
                if error < solved_error:
                    solved_at = step
                    break
        yield {"bench": "induction", "profile": profile.name, "learning_rate": lr, "lr_factor": factor,
               "solved_at_step": solved_at, "max_steps": steps, "copy_error": round(error, 3),
               "seconds": round(time.perf_counter() - t0, 1)}
