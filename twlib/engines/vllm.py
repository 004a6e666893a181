"""`VLLMEngine`: offline `vllm.LLM` as an orchestrator engine (token-id prompts, prefix caching).

Threads of one block share the block head, so vLLM's prefix cache computes it once. Tags are normal
tokens, so they come back in the ids; the stop id that ends a completion is part of its ids.
Scripts that create a `vllm.LLM` need an ``if __name__ == "__main__":`` guard (vLLM starts worker
processes). Usage::

    engine = VLLMEngine.from_pretrained("outputs/cpu-demo/02_trie_sft/parallel_model", eos_token_id=2)
    results = Orchestrator(engine, tokenizer).run(prompts)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoConfig
from vllm import LLM, SamplingParams

from . import Completion, Request, finish_reason

CPU_KV_TOKENS = 131_072  # room for this many tokens in the KV cache on CPU (at least 4 longest sequences)
CPU_KV_HOST_SHARE = 0.3  # and never more than this share of host memory


def cpu_kv_cache_bytes(path: str | Path, dtype: str = "float32", max_model_len: int | None = None,
                       host_bytes: int | None = None) -> int:
    """KV-cache bytes to reserve on CPU for the saved model at ``path``: room for max(CPU_KV_TOKENS,
    4 × max_model_len) tokens, capped at CPU_KV_HOST_SHARE of host memory.

    vLLM's CPU default reserves a share of host memory and fills it page by page at start-up, which costs
    seconds per GiB, while a tiny model needs megabytes. Example: 2 layers, 2 KV heads of 64 dims in float32 hold
    2·2·2·64·4 = 2 KiB per token, so 131,072 tokens take 256 MiB.
    """
    config = AutoConfig.from_pretrained(str(path))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    tokens = max(CPU_KV_TOKENS, 4 * (max_model_len or config.max_position_embeddings))
    host = host_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(per_token * tokens, int(CPU_KV_HOST_SHARE * host))


class VLLMEngine:
    CLOSE_GRACE_S = 1.0

    def __init__(self, llm, eos_token_id: int):
        self.llm = llm
        self.eos_token_id = eos_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, eos_token_id: int, **llm_kwargs) -> "VLLMEngine":
        """A `vllm.LLM` for a saved model; ``llm_kwargs`` override the defaults (fp32, eager, prefix caching)."""
        settings = {"dtype": "float32", "enforce_eager": True, "enable_prefix_caching": True, "seed": 0}
        if not torch.cuda.is_available():
            settings["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(path, (settings | llm_kwargs)["dtype"],
                                                                   llm_kwargs.get("max_model_len"))
            # The engine core in this process rather than a process of its own: a start of about 15 s instead of
            # about 60 s on 2 cores, which is most of what a CPU stage spends in vLLM. On a GPU the separate
            # process overlaps scheduling with decoding, so it stays.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return cls(LLM(model=str(path), **(settings | llm_kwargs)), eos_token_id)

    def close(self) -> None:
        """End vLLM's engine processes and free their memory now (idempotent); without it they live until the `LLM`
        is garbage-collected, so a stage that decodes with several models one after another would hold them all."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            # Nothing is in flight: a short grace, then the process tree is killed (vLLM's worker does not exit on
            # its own, so the default grace of 5 s always runs out).
            core.shutdown(timeout=self.CLOSE_GRACE_S)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        out: list[Completion] = [Completion((), "length")] * len(requests)
        todo = [i for i, r in enumerate(requests) if r.max_new_tokens >= 1]
        if not todo:
            return out
        params = [SamplingParams(temperature=requests[i].sampling.temperature, top_p=requests[i].sampling.top_p,
                                 seed=requests[i].sampling.seed, max_tokens=requests[i].max_new_tokens,
                                 stop_token_ids=list(requests[i].stop_ids), skip_special_tokens=False)
                  for i in todo]
        generated = self.llm.generate([{"prompt_token_ids": list(requests[i].prompt)} for i in todo], params,
                                      use_tqdm=False)
        for i, g in zip(todo, generated):
            ids = tuple(g.outputs[0].token_ids)
            out[i] = Completion(ids, finish_reason(ids, requests[i].stop_ids, self.eos_token_id))
        return out
