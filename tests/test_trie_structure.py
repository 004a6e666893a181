"""Trie structure on hand-built trajectories (docs/design.md §5): exact flattened arrays for both objectives,
DFS order of branch copies, dense and flex masks, row packing, and the unit list.

The character tokenizer makes every character one token and every tag one token, so expected
sequences are written out as token strings (split by `_t`, independently of the tokenizer).
"""
import random
import re

import pytest
import torch

from twlib import format as fmt
from twlib import masks, models, trie
from twlib import tokenizer as tokenizers

TOK = tokenizers.build_char_tokenizer()
IGN = trie.IGNORE
EOS = "<|im_end|>"
_TOKEN = re.compile(r"<\|im_end\|>|</?[A-Za-z]+>|\\boxed\{|.", re.DOTALL)


def _t(text: str) -> list[str]:
    """Token strings of ``text`` under the character tokenizer (tags and ``\\boxed{`` atomic)."""
    return _TOKEN.findall(text)


def _ids(tokens: list[str]) -> list[int]:
    return TOK.convert_tokens_to_ids(tokens)


def _strs(ids) -> list[str]:
    return TOK.convert_ids_to_tokens(list(ids))


def _one_block():
    return fmt.Trajectory((fmt.Text("<think>\n"), fmt.Block.from_plan(["a", "b"], ["x", "yy"]),
                           fmt.Text("\nz\n</think>\n\n\\boxed{1}")))


def _two_blocks():
    return fmt.Trajectory((fmt.Text("<think>\n"), fmt.Block.from_plan(["a", "b", "c"], ["x", "yy", "w"]),
                           fmt.Text("\n"), fmt.Block.from_plan(["d", "e"], ["u", "vvv"]),
                           fmt.Text("\n</think>\n\n\\boxed{2}")))


PROMPT = _ids(["Q"])
HEAD = _t("<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>")
HDR1, BODY1 = _t("\n<Thread>\n1:"), _t(" x\n</Thread>")
HDR2, BODY2 = _t("<Thread>\n2:"), _t(" yy\n</Thread>")
TAIL = _t("</Parallel>\nz\n</think>\n\n\\boxed{1}") + [EOS]
MAIN = ["Q"] + HEAD + HDR1 + BODY1 + HDR2 + BODY2 + ["\n"] + TAIL
BRANCH = _t("2:") + BODY2


def _ancestors(parent: list[int], i: int) -> set[int]:
    out = {i}
    while parent[i] >= 0:
        i = parent[i]
        out.add(i)
    return out


# ------------------------------------------------------------------------ 1. corrected, exact arrays
def test_hand_built_trie_corrected_exact():
    assert _t("\\boxed{1}" + EOS) == ["\\boxed{", "1", "}", EOS]
    assert _strs(TOK.encode("".join(MAIN), add_special_tokens=False)) == MAIN  # the splitter agrees
    p = trie.pack_trajectory(PROMPT, _one_block(), TOK, "corrected")
    assert len(MAIN) == 52 and len(BRANCH) == 7 and len(p) == 59
    assert _strs(p.input_ids) == MAIN + BRANCH
    # landmarks: first <Thread> at 23, the newline after it (the fork node) at 24, EOS at 51
    assert MAIN[23] == "<Thread>" and MAIN[24] == "\n" and MAIN[25] == "1" and MAIN[51] == EOS
    assert p.position_ids == list(range(52)) + list(range(25, 32))
    assert p.parent == [-1] + list(range(51)) + [24] + list(range(52, 58))
    assert p.exit == [58] * 25 + [51] * 27 + [58] * 7
    assert p.sequence == [0] * 59

    trained = ([False] + [True] * 21      # prompt; <think> .. </Outlines> (block head)
               + [False] * 5               # \n <Thread> \n 1 :
               + [True] * 4                # thread 1 body on the main path
               + [False] * 4 + [False] * 5  # main-path copy of thread 2: header and body
               + [False]                   # join \n
               + [True] * 11               # </Parallel> .. EOS
               + [False] * 2               # branch header "2" ":"
               + [True] * 5)               # thread 2 body on its branch copy
    assert p.trained == trained
    assert sum(p.trained) == len(HEAD) + len(BODY1) + len(BODY2) + len(TAIL) == 41

    labels = [IGN] * 59
    for i in list(range(0, 21)) + [26, 27, 28, 29] + list(range(40, 51)) + [53, 54, 55, 56, 57]:
        labels[i] = p.input_ids[i + 1]
    assert p.labels == labels
    # label at a position = token of its trained trie child (the branch's " " is predicted from ":")
    assert _strs([p.labels[26], p.labels[53], p.labels[40]]) == [" ", " ", "</Parallel>"]
    assert p.labels[51] == IGN and p.labels[24] == IGN  # EOS predicts nothing; the fork's children are headers


