"""Tiny Qwen3-architecture models built locally (no hub), and pretrained models with the tags added.

The CPU profiles train a randomly initialised Qwen3 from scratch; the GPU profiles start from a hub
Qwen3 checkpoint and add the tags (`add_tags_to_model`). Either way the folder written by
`save_model` loads with ``AutoModelForCausalLM.from_pretrained`` and ``vllm.LLM``.

>>> from twlib.tokenizer import build_char_tokenizer
>>> m = build_tiny_model(build_char_tokenizer(), TinyModelSpec(hidden_size=64, num_layers=1,
...     num_heads=2, num_kv_heads=1, intermediate_size=128))
>>> type(m).__name__, m.config.vocab_size
('Qwen3ForCausalLM', 112)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence


# Head sizes vLLM's CPU attention supports (others load, then fail at the first forward).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of a tiny Qwen3 (the defaults give ~1.1M parameters with the character vocabulary)."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    # Qwen3 normalises queries and keys per head, which caps a head's attention logits near
    # qk_norm_init² · √head_dim at the start: too flat to pick one token out of a few hundred.
    qk_norm_init: float = 1.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.qk_norm_init <= 0:
            raise ValueError(f"qk_norm_init must be > 0, got {self.qk_norm_init}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in VLLM_CPU_HEAD_DIMS:
            raise ValueError(f"head size hidden_size/num_heads = {head_dim} cannot run on vLLM for CPU; "
                             f"use one of {VLLM_CPU_HEAD_DIMS}")


def qwen3_config(tokenizer, spec: TinyModelSpec):
    from transformers import Qwen3Config

    # vLLM and the embedding matrix want the vocabulary rounded up; extra rows are never produced.
    vocab = ((len(tokenizer) + 15) // 16) * 16
    return Qwen3Config(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings, rope_theta=spec.rope_theta,
        initializer_range=spec.initializer_range, tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def build_tiny_model(tokenizer, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0):
    """Random-init ``Qwen3ForCausalLM`` sized by ``spec`` for ``tokenizer``; deterministic in ``seed``."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(tokenizer, spec))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(spec.qk_norm_init)
            layer.self_attn.k_norm.weight.fill_(spec.qk_norm_init)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model, tokenizer, path: str | Path, overwrite: bool = False) -> Path:
    """``save_pretrained`` of model and tokenizer into one folder (safetensors), atomically.

    An existing folder is only replaced with ``overwrite=True``; a crash mid-save leaves no
    half-written checkpoint behind.
    """
    from .runs import atomic_dir

    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(path)


def load_model(path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                attn_implementation=attn_implementation)


def context_length(path: str | Path) -> int:
    """The longest sequence a saved model takes (``max_position_embeddings`` of its config)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(path)).max_position_embeddings)


def add_tags_to_model(model, tokenizer, tags: Sequence[str] | None = None) -> list[str]:
    """Add the format tags to a pretrained tokenizer/model pair (paper §3.2 SFT set-up).

    New tags become atomic, non-special tokens; their embedding rows (and untied LM-head rows)
    start as the mean embedding of the tag's name, e.g. ``</Thread>`` from ``/Thread``.
    Returns the tags that were added (tags already atomic, like Qwen3's ``<think>``, are kept).
    """
    from . import format as fmt
    from .tokenizer import add_tags, init_tag_embeddings

    added = add_tags(tokenizer, fmt.TAGS if tags is None else tags)
    init_tag_embeddings(model, tokenizer, added)
    return added


def spec_dict(spec: TinyModelSpec) -> dict:
    return asdict(spec)
