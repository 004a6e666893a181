"""Trie packing of fork-join trajectories (paper §3.2, with the objective corrected; docs/design.md §5).

A trajectory is the set of ``<context, completion>`` units the orchestrator issues. Their token
sequences are inserted into a trie rooted at the prompt: the main path is the whole joined
sequence; thread j ≥ 2 of each block also gets a *branch copy* that hangs off the block head's
``\\n<Thread>\\n`` and holds exactly what inference conditions it on. The trie is flattened depth
first: position id = depth, attention = ancestors only, each token predicted from its trie parent.

Loss (corrected objective): every model-generated token is trained once, in the context it was
generated in — sequential text and block heads on the main path; thread 1 on the main path;
threads 2..K on their branch copies only; orchestrator-inserted headers and the join get none.
``objective="official"`` reproduces the official code for ablations: every response token of the
flattened sequence is trained (main-path copies of threads 2..K included) and labels are the next
token in *flat* order.

Tiny example (characters as tokens): prompt ``P``, head ``H``, threads ``a`` and ``b``::

    main path:  P H \\n <Thread> \\n 1 : a </Thread> <Thread> \\n 2 : b </Thread> \\n ...
    branch:                      └─ 2 : b </Thread>          (parent = the \\n after <Thread>)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from . import format as fmt
from .tokenizer import segment_ids

Objective = Literal["corrected", "official"]
IGNORE = -100


@dataclass(frozen=True)
class Unit:
    """One engine call: ``context`` ids (prompt + earlier pieces + any header) → ``completion`` ids."""
    context: tuple[int, ...]
    completion: tuple[int, ...]
    kind: Literal["sequential", "thread"]
    block: int | None = None
    thread: int | None = None


def units(prompt: Sequence[int], traj: fmt.Trajectory, tokenizer) -> list[Unit]:
    """The orchestrator's calls for a canonical trajectory, in token ids (segment-wise, + EOS).

    Sequential calls see everything before them; thread N of a block sees the context up to the
    block head plus ``\\n<Thread>\\nN:`` (the header every thread request carries at inference).
    """
    seg = segment_ids(traj, tokenizer)
    out: list[Unit] = []
    ids = list(prompt)
    head_end = 0  # length of `ids` at the end of the current block head
    for s, (a, b) in zip(seg.segments, seg.spans):
        piece = seg.ids[a:b]
        if s.kind == "sequential":
            out.append(Unit(tuple(ids), tuple(piece), "sequential"))
            head_end = len(ids) + len(piece)
        elif s.kind == "thread":
            header = tokenizer.encode(fmt.thread_header(s.thread, first=True), add_special_tokens=False)
            out.append(Unit(tuple(ids[:head_end]) + tuple(header), tuple(piece), "thread", s.block, s.thread))
        ids.extend(piece)
    return out


@dataclass
class PackedTrie:
    """A flattened trie (or several, packed in one row). Arrays are indexed by flat position.

    ``parent[i]`` is the flat index of i's trie parent (-1 for a root); ``exit[i]`` is the last flat
    index of i's subtree (entry time = i itself), so j is an ancestor-or-self of i iff
    ``j <= i <= exit[j]``. ``labels[i]`` is the token predicted from position i (pre-shifted;
    ``IGNORE`` where nothing is trained). ``trained[i]`` says token i carries loss.
    """
    input_ids: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    exit: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sequence: list[int] = field(default_factory=list)  # which packed trajectory each position belongs to

    def __len__(self) -> int:
        return len(self.input_ids)

    def extend(self, other: "PackedTrie") -> None:
        """Append another packed trie (block-diagonal: nothing attends across)."""
        off, seq_off = len(self), (max(self.sequence) + 1 if self.sequence else 0)
        self.input_ids += other.input_ids
        self.position_ids += other.position_ids
        self.parent += [p + off if p >= 0 else -1 for p in other.parent]
        self.exit += [e + off for e in other.exit]
        self.trained += other.trained
        self.labels += other.labels
        self.sequence += [s + seq_off for s in other.sequence]


class _Node:
    __slots__ = ("token", "children", "trained")

    def __init__(self, token: int):
        self.token, self.children, self.trained = token, {}, False


def build_trie(prompt: Sequence[int], unit_list: Sequence[Unit], objective: Objective = "corrected",
               main: Sequence[int] | None = None) -> PackedTrie:
    """Insert the main path and each thread unit, flatten depth first, set positions/labels/loss.

    The main path is ``main`` (prompt + joined response, as the orchestrator returns it) or, by
    default, the last sequential unit's context + completion (the whole canonical trajectory). A
    first thread whose completion is not on the main path (a rollout where the orchestrator replaced
    the thread's EOS by ``</Thread>``) is trained on its own branch copy, like threads 2..K.
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one token (it roots the trie)")
    for u in unit_list:
        if tuple(u.context[:len(prompt)]) != tuple(prompt):
            raise ValueError(f"unit {u.kind} {u.block}/{u.thread} does not start with the prompt")
    if main is None:
        seq_units = [u for u in unit_list if u.kind == "sequential"]
        if not seq_units:
            raise ValueError("a trajectory needs at least one sequential unit")
        main = list(seq_units[-1].context) + list(seq_units[-1].completion)
    main = list(main)
    if main[:len(prompt)] != list(prompt):
        raise ValueError("the main path does not start with the prompt")
    root = _Node(prompt[0])
    main_nodes = _insert(root, main)
    if objective == "corrected":
        for u in unit_list:
            start = len(u.context)
            if u.kind == "sequential" or (u.thread == 1 and _on_main(main, u)):
                nodes = main_nodes
                _locate(main, u)
            else:
                nodes = _insert(root, list(u.context) + list(u.completion))
            for node in nodes[start:start + len(u.completion)]:
                node.trained = True
    else:
        for u in unit_list:
            if u.kind == "thread" and u.thread != 1:
                _insert(root, list(u.context) + list(u.completion))
    packed = _flatten(root)
    if objective == "corrected":
        for i, p in enumerate(packed.parent):
            if packed.trained[i]:
                if packed.labels[p] not in (IGNORE, packed.input_ids[i]):
                    raise ValueError(f"two trained children of position {p} need different labels")
                packed.labels[p] = packed.input_ids[i]
    else:
        # Official: loss on every response token of the flat sequence, label = next flat token.
        n_prompt = len(prompt)
        for i in range(len(packed) - 1):
            if i + 1 >= n_prompt:
                packed.trained[i + 1] = True
                packed.labels[i] = packed.input_ids[i + 1]
    return packed


def _insert(root: _Node, tokens: Sequence[int]) -> list[_Node]:
    if tokens[0] != root.token:
        raise ValueError("every unit must start with the prompt")
    path, node = [root], root
    for t in tokens[1:]:
        child = node.children.get(t)
        if child is None:  # build a node only where the path leaves the trie
            child = node.children[t] = _Node(t)
        node = child
        path.append(node)
    return path


def _on_main(main: list[int], u: Unit) -> bool:
    n = len(u.context)
    return main[:n] == list(u.context) and main[n:n + len(u.completion)] == list(u.completion)


def _locate(main: list[int], u: Unit) -> int:
    """Start of ``u``'s completion on the main path (its context is a prefix of the main path)."""
    if not _on_main(main, u):
        raise ValueError(f"unit {u.kind} {u.block}/{u.thread} is not on the main path")
    return len(u.context)


def _flatten(root: _Node) -> PackedTrie:
    """Depth-first (pre-order, children in insertion order) flattening of the trie.

    Runs of single-child nodes, most of any trajectory, are walked without the stack. Exit times
    come from subtree sizes: a node's subtree is the contiguous span after it in pre-order.
    """
    ids: list[int] = []
    positions: list[int] = []
    parents: list[int] = []
    trained: list[bool] = []
    stack: list[tuple[_Node, int, int]] = [(root, -1, 0)]
    while stack:
        node, parent, depth = stack.pop()
        while True:
            index = len(ids)
            ids.append(node.token)
            positions.append(depth)
            parents.append(parent)
            trained.append(node.trained)
            if len(node.children) != 1:
                break
            (node,) = node.children.values()
            parent, depth = index, depth + 1
        for child in reversed(list(node.children.values())):  # insertion order: main path first
            stack.append((child, index, depth + 1))
    n = len(ids)
    size = [1] * n
    for i in range(n - 1, 0, -1):
        size[parents[i]] += size[i]
    return PackedTrie(ids, positions, parents, [i + size[i] - 1 for i in range(n)], trained,
                      [IGNORE] * n, [0] * n)


def pack_trajectory(prompt: Sequence[int], traj: fmt.Trajectory, tokenizer,
                    objective: Objective = "corrected") -> PackedTrie:
    """Prompt + canonical trajectory → flattened trie (see `build_trie`)."""
    return build_trie(prompt, units(prompt, traj, tokenizer), objective)


def pack_rows(tries: Sequence[PackedTrie], max_tokens: int) -> list[PackedTrie]:
    """Greedy first-fit packing of tries, longest first, into rows of at most ``max_tokens`` positions.

    Example: lengths [3, 5, 2, 4] with ``max_tokens=7`` → rows [5, 2] and [4, 3].
    """
    import numpy as np

    rows: list[PackedTrie] = []
    room = np.zeros(len(tries), dtype=np.int64)  # free positions per row; first fit is one vector scan
    for t in sorted(tries, key=len, reverse=True):
        n = len(t)
        if n > max_tokens:
            raise ValueError(f"a trajectory of {n} trie tokens exceeds the row budget {max_tokens}")
        k = int(np.argmax(room[:len(rows)] >= n)) if rows else 0
        if not rows or room[k] < n:
            k = len(rows)
            rows.append(PackedTrie())
            room[k] = max_tokens
        rows[k].extend(t)
        room[k] -= n
    return rows


def trie_path(packed: PackedTrie, tokens: Sequence[int], root: int = 0) -> list[int]:
    """Flat indices of ``tokens`` walked from the trajectory root at ``root`` (for checks and RL)."""
    children: dict[tuple[int, int], int] = {}
    for i, p in enumerate(packed.parent):
        children.setdefault((p, packed.input_ids[i]), i)
    if packed.input_ids[root] != tokens[0]:
        raise ValueError("tokens do not start at this root")
    path = [root]
    for t in tokens[1:]:
        path.append(children[(path[-1], t)])
    return path


def table(packed: PackedTrie, tokenizer, start: int = 0, stop: int | None = None):
    """The flattened trie as a pandas table: token, position id, parent, exit, trained, label."""
    import pandas as pd

    stop = len(packed) if stop is None else stop
    rows = []
    for i in range(start, stop):
        label = packed.labels[i]
        rows.append({"flat": i, "token": tokenizer.convert_ids_to_tokens(packed.input_ids[i]),
                     "position": packed.position_ids[i], "parent": packed.parent[i], "exit": packed.exit[i],
                     "trained": packed.trained[i],
                     "predicts": "" if label == IGNORE else tokenizer.convert_ids_to_tokens(label)})
    return pd.DataFrame(rows).set_index("flat")
