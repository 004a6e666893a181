"""``python -m twlib.bench trie``: tokens per trajectory for the trie, expanded units and the official flattening,
and SFT throughput trie vs expanded units, side by side in one run (needs notebook 01's data)."""
from __future__ import annotations

from typing import Iterator

import torch

from .. import format as fmt
from .. import models, trie
from ..config import Profile
from ..dataset import load_parquet
from ..masks import collate
from ..sft import dataset_examples
from ..tokenizer import build_char_tokenizer, prompt_ids
from .common import outputs, time_training


def run(profile: Profile, n_trajectories: int = 48, row_tokens: int = 2048) -> Iterator[dict]:
    """Tokens per trajectory: trie vs expanded units vs the official flattening; SFT throughput."""

    cfg = profile.stage_config("01_trajectories")
    folder = outputs(profile) / "01_trajectories" / "data"
    ds = load_parquet(folder)["train"]
    # The target distribution only: the extra short training problems are a learning aid.
    ds = ds.select([i for i, shape in enumerate(ds["shape"]) if not shape.startswith("short-")])
    parallel = [r for r in dataset_examples(ds, parallel=True) if "<Parallel>" in r["text"]][:n_trajectories]
    tok = build_char_tokenizer()
    tries, expanded = [], []
    official = 0
    for ex in parallel:
        prompt = prompt_ids(tok, ex["question"])
        units = trie.units(prompt, fmt.parse(ex["text"]), tok)
        tries.append(trie.build_trie(prompt, units))
        official += len(trie.build_trie(prompt, units, "official"))
        expanded.extend(units)
    n = len(parallel)
    trie_tokens = sum(len(t) for t in tries)
    expanded_tokens = sum(len(u.context) + len(u.completion) for u in expanded)
    yield {"bench": "trie", "profile": profile.name, "trajectories": n,
           "trie_tokens_per_trajectory": round(trie_tokens / n, 1),
           "expanded_tokens_per_trajectory": round(expanded_tokens / n, 1),
           "official_tokens_per_trajectory": round(official / n, 1),
           "trie_over_expanded": round(trie_tokens / expanded_tokens, 3)}

    torch.manual_seed(cfg.seed)
    model = models.build_tiny_model(tok, models.TinyModelSpec())
    rows = trie.pack_rows(tries, row_tokens)
    trie_batches = [collate([r], tok.pad_token_id) for r in rows]
    for b in trie_batches:
        b["labels"] = b["shift_labels"]
    unit_batches = []
    for i in range(0, len(expanded), 8):
        chunk = expanded[i:i + 8]
        L = max(len(u.context) + len(u.completion) for u in chunk)
        ids = torch.full((len(chunk), L), tok.pad_token_id)
        labels = torch.full((len(chunk), L), -100)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for j, u in enumerate(chunk):
            seq = list(u.context) + list(u.completion)
            ids[j, :len(seq)] = torch.tensor(seq)
            labels[j, len(u.context):len(seq)] = torch.tensor(u.completion)
            mask[j, :len(seq)] = 1
        unit_batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    t_trie = time_training(model, trie_batches)
    t_units = time_training(model, unit_batches)
    yield {"bench": "trie_sft_throughput", "profile": profile.name, "trajectories": n,
           "trie_trajectories_per_s": round(n / t_trie, 2), "expanded_trajectories_per_s": round(n / t_units, 2),
           "trie_speedup": round(t_units / t_trie, 2), "trie_rows": len(rows), "expanded_sequences": len(expanded)}