# ------------------------------------------------------------------------- 2. official objective
def test_hand_built_trie_official_defects():
    p = trie.pack_trajectory(PROMPT, _one_block(), TOK, "official")
    c = trie.pack_trajectory(PROMPT, _one_block(), TOK, "corrected")
    # same trie, different loss
    assert (p.input_ids, p.position_ids, p.parent, p.exit) == (c.input_ids, c.position_ids, c.parent, c.exit)
    assert p.labels == p.input_ids[1:] + [IGN]           # flat order from the last prompt token on
    assert p.trained == [False] + [True] * 58            # every response position, headers included
    assert p.trained[22:27] == [True] * 5 and p.trained[40] and p.trained[52]
    # (a) thread 2's body " yy\n</Thread>" is trained twice: main path (35..39) and branch (54..58)
    assert _strs(p.input_ids[35:40]) == BODY2 == _strs(p.input_ids[54:59])
    assert all(p.trained[35:40]) and all(p.trained[54:59])
    assert not any(c.trained[35:40]) and all(c.trained[54:59])
    # (b) the branch's first token "2" (index 52, trie parent 24) is labelled from the EOS position
    assert p.parent[52] == 24 and _strs([p.input_ids[51]]) == [EOS]
    assert _strs([p.labels[51]]) == ["2"]
    assert _strs([p.labels[24]]) == ["1"]  # its real parent predicts the main path's "1" instead


# ------------------------------------------------------------------- 3. DFS order of branch copies
def test_branch_copies_deeper_block_first():
    p = trie.pack_trajectory(PROMPT, _two_blocks(), TOK)
    toks = _strs(p.input_ids)
    n_main = toks.index(EOS) + 1
    assert p.position_ids[:n_main] == list(range(n_main))
    assert p.parent[:n_main] == [-1] + list(range(n_main - 1))
    opens = [i for i in range(n_main) if toks[i] == "<Thread>"]
    assert len(opens) == 5  # 3 threads, then 2
    fork0, fork1 = opens[0] + 1, opens[3] + 1  # the "\n" after each block's first <Thread>
    assert toks[fork0] == toks[fork1] == "\n" and toks[fork0 + 1] == toks[fork1 + 1] == "1"
    copies = [(fork1, _t("2: vvv\n</Thread>")), (fork0, _t("2: yy\n</Thread>")), (fork0, _t("3: w\n</Thread>"))]
    assert toks[n_main:] == sum((c for _, c in copies), [])
    start = n_main
    for fork, c in copies:
        assert p.parent[start] == fork
        assert p.position_ids[start:start + len(c)] == list(range(p.position_ids[fork] + 1,
                                                                   p.position_ids[fork] + 1 + len(c)))
        assert p.parent[start + 1:start + len(c)] == list(range(start, start + len(c) - 1))
        assert p.exit[start] == start + len(c) - 1
        start += len(c)
    # the fork nodes' subtrees reach their last copy; depth = parent's depth + 1 everywhere
    assert p.exit[fork1] == n_main + len(copies[0][1]) - 1 == n_main + 7 and p.exit[fork0] == len(p) - 1
    assert all(p.position_ids[i] == p.position_ids[q] + 1 for i, q in enumerate(p.parent) if q >= 0)


