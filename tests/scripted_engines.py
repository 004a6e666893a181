"""Stand-in engines for orchestrator and P-GRPO tests: replay known trajectories, or script (malformed) output."""
from twlib.engines import Completion, Request, finish_reason
from twlib.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()
EOS = TOK.eos_token_id
END = "\x00EOS"  # marks EOS in a scripted continuation


class ReplayEngine:
    """Answers each request with the completion trie-SFT pairs with exactly that context."""

    def __init__(self, units):
        self.table = {u.context: u.completion for u in units}
        self.eos_token_id = EOS
        self.batches: list[int] = []

    def generate(self, requests):
        self.batches.append(len(requests))
        out = []
        for r in requests:
            ids = self.table[r.prompt]  # KeyError = a context trie-SFT never trains on
            out.append(Completion(ids, finish_reason(ids, r.stop_ids, EOS)))
        return out


class ScriptEngine:
    """A stand-in model: ``policy(prompt_text) -> continuation``; stops and limits applied as an engine does."""

    def __init__(self, policy):
        self.policy, self.eos_token_id, self.batches = policy, EOS, []

    def generate(self, requests: list[Request]):
        self.batches.append(len(requests))
        out = []
        for r in requests:
            text = self.policy(TOK.decode(list(r.prompt), skip_special_tokens=False))
            ids = TOK.encode(text.replace(END, ""), add_special_tokens=False) + ([EOS] if text.endswith(END) else [])
            stop = next((k for k, i in enumerate(ids) if i in r.stop_ids or i == EOS), None)
            ids = ids[:stop + 1] if stop is not None else ids
            ids = ids[:r.max_new_tokens]
            out.append(Completion(tuple(ids), finish_reason(ids, r.stop_ids, EOS)))
        return out
