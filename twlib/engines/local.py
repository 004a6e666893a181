"""The engine a stage names: ``"hf"`` (`HFEngine` over transformers) or ``"vllm"`` (offline `VLLMEngine`) for a
saved model, or an OpenAI-compatible server (`endpoint_engine`, docs/design.md §6). vLLM is optional and slow to
import, so it is imported only when asked for.

>>> make_engine("sglang", "model-dir", 2)
Traceback (most recent call last):
...
ValueError: engine must be 'hf' or 'vllm', got 'sglang' (a server of any kind: endpoint_engine)
>>> endpoint_engine("http://127.0.0.1:8000/", "parallel", eos_token_id=2, timeout_s=60)
OpenAIEngine('http://127.0.0.1:8000', model='parallel', timeout_s=60, retries=3, api_key=none)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ..models import context_length, load_model
from .hf import HFEngine
from .openai import OpenAIEngine
from .server import VLLMServer

ENGINES = ("hf", "vllm")


def make_engine(engine: str, model_path: str | Path, eos_token_id: int, dtype: str = "float32",
                tensor_parallel_size: int = 1):
    """An engine over the saved model at ``model_path`` (a folder or hub id), weights in ``dtype``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'hf' or 'vllm', got {engine!r} (a server of any kind: endpoint_engine)")
    if engine == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine.from_pretrained(model_path, eos_token_id, dtype=dtype,
                                          tensor_parallel_size=tensor_parallel_size)
    return HFEngine(load_model(model_path, dtype=dtype), eos_token_id)


def api_key(variable: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key held by the environment variable named ``variable``, read now (docs/design.md §10); None when no
    variable is named. A named variable that is unset or empty is an error naming the variable, never a value.

    >>> api_key("MY_KEY", {"MY_KEY": " secret "}), api_key("", {})
    ('secret', None)
    """
    if not variable:
        return None
    key = environ.get(variable, "").strip()
    if not key:
        raise ValueError(f"the API key's environment variable {variable} is {'empty' if variable in environ else 'not set'}; "
                         f"export {variable}=<your key> before running (the key is read from there only, written nowhere)")
    return key


def endpoint_engine(base_url: str, model: str, eos_token_id: int, api_key_env: str = "", *,
                    timeout_s: float = 600.0, concurrency: int = 64, retries: int = 3,
                    environ: Mapping[str, str] = os.environ) -> OpenAIEngine:
    """`OpenAIEngine` over the ``/v1/completions`` of ``base_url`` (``vllm serve``, SGLang, any OpenAI-compatible
    server) for the model it serves as ``model``; the key comes from the variable ``api_key_env`` names.

    Prompts and completions travel as token ids, so the tokenizer stays the saved model's: the server must
    serve that model (same vocabulary, tags included) for the ids to mean the same text.
    """
    if not base_url.startswith(("http://", "https://")):
        # The value is not echoed: a key pasted here would end up in a log.
        raise ValueError("base_url must be an http(s) URL, such as http://127.0.0.1:8000")
    return OpenAIEngine(base_url, model, eos_token_id, concurrency=concurrency, timeout_s=timeout_s, retries=retries,
                        api_key=api_key(api_key_env, environ))


def local_server(model_path: str | Path, model_name: str, dtype: str = "float32", max_model_len: int | None = None,
                 startup_timeout_s: float = 600.0) -> VLLMServer:
    """A `VLLMServer` (not started) for a model the kit serves itself under ``model_name``: notebook 01b's rewriting
    LLM and notebook 05's endpoint when no URL is given. Weights in ``dtype``; the model's whole context unless
    ``max_model_len``; the checkpoint's sampling defaults (Qwen3's top_k 20, ...) ignored, since a request that
    leaves a field out must get vLLM's neutral value, as on the offline engine, not the checkpoint's."""
    return VLLMServer(model_path, model_name=model_name, max_model_len=max_model_len or context_length(model_path),
                      startup_timeout_s=startup_timeout_s, extra_args=("--dtype", dtype, "--generation-config", "vllm"))
