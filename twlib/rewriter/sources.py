"""Notebook 01b's edges: which LLM rewrites, and where the sequential traces come from (paper §3.2 stage 1).

The rewriting itself is `twlib.rewriter.run_stage1`; this module turns a `RewritingConfig` into its
inputs. A model named by a relative path is looked up in the profile's output folder first (so
``02_trie_sft/sequential_model`` means this profile's sequential SFT model), then under the project
root; anything else is handed to ``from_pretrained`` as is (a hub id).

>>> model_id("hf", "02_trie_sft/sequential_model")
'hf:02_trie_sft/sequential_model'
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoTokenizer

from ..config import STAGE_CONFIGS, ConfigError, RewritingConfig
from ..engines import Request
from ..engines.local import make_engine
from ..grading import grade
from ..show import progress
from ..tokenizer import prompt_ids
from .chat import EngineChat, HTTPChat
from .stage1 import run_stage1
from .steps import Stage1Settings


def model_id(engine: str, model: str) -> str:
    """The name the answer cache keys on: engine kind plus the model as the params file names it."""
    return f"{engine}:{model}"


def resolve_model(run, model: str) -> str:
    """A local folder for ``model`` if one exists (profile outputs first, then the project root), else ``model``."""
    for base in (run.profile_root, run.project):
        candidate = Path(base) / model
        if candidate.is_dir():
            return str(candidate)
    if Path(model).is_absolute():
        raise FileNotFoundError(f"model folder {model} does not exist")
    if model.split("/")[0] in STAGE_CONFIGS:
        raise FileNotFoundError(f"{model} names an earlier stage's model, but {Path(run.profile_root) / model} does "
                                "not exist; run that stage first")
    return model


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


def make_llm(cfg: RewritingConfig, run):
    """The chat model of ``cfg`` (`twlib.rewriter.chat.ChatLLM`): a local model through the HF or vLLM engine, or
    an OpenAI-compatible ``/v1/chat/completions`` endpoint (URL from the params file, key from the environment
    variable ``llm_api_key_env`` names, each request attempt bounded by ``llm_timeout_s``, ``llm_retries`` retries)."""
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
    return generate_traces(engine, tokenizer, rows, cfg.trace_max_new_tokens, progress)


def stage_traces(cfg: RewritingConfig, run, train_ds) -> list[dict]:
    """Notebook 01b's sequential traces (`traces`), with a progress bar, once per run (a re-opened run, or a
    resumed one, does not write them again)."""
    def make() -> list[dict]:
        with progress(cfg.n_traces, "traces") as bar:
            return traces(cfg, run, train_ds, bar.update)

    return run.once("traces", make)


def rewrite(cfg: RewritingConfig, run, trace_rows: Sequence[dict], llm) -> dict:
    """Stage 1 over ``trace_rows`` (`twlib.rewriter.run_stage1` in ``<run>/stage1``; every LLM answer cached):
    ``{"rows", "rejected", "report"}``, once per run."""
    def make() -> dict:
        with run.timer("rewrite"):
            result = run_stage1(trace_rows, llm, run.path("stage1"), Stage1Settings.for_stage(cfg),
                                tokenizer=getattr(llm, "tokenizer", None))
        return {"rows": result.rows, "rejected": result.rejected, "report": result.report}

    return run.once("stage1", make)


def accepted_rows(path: str | Path) -> list[dict]:
    """The rows of a 01b run's ``accepted.jsonl`` (``question``, ``answer``, ``completion``,
    ``sequential_completion``, statistics)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def accepted_examples(path: str | Path) -> list[dict]:
    """``accepted.jsonl`` of a 01b run → trie-SFT examples ``{"question", "text"}``."""
    return [{"question": r["question"], "text": r["completion"][0]["content"]} for r in accepted_rows(path)]