# ------------------------------------------------------------------------------------ 4. dense mask
def _two_tries_row():
    a = trie.pack_trajectory(PROMPT, _one_block(), TOK)
    b = trie.pack_trajectory(PROMPT, _two_blocks(), TOK)
    row = trie.PackedTrie()
    row.extend(a)
    row.extend(b)
    return row, a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_mask_is_ancestor_or_self(dtype):
    row, a, b = _two_tries_row()
    n, L = len(row), len(row) + 7
    assert row.sequence == [0] * len(a) + [1] * len(b) and row.parent.count(-1) == 2
    mask = masks.dense_mask([row], dtype, L)
    assert mask.shape == (1, 1, L, L) and mask.dtype == dtype
    lo = torch.finfo(dtype).min
    assert set(mask.unique().tolist()) == {0.0, lo}
    expected = torch.zeros(L, L, dtype=torch.bool)
    for i in range(n):
        for j in _ancestors(row.parent, i):
            expected[i, j] = True
    for i in range(n, L):
        expected[i, i] = True  # padding queries see only themselves
    allowed = mask[0, 0] == 0
    assert torch.equal(allowed, expected)
    assert not allowed[len(a):, :len(a)].any() and not allowed[:len(a), len(a):].any()
    assert not allowed[:n, n:].any()  # no real query sees padding
    assert torch.equal(mask[0, 0][~expected], torch.full((int((~expected).sum()),), lo, dtype=dtype))
    # sanity of the oracle: a branch-copy token of trie a does not see thread 1 or the main-path copy
    assert expected[52, 24] and not expected[52, 27] and not expected[52, 35] and not expected[52, 51]


@pytest.fixture(scope="module")
def tiny_model():
    spec = models.TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=128, initializer_range=0.2)
    return models.build_tiny_model(TOK, spec, seed=0).eval()


def _forward(model, batch, mask=None):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=batch["attention_mask"] if mask is None else mask).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dense_mask_padded_batch_matches_unpadded(tiny_model, attn):
    tiny_model.config._attn_implementation = attn
    long_row, a, b = _two_tries_row()
    short_row = trie.pack_trajectory(PROMPT, _two_blocks(), TOK)
    assert len(short_row) < len(long_row)
    L = len(long_row) + 5
    logits = _forward(tiny_model, masks.collate([long_row, short_row], TOK.pad_token_id, L))
    assert logits.shape[:2] == (2, L) and not torch.isnan(logits).any()
    alone = _forward(tiny_model, masks.collate([short_row], TOK.pad_token_id))[0]
    assert (logits[1, :len(short_row)] - alone).abs().max().item() <= 1e-5
    # block-diagonal: trie b inside the packed row equals trie b alone, trie a equals a alone
    assert (logits[0, len(a):len(long_row)] - alone).abs().max().item() <= 1e-5
    a_alone = _forward(tiny_model, masks.collate([a], TOK.pad_token_id))[0]
    assert (logits[0, :len(a)] - a_alone).abs().max().item() <= 1e-5
    # the check can fail: a plain causal mask over the packed row changes trie b's logits
    causal = masks.collate([long_row], TOK.pad_token_id)
    n = len(long_row)
    causal_mask = torch.full((1, 1, n, n), torch.finfo(torch.float32).min).triu(1)
    wrong = _forward(tiny_model, causal, causal_mask)[0]
    assert (wrong[len(a):] - alone).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------- 5. flex / BlockMask
def _label_logprobs(logits, labels):
    lp = torch.log_softmax(logits.float(), -1)
    sel = labels != IGN
    return lp[sel].gather(-1, labels[sel].unsqueeze(-1)).squeeze(-1)


def test_block_mask_matches_dense_mask_and_forward(tiny_model):
    long_row, a, b = _two_tries_row()
    short_row = trie.pack_trajectory(PROMPT, _two_blocks(), TOK)
    rows, L = [long_row, short_row], len(long_row) + 3
    bm = masks.block_mask(rows, L)
    assert tuple(bm.shape[-2:]) == (L, L)
    # element level: the mask_mod on every (b, q, k) equals the dense mask's allowed set
    bi = torch.arange(2).view(2, 1, 1)
    qi, ki = torch.arange(L).view(1, L, 1), torch.arange(L).view(1, 1, L)
    mod = bm.mask_mod(bi, torch.zeros_like(bi), qi, ki)
    assert torch.equal(mod.expand(2, L, L), masks.dense_mask(rows, torch.float32, L)[:, 0] == 0)

    batch = masks.collate(rows, TOK.pad_token_id, L)
    tiny_model.config._attn_implementation = "sdpa"
    ref = _label_logprobs(_forward(tiny_model, batch), batch["shift_labels"])
    tiny_model.config._attn_implementation = "flex_attention"
    try:
        flex_logits = _forward(tiny_model, batch, bm)
    except Exception as e:  # noqa: BLE001 - report why flex attention cannot run on this CPU
        pytest.skip(f"flex_attention + BlockMask forward failed on CPU: {type(e).__name__}: {e}")
    finally:
        tiny_model.config._attn_implementation = "sdpa"
    got = _label_logprobs(flex_logits, batch["shift_labels"])
    assert got.numel() == sum(long_row.trained) + sum(short_row.trained)
    assert (got - ref).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------- 6. flex on CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_mask_bf16_cuda_matches_fp32_dense():
    import copy

    # init 0.05: bf16 rounding moves these log-probs by ~1e-2 (measured on CPU), a wrong mask by ~0.6
    spec = models.TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=128, initializer_range=0.05)
    model = models.build_tiny_model(TOK, spec, seed=0).eval()
    model.config._attn_implementation = "sdpa"
    long_row, a, b = _two_tries_row()
    short_row = trie.pack_trajectory(PROMPT, _two_blocks(), TOK)
    rows, L = [long_row, short_row], len(long_row) + 3
    batch = masks.collate(rows, TOK.pad_token_id, L)
    ref = _label_logprobs(_forward(model, batch), batch["shift_labels"])
    causal = torch.full((2, 1, L, L), torch.finfo(torch.float32).min).triu(1)
    assert (_label_logprobs(_forward(model, batch, causal), batch["shift_labels"]) - ref).abs().max() > 0.2
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    gpu.config._attn_implementation = "flex_attention"
    cuda_batch = {k: v.to("cuda") for k, v in batch.items() if k != "attention_mask"}
    cuda_batch["attention_mask"] = None
    logits = _forward(gpu, cuda_batch, masks.block_mask(rows, L, device="cuda"))
    got = _label_logprobs(logits, batch["shift_labels"].to("cuda")).cpu()
    assert not torch.isnan(logits).any()
    assert (got - ref).abs().max().item() <= 5e-2


