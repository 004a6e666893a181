"""Notebook 01b's edges: which LLM rewrites, and where the sequential traces come from (paper §3.2 stage 1).

The rewriting itself is `twlib.rewriter.run_stage1`; this module turns a `RewritingConfig` into its
inputs. A model named by a relative path is looked up in the profile's output folder first (so
``02_trie_sft/sequential_model`` means this profile's sequential SFT model), then under the project
root; anything else is handed to ``from_pretrained`` as is (a hub id).

>>> model_id("hf", "02_trie_sft/sequential_model")
'hf:02_trie_sft/sequential_model'
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoTokenizer

from ..config import ConfigError, RewritingConfig
from ..engines import Request
from ..engines.local import local_server, make_engine
from ..grading import grade
from ..models import resolve_model as _resolve
from ..show import progress
from ..tokenizer import prompt_ids
from .chat import EngineChat, HTTPChat
from .stage1 import run_stage1
from .steps import Stage1Settings


def model_id(engine: str, model: str) -> str:
    """The name the answer cache keys on: engine kind plus the model as the params file names it."""
    return f"{engine}:{model}"


def resolve_model(run, model: str) -> str:
    """A local folder for ``model`` if one exists (profile outputs first, then the project root), else ``model``;
    ``stand-in`` is built when missing (`twlib.models.resolve_model`)."""
    return _resolve(run, model)


def _local_engine(kind: str, path: str):
    """(engine, tokenizer) for a local model folder or hub id, on the HF or offline vLLM engine."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = "bfloat16" if kind == "vllm" and torch.cuda.is_available() else "float32"
    return make_engine(kind, path, tokenizer.eos_token_id, dtype=dtype), tokenizer


def api_key(cfg: RewritingConfig, environ=os.environ) -> str | None:
    """The endpoint's key, read now from the environment variable ``cfg.llm_api_key_env`` names (docs/design.md §10);
    None when it names none. A named variable that is unset or empty is an error naming the variable (never a value).

    >>> api_key(RewritingConfig(profile="p", llm_api_key_env="MY_KEY"), {"MY_KEY": "secret"})
    'secret'
    """
    name = cfg.llm_api_key_env
    if not name:
        return None
    key = environ.get(name, "").strip()
    if not key:
        raise ConfigError(f"{cfg.stage}: llm_api_key_env names the environment variable {name}, which is "
                          f"{'empty' if name in environ else 'not set'}; export {name}=<your key> before running "
                          "(the key is read from there only, and written nowhere)")
    return key


class ServedChat:
    """The chat endpoint of a ``vllm serve`` the kit runs for ``llm_model`` (``llm_engine: endpoint`` without
    ``llm_base_url``). Inside ``with llm:`` (`rewrite` opens it) the first question starts the server and an
    `HTTPChat` to it; leaving the block stops the server, so a run with nothing to ask starts none. Answers are
    cached under the same model id as an endpoint serving that name."""

    def __init__(self, cfg: RewritingConfig, path: str):
        self.cfg, self.path, self.model_id = cfg, path, cfg.llm_model
        self.server, self.http, self.open, self.started = None, None, False, 0

    def __repr__(self) -> str:
        return f"ServedChat({self.path!r} as {self.model_id!r}, {'running' if self.server else 'stopped'})"

    def __enter__(self) -> "ServedChat":
        self.open = True
        return self

    def __exit__(self, *exc) -> None:
        self.open = False
        if self.http is not None:
            self.http.close()
        if self.server is not None:
            self.server.stop()
        self.server = self.http = None

    def _client(self) -> HTTPChat:
        if not self.open:
            raise RuntimeError("the served LLM is asked outside `with llm:`, where no server may run")
        if self.http is None:
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
            self.server = local_server(self.path, self.cfg.llm_model, dtype).start()
            self.started += 1
            self.http = HTTPChat(self.server.url, self.cfg.llm_model, timeout_s=self.cfg.llm_timeout_s,
                                 retries=self.cfg.llm_retries, max_tokens_field=self.cfg.llm_max_tokens_field)
        return self.http

    def chat(self, messages, max_tokens: int, temperature: float) -> str:
        return self._client().chat(messages, max_tokens, temperature)

    def chat_batch(self, conversations, max_tokens: int, temperature: float, on_reply=None) -> list[str]:
        return self._client().chat_batch(conversations, max_tokens, temperature, on_reply)


def make_llm(cfg: RewritingConfig, run):
    """The chat model of ``cfg`` (`twlib.rewriter.chat.ChatLLM`): a local model through the HF or vLLM engine, or
    an OpenAI-compatible ``/v1/chat/completions`` endpoint (URL from the params file, key from the environment
    variable ``llm_api_key_env`` names, each request attempt bounded by ``llm_timeout_s``, ``llm_retries`` retries),
    or, with no URL, a `ServedChat` whose ``vllm serve`` runs while `rewrite` does."""
    if cfg.llm_engine == "endpoint" and not cfg.llm_base_url:
        return ServedChat(cfg, resolve_model(run, cfg.llm_model))
    if cfg.llm_engine == "endpoint":
        return HTTPChat(cfg.llm_base_url, cfg.llm_model, api_key=api_key(cfg), timeout_s=cfg.llm_timeout_s,
                        retries=cfg.llm_retries, max_tokens_field=cfg.llm_max_tokens_field)
    engine, tokenizer = _local_engine(cfg.llm_engine, resolve_model(run, cfg.llm_model))
    return EngineChat(engine, tokenizer, model_id(cfg.llm_engine, cfg.llm_model))


