"""`VLLMEngine`: offline `vllm.LLM` as an orchestrator engine (token-id prompts, prefix caching).

Threads of one block share the block head, so vLLM's prefix cache computes it once. Tags are normal
tokens, so they come back in the ids; the stop id that ends a completion is part of its ids.
Scripts that create a `vllm.LLM` need an ``if __name__ == "__main__":`` guard (vLLM starts worker
processes). Usage::

    engine = VLLMEngine.from_pretrained("outputs/cpu-demo/02_trie_sft/parallel_model", eos_token_id=2)
    results = Orchestrator(engine, tokenizer).run(prompts)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from vllm import LLM, SamplingParams

from . import Completion, Request, finish_reason


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
            # On CPU this is the share of host memory vLLM reserves (92% by default: more than a shared
            # machine has free, and far more than a tiny model needs).
            settings["gpu_memory_utilization"] = 0.3
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
