"""HFEngine: greedy decoding equals a plain no-cache loop; a shared-prefix batch equals one-by-one decoding."""
import pytest
import torch

from twlib.engines import Completion, Request, Sampling
from twlib.engines.hf import HFEngine, common_prefix_length, sampling_probs
from twlib.models import TinyModelSpec, build_tiny_model
from twlib.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()
EOS = TOK.eos_token_id


@pytest.fixture(scope="module")
def model():
    # A wide init gives peaked, varied next-token distributions instead of near-uniform ones.
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                         initializer_range=0.3)
    return build_tiny_model(TOK, spec, seed=1).eval()


def _plain_greedy(model, prompt, max_new, stop_ids=()):
    """Recompute the whole sequence for every token (no cache, no batching)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token == EOS or token in stop_ids:
                break
    return out


def _prompt(text):
    return tuple(TOK.encode(text, add_special_tokens=False))


def test_common_prefix_length():
    assert common_prefix_length([(1, 2, 3), (1, 2, 4), (1, 2, 3)]) == 2
    assert common_prefix_length([(1, 2), (1, 2)]) == 2
    assert common_prefix_length([(5,), (6,)]) == 0


def test_greedy_matches_a_plain_loop(model):
    stop = tuple(TOK.encode("x", add_special_tokens=False))
    requests = [Request(_prompt(t), 24, stop) for t in ("abc", "a longer prompt here", "q")]
    got = HFEngine(model, EOS).generate(requests)
    for r, c in zip(requests, got):
        want = _plain_greedy(model, r.prompt, r.max_new_tokens, r.stop_ids)
        assert list(c.ids) == want
        assert c.finish_reason == ("eos" if want[-1] == EOS else "stop" if want[-1] in stop else "length")


def test_shared_prefix_batch_equals_one_by_one(model):
    head = "<think>\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n</Outlines>"
    requests = [Request(_prompt(head + f"\n<Thread>\n{n}:"), 10 + 5 * n) for n in range(1, 5)]
    engine = HFEngine(model, EOS)
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert together == alone
    assert [len(c.ids) for c in together] == [_len for _len in (len(_plain_greedy(model, r.prompt, r.max_new_tokens))
                                                               for r in requests)]


def test_rows_stop_on_their_own_stop_ids_and_limits(model):
    prompt = _prompt("same prompt")
    first = HFEngine(model, EOS).generate([Request(prompt, 12)])[0].ids
    stop_at = first[3]
    got = HFEngine(model, EOS).generate([Request(prompt, 12), Request(prompt, 2), Request(prompt, 12, (stop_at,))])
    assert got[0].ids == first and got[1] == Completion(first[:2], "length")
    assert got[2].ids == first[:first.index(stop_at) + 1] and got[2].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(model):
    r = Request(_prompt("abc"), 16, sampling=Sampling(temperature=1.0, seed=7))
    engine = HFEngine(model, EOS)
    a, b = engine.generate([r])[0], engine.generate([r])[0]
    others = {engine.generate([Request(r.prompt, 16, sampling=Sampling(temperature=1.0, seed=s))])[0].ids
              for s in range(5)}
    assert a == b and len(others) > 1


def test_zero_budget_returns_nothing(model):
    assert HFEngine(model, EOS).generate([Request(_prompt("a"), 0)]) == [Completion((), "length")]


def test_padded_batch_of_many_lengths_equals_one_by_one(model):
    # Problems in flight side by side: several prompt lengths, padded on the left into batches of max_batch.
    texts = ["q", "abc", "a longer prompt here", "mid length", "x" * 40, "another one of them"]
    engine = HFEngine(model, EOS, max_batch=4)
    free = [engine.generate([Request(_prompt(t), 12)])[0].ids for t in texts]
    # Every other row stops on the third token it writes, so rows leave the batch at different steps.
    requests = [Request(_prompt(t), 6 + 3 * k, (free[k][2],) if k % 2 else ()) for k, t in enumerate(texts)]
    requests.insert(2, Request(_prompt("zero budget"), 0))
    together = engine.generate(requests)
    assert together == [engine.generate([r])[0] for r in requests]
    assert together[2] == Completion((), "length")
    assert {c.finish_reason for c in together} >= {"length", "stop"}
    assert len({len(c.ids) for c in together}) >= 4


def test_sampling_probs_cut_each_row_at_its_own_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log()
    # Row 1: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it → keep two. Row 2: 0.6, then 0.3 → keep two.
    want = torch.tensor([[0.625, 0.375, 0.0], [0.0, 2 / 3, 1 / 3]])
    assert torch.allclose(sampling_probs(logits, Sampling(temperature=1.0, top_p=0.7)), want)
    assert torch.allclose(sampling_probs(logits, Sampling(temperature=1.0)), logits.exp())
    # Temperature 0.5 squares the odds before normalising: 0.25, 0.09, 0.04 out of 0.38.
    assert torch.allclose(sampling_probs(logits[:1], Sampling(temperature=0.5)), torch.tensor([[25, 9, 4]]) / 38)


def test_a_batch_sampled_in_one_call_follows_each_rows_distribution():
    # 4,000 rows of two different distributions, picked in one call: each row's token frequencies match its own.
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log().repeat(2000, 1)
    sampling = Sampling(temperature=1.0, top_p=0.7)
    torch.manual_seed(0)
    tokens = torch.tensor(HFEngine._pick_batch(logits, [Request((1,), 1, sampling=sampling)] * 4000, [None] * 4000))
    for row, want in enumerate(sampling_probs(logits[:2], sampling)):
        freq = torch.bincount(tokens[row::2], minlength=3) / 2000
        assert torch.allclose(freq, want, atol=0.03), (row, freq, want)


def test_greedy_batches_and_seeded_rows_pick_what_they_pick_alone(model):
    logits = torch.randn(5, len(TOK))
    greedy = [Request((1,), 1)] * 5
    assert HFEngine._pick_batch(logits, greedy, [None] * 5) == logits.argmax(-1).tolist()
    # A seeded row among unseeded ones keeps its own generator: the same token as when it is picked alone.
    seeded = Request((1,), 1, sampling=Sampling(temperature=1.0, seed=3))
    mixed = [Request((1,), 1, sampling=Sampling(temperature=1.0))] * 4 + [seeded]
    engine_rows = [None] * 4 + [torch.Generator().manual_seed(3)]
    alone = HFEngine._pick(logits[4], seeded, torch.Generator().manual_seed(3))
    assert HFEngine._pick_batch(logits, mixed, engine_rows)[4] == alone
    # Sampled rollouts of one temperature decode the same through the engine with or without company.
    r = Request(_prompt("abc"), 12, sampling=Sampling(temperature=1.0, seed=5))
    assert HFEngine(model, EOS).generate([r, Request(_prompt("abd"), 12)])[0] == HFEngine(model, EOS).generate([r])[0]