# ------------------------------------------------------------------------------------ 7. pack_rows
def _traj(threads, answer="1"):
    return fmt.Trajectory((fmt.Text("<think>\n"), fmt.Block.from_plan([str(i) for i in range(len(threads))],
                                                                       threads),
                           fmt.Text(f"\n</think>\n\n\\boxed{{{answer}}}")))


def test_pack_rows_first_fit():
    tries = [trie.pack_trajectory(PROMPT, t, TOK) for t in
             (_one_block(), _two_blocks(), _traj(["a"]), _traj(["ab", "c"]), _traj(["abcdefgh", "c", "d"]))]
    sizes = [len(t) for t in tries]
    snapshot = [(list(t.input_ids), list(t.parent)) for t in tries]
    budget = max(sizes) + 20
    rows = trie.pack_rows(tries, budget)
    assert all(len(r) <= budget for r in rows)
    assert sum(len(r) for r in rows) == sum(sizes)
    assert sum(r.parent.count(-1) for r in rows) == len(tries)
    assert [(list(t.input_ids), list(t.parent)) for t in tries] == snapshot  # inputs untouched
    seen = []
    for r in rows:
        assert [i for i, q in enumerate(r.parent) if q == -1] == [i for i, p in enumerate(r.position_ids) if p == 0]
        seqs = sorted(set(r.sequence))
        assert seqs == list(range(len(seqs))) and r.parent.count(-1) == len(seqs)
        for s in seqs:  # each packed trajectory is one of the inputs, intact, parents re-based
            idx = [i for i, q in enumerate(r.sequence) if q == s]
            off = idx[0]
            assert idx == list(range(off, off + len(idx)))
            part = (r.input_ids[off:off + len(idx)], r.position_ids[off:off + len(idx)],
                    [q - off if q >= 0 else -1 for q in r.parent[off:off + len(idx)]],
                    [e - off for e in r.exit[off:off + len(idx)]], r.labels[off:off + len(idx)],
                    r.trained[off:off + len(idx)])
            match = [k for k, t in enumerate(tries)
                     if part == (t.input_ids, t.position_ids, t.parent, t.exit, t.labels, t.trained)]
            assert match
            seen.append(len(idx))
            assert all(r.parent[i] == -1 or off <= r.parent[i] < i for i in idx)
    assert sorted(seen) == sorted(sizes)
    # first-fit decreasing, hand-computed: sizes descending, each goes into the first row with room
    loads = []
    for s in sorted(sizes, reverse=True):
        for k, load in enumerate(loads):
            if load + s <= budget:
                loads[k] += s
                break
        else:
            loads.append(s)
    assert [len(r) for r in rows] == loads and len(rows) < len(tries)
    # the budget is a hard bound: two tries fill a row exactly, one token less splits them
    pair = [tries[0], tries[2]]
    assert [len(r) for r in trie.pack_rows(pair, sizes[0] + sizes[2])] == [sizes[0] + sizes[2]]
    assert sorted(len(r) for r in trie.pack_rows(pair, sizes[0] + sizes[2] - 1)) == sorted([sizes[0], sizes[2]])
    # budget exactly the size fits; one token less raises, naming both sizes
    assert len(trie.pack_rows([tries[1]], sizes[1])) == 1
    with pytest.raises(ValueError, match=rf"\b{sizes[1]}\b.*\b{sizes[1] - 1}\b"):
        trie.pack_rows([tries[2], tries[1]], sizes[1] - 1)