def generate_traces(engine, tokenizer, problems: Sequence[dict], max_new_tokens: int,
                    progress: Callable[[int], None] | None = None) -> list[dict]:
    """Sequential traces written by a model (plain decoding, greedy, in one engine batch), the correct
    ones only, as ``{"id", "question", "answer", "response"}`` — the paper's step 0 keeps correct answers
    only. A stock checkpoint works as is: plain decoding needs no format tags."""
    requests = [Request(tuple(prompt_ids(tokenizer, p["question"])), max_new_tokens) for p in problems]
    completions = engine.generate(requests)
    if progress:
        progress(len(problems))
    out = []
    for p, c in zip(problems, completions):
        ids = list(c.ids)
        if ids and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if grade(text, str(p["answer"])).correct:
            out.append({"id": str(p["id"]), "question": p["question"], "answer": str(p["answer"]), "response": text})
    return out


def traces(cfg: RewritingConfig, run, train_ds, progress: Callable[[int], None] | None = None) -> list[dict]:
    """The first ``n_traces`` training problems' sequential traces: the dataset's own sequential CoT
    (``traces_from: dataset``) or ones ``trace_model`` writes (``traces_from: model``, correct ones kept)."""
    ds = train_ds.select(range(min(cfg.n_traces, len(train_ds))))
    rows = [dict(r) for r in ds]
    if cfg.traces_from == "dataset":
        if "sequential_completion" not in ds.column_names:
            raise ValueError("the 01 training split has no sequential_completion column (real-math data has no "
                             "traces): set traces_from to 'model' and name a trace_model")
        return rows
    engine, tokenizer = _local_engine(cfg.trace_engine, resolve_model(run, cfg.trace_model))
    try:
        return generate_traces(engine, tokenizer, rows, cfg.trace_max_new_tokens, progress)
    finally:
        if hasattr(engine, "close"):  # vLLM's engine processes would outlive the step (and hold their memory)
            engine.close()


def trace_books(cfg: RewritingConfig, train_ds, kept: Sequence[dict]) -> dict:
    """Where notebook 01b's sequential traces came from, in counts: the first ``n_traces`` training prompts, the
    traces taken (``traces_from: dataset``) or written by ``trace_model``, and how many of those the answer filter
    rejected (paper step 0 keeps correct answers only).

    >>> cfg = RewritingConfig(profile="p", n_traces=3, traces_from="model", trace_model="m")
    >>> trace_books(cfg, range(10), [{"id": "a"}])
    {'traces_from': 'model', 'prompts': 3, 'kept': 1, 'rejected_wrong_answer': 2}
    """
    prompts = min(cfg.n_traces, len(train_ds))
    return {"traces_from": cfg.traces_from, "prompts": prompts, "kept": len(kept), "rejected_wrong_answer": prompts - len(kept)}


def stage_traces(cfg: RewritingConfig, run, train_ds) -> list[dict]:
    """Notebook 01b's sequential traces (`traces`), with a progress bar, once per run (a re-opened run, or a
    resumed one, does not write them again)."""
    def make() -> list[dict]:
        with run.timer("traces"), progress(cfg.n_traces, "traces") as bar:
            return traces(cfg, run, train_ds, bar.update)

    return run.once("traces", make)


def rewrite(cfg: RewritingConfig, run, trace_rows: Sequence[dict], llm) -> dict:
    """Stage 1 over ``trace_rows`` (`twlib.rewriter.run_stage1` in ``<run>/stage1``; every LLM answer cached):
    ``{"rows", "rejected", "report"}``, once per run."""
    def make() -> dict:
        served = llm if isinstance(llm, ServedChat) else contextlib.nullcontext()
        with run.timer("rewrite"), served:  # a kit-served LLM runs only while the rewriting does
            result = run_stage1(trace_rows, llm, run.path("stage1"), Stage1Settings.for_stage(cfg),
                                tokenizer=getattr(llm, "tokenizer", None))
        report = result.report | ({"servers_started": llm.started} if isinstance(llm, ServedChat) else {})
        return {"rows": result.rows, "rejected": result.rejected, "report": report}

    return run.once("stage1", make)


def accepted_rows(path: str | Path) -> list[dict]:
    """The rows of a 01b run's ``accepted.jsonl`` (``question``, ``answer``, ``completion``,
    ``sequential_completion``, statistics)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def accepted_examples(path: str | Path) -> list[dict]:
    """``accepted.jsonl`` of a 01b run → trie-SFT examples ``{"question", "text"}``."""
    return [{"question": r["question"], "text": r["completion"][0]["content"]} for r in accepted_rows(path)]
