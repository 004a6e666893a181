"""``python -m twlib.bench orchestrator``: the sequential model (plain decoding) and the parallel model (fork-join
orchestrator) on the same test problems with the same engine, side by side in one run, one problem at a time:
accuracy, token-latency and wall-clock speedups, parallel efficiency, orchestration overhead; one JSON line
per engine (HF always, vLLM where installed; vLLM also logs to stdout, so keep the lines that start with
``{``). Needs notebooks 01 and 02's outputs."""
from __future__ import annotations

import importlib.util
from typing import Iterator

from ..config import Profile
from ..dataset import load_parquet
from ..engines.hf import HFEngine
from ..evaluation import evaluate, summarize
from ..models import load_model
from ..orchestrator import Orchestrator
from ..tokenizer import load_tokenizer
from .common import outputs


def run(profile: Profile, n_problems: int = 100) -> Iterator[dict]:
    """docs/design.md §7 summary of both models on the first ``n_problems`` test problems, per engine."""
    root = outputs(profile)
    test = load_parquet(root / "01_trajectories" / "data")["test"]
    problems = [dict(r) for r in test.select(range(min(n_problems, len(test))))]
    paths = {kind: root / "02_trie_sft" / f"{kind}_model" for kind in ("sequential", "parallel")}
    tok = load_tokenizer(paths["parallel"])
    engines = {"hf": lambda path: HFEngine(load_model(path), tok.eos_token_id)}
    if importlib.util.find_spec("vllm") is not None:  # optional, and slow to import: only when installed
        from ..engines.vllm import VLLMEngine

        engines["vllm"] = lambda path: VLLMEngine.from_pretrained(path, tok.eos_token_id, max_model_len=2048)
    for name, make in engines.items():
        records = {kind: evaluate(Orchestrator(make(path), tok), problems, tok) for kind, path in paths.items()}
        summary = summarize(records["sequential"], records["parallel"])
        yield {"bench": "orchestrator", "engine": name, "profile": profile.name,
               **{k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}}