# ------------------------------------------------------------------------------------------ 8. units
def test_units_exact():
    us = trie.units(PROMPT, _one_block(), TOK)
    got = [(u.kind, u.block, u.thread, _strs(u.context), _strs(u.completion)) for u in us]
    main_before_join = ["Q"] + HEAD + HDR1 + BODY1 + HDR2 + BODY2 + ["\n"]
    assert got == [
        ("sequential", None, None, ["Q"], HEAD),
        ("thread", 0, 1, ["Q"] + HEAD + _t("\n<Thread>\n1:"), BODY1),
        ("thread", 0, 2, ["Q"] + HEAD + _t("\n<Thread>\n2:"), BODY2),
        ("sequential", None, None, main_before_join, TAIL),
    ]
    assert main_before_join + TAIL == MAIN


def test_pack_rows_many_rows_equals_first_fit_loop():
    """Hundreds of rows: each trie lands in the first row with room, as the plain loop would put it."""
    rng = random.Random(3)
    sizes = [rng.randint(1, 100) for _ in range(400)]
    chains = [trie.PackedTrie([k] * n, list(range(n)), list(range(-1, n - 1)), [n - 1] * n, [True] * n,
                              [k] * n, [0] * n) for k, n in enumerate(sizes)]
    rows = trie.pack_rows(chains, 128)
    expected: list[list[int]] = []
    for k in sorted(range(len(sizes)), key=lambda k: sizes[k], reverse=True):
        for row in expected:
            if sum(sizes[m] for m in row) + sizes[k] <= 128:
                row.append(k)
                break
        else:
            expected.append([k])
    assert len(rows) > 150
    assert [[r.input_ids[i] for i, p in enumerate(r.parent) if p == -1] for r in rows] == expected


def test_units_two_blocks_headers_and_prefixes():
    us = trie.units(PROMPT, _two_blocks(), TOK)
    assert [(u.kind, u.block, u.thread) for u in us] == [
        ("sequential", None, None), ("thread", 0, 1), ("thread", 0, 2), ("thread", 0, 3),
        ("sequential", None, None), ("thread", 1, 1), ("thread", 1, 2), ("sequential", None, None)]
    main = _strs(us[-1].context + us[-1].completion)
    assert main[-1] == EOS and main[0] == "Q"
    for u in us:
        ctx = _strs(u.context)
        if u.kind == "sequential":
            assert main[:len(ctx)] == ctx
        else:
            assert ctx[-5:] == ["\n", "<Thread>", "\n", str(u.thread), ":"]
            head = ctx[:-5]  # up to and including the block's </Outlines>, a prefix of the main path
            assert head[-1] == "</Outlines>" and main[:len(head)] == head
            assert head.count("<Parallel>") == u.block + 1
            assert _strs(u.completion)[-1] == "</Thread>"


def test_build_trie_rejects_bad_input():
    us = trie.units(PROMPT, _one_block(), TOK)
    with pytest.raises(ValueError, match="prompt"):
        trie.build_trie([], us)
    with pytest.raises(ValueError, match="prompt"):
        trie.build_trie(_ids(["R"]), us)
    # a multi-token prompt whose units diverge after the first token (another question's units)
    p_q, p_r = tokenizers.prompt_ids(TOK, "Q"), tokenizers.prompt_ids(TOK, "R")
    assert p_q[0] == p_r[0] and p_q != p_r
    for objective in ("corrected", "official"):
        with pytest.raises(ValueError, match="does not start with the prompt"):
            trie.build_trie(p_q, trie.units(p_r, _one_block(), TOK), objective)
    assert len(trie.build_trie(p_q, trie.units(p_q, _one_block(), TOK))) == len(p_q) - 1 + 59
    with pytest.raises(ValueError, match="sequential"):
        trie.build_trie(PROMPT, [u for u in us if u.kind == "thread"])
