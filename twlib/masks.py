"""Attention masks and tensors of packed tries (docs/design.md §5): query i sees key j iff j is an ancestor of i
or i itself, i.e. ``j <= i <= exit[j]``.

Two mask kinds from the same exit times: a dense additive ``[B,1,L,L]`` float mask for eager/sdpa
(CPU; O(L²) memory) and a flex-attention ``BlockMask`` (GPU; built in O(L), fully masked tiles skipped).
Rows store only 1D arrays; masks are built per batch.

>>> from twlib.trie import PackedTrie
>>> row = PackedTrie([5, 6, 7], [0, 1, 1], [-1, 0, 0], [2, 1, 2], [False, True, True], [-100, -100, -100], [0, 0, 0])
>>> (dense_mask([row])[0, 0] == 0).int().tolist()  # token 2 (a branch) does not see token 1
[[1, 0, 0], [1, 1, 0], [1, 0, 1]]
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn.attention.flex_attention import create_block_mask

from .trie import IGNORE, PackedTrie


def exit_times(rows: Sequence[PackedTrie], length: int | None = None, device: str = "cpu"):
    """``[B, L]`` long tensor of the rows' exit times, −1 on padding (what the masks are built from)."""
    L = length or max(len(r) for r in rows)
    exits = torch.full((len(rows), L), -1, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        exits[b, :len(r)] = torch.tensor(r.exit, dtype=torch.long, device=device)
    return exits


def dense_mask(rows: Sequence[PackedTrie], dtype=None, length: int | None = None):
    """Additive float mask ``[B, 1, L, L]``: 0 where query i may see key j (ancestor-or-self), else
    ``finfo(dtype).min``. Causality and padding are included (a padding query sees only itself).
    """
    return ancestor_mask(exit_times(rows, length), dtype)


def ancestor_mask(exits, dtype=None):
    """`dense_mask` from a ``[B, L]`` tensor of exit times (−1 marks padding, visible only to itself)."""
    dtype = dtype or torch.float32
    B, L = exits.shape
    q = torch.arange(L, device=exits.device).view(1, L, 1)
    k = torch.arange(L, device=exits.device).view(1, 1, L)
    allowed = (k <= q) & (q <= exits.unsqueeze(1))
    allowed |= (q == k)  # padding rows attend to themselves: no empty softmax
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=exits.device)
    mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    return mask


def ancestor_block_mask(exits, compile: bool | None = None):
    """flex-attention ``BlockMask`` of the ancestor rule from ``[B, L]`` exit times, on ``exits.device``.

    Same rule as `ancestor_mask` (padding, exit −1, sees only itself). Mask creation is compiled on
    CUDA, where it never materialises L×L; on CPU it runs eagerly. Example: exits ``[[1, 1]]`` (a
    two-token path) allow (0,0), (1,0), (1,1) — a causal mask.
    """
    B, L = exits.shape

    def ancestor(b, h, q, k):
        return ((k <= q) & (q <= exits[b, k])) | (q == k)

    compile = exits.device.type == "cuda" if compile is None else compile
    return create_block_mask(ancestor, B=B, H=None, Q_LEN=L, KV_LEN=L, device=exits.device, _compile=compile)


def block_mask(rows: Sequence[PackedTrie], length: int | None = None, device: str = "cpu"):
    """flex-attention ``BlockMask`` with the same rule as `dense_mask`, built from exit times (O(L))."""
    return ancestor_block_mask(exit_times(rows, length, device))


def row_tensors(rows: Sequence[PackedTrie], pad_id: int, length: int | None = None) -> dict:
    """``input_ids``, ``position_ids``, pre-shifted ``shift_labels`` and ``tree_exit`` (``[B, L]``; −1 pads).

    Everything a mask needs in O(L): query i sees key j iff ``j <= i <= tree_exit[j]`` (or i == j).
    """
    L = length or max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n] = torch.tensor(r.input_ids)
        pos[b, :n] = torch.tensor(r.position_ids)
        labels[b, :n] = torch.tensor(r.labels)
    return {"input_ids": ids, "position_ids": pos, "shift_labels": labels, "tree_exit": exit_times(rows, L)}


def collate(rows: Sequence[PackedTrie], pad_id: int, length: int | None = None, dtype=None) -> dict:
    """Tensors for ``model(**batch)``: ids, tree position ids, dense 4D mask, pre-shifted labels."""
    batch = row_tensors(rows, pad_id, length)
    batch["attention_mask"] = ancestor_mask(batch.pop("tree_exit"), dtype)
    return batch
