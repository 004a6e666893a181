"""The engine a stage names for a saved model: ``"hf"`` (`HFEngine` over transformers) or ``"vllm"`` (offline
`VLLMEngine`). vLLM is optional and slow to import, so it is imported only when asked for.

>>> make_engine("sglang", "model-dir", 2)
Traceback (most recent call last):
...
ValueError: engine must be 'hf' or 'vllm', got 'sglang'
"""
from __future__ import annotations

from pathlib import Path

from ..models import load_model
from .hf import HFEngine

ENGINES = ("hf", "vllm")


def make_engine(engine: str, model_path: str | Path, eos_token_id: int, dtype: str = "float32",
                tensor_parallel_size: int = 1):
    """An engine over the saved model at ``model_path`` (a folder or hub id), weights in ``dtype``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'hf' or 'vllm', got {engine!r}")
    if engine == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine.from_pretrained(model_path, eos_token_id, dtype=dtype,
                                          tensor_parallel_size=tensor_parallel_size)
    return HFEngine(load_model(model_path, dtype=dtype), eos_token_id)
