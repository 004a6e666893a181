"""Benchmarks: ``python -m twlib.bench <name> --params FILE`` prints one JSON line per result.

One module per benchmark (`twlib.bench.data`, ...), each with ``run(profile) -> Iterator[dict]``. They
use the kit and the kit never uses them; this package imports a benchmark only when it is asked for.

``trie``: tokens per trajectory for the trie, expanded units and the official flattening, and
SFT throughput trie vs expanded units, side by side in one run (needs notebook 01's data).

``induction``: how many steps the profile's notebook-02 model needs, at the profile's learning rate
and at 3× and 10× it, to copy a random 20-letter string (a task only an induction circuit solves:
find the earlier copy of the current letter and read the one after it). Every lookup in the
synthetic tasks runs on that circuit; too high a learning rate delays it by hundreds of steps.

``orchestrator``: the sequential model (plain decoding) and the parallel model (fork-join orchestrator)
on the same test problems with the same engine, side by side in one run, one problem at a time:
accuracy, token-latency and wall-clock speedups, parallel efficiency, orchestration overhead; one JSON
line per engine (HF always, vLLM where installed; vLLM also logs to stdout, so keep the lines that start
with ``{``). Needs notebooks 01 and 02's outputs.

``rl``: one P-GRPO step on the same rollouts of the parallel SFT model (the profile's notebook-04
prompts per step, rollouts per prompt, temperature and budgets): tokens scored and seconds for the policy-gradient
forward + backward
with the trie (one sample per rollout, ancestor mask) vs expanded units (each engine call its own
causal sequence, as the official RL did). Needs notebooks 01 and 02's outputs.

``sft``: notebook 02's training step through the real trainer, fp32 vs bf16 autocast, side by side in one
run on the same rows of the profile's training data (both models): seconds per step after a warm-up,
the first logged losses of each precision, and the seconds to build and pack the tries (needs notebook
01's data).

``gpu``: trie-SFT tokens/s and peak memory at 8k, 32k and 64k tokens, flex ``BlockMask`` vs dense mask,
and HF-engine wall-clock speedup of parallel vs sequential decoding (`twlib.bench.gpu`).

``data``: per task family (and per shape): examples, mean sequential vs parallel tokens, mean
critical path, mean ideal speedup (sequential total / parallel critical path), activation rate,
and segment-wise tokenisation drift with the tiny tokenizer and with the Qwen vocabulary.

``load``: the sequential (02) and P-GRPO (04) models of the profile, each behind ``vllm serve`` (CPU build,
prefix caching), driven with the test problems at 1, 2, 4, 8 and 16 problems in flight, lockstep vs
event-driven: throughput, latency p50/p95, accuracy, tokens, and the prefix-cache share of every thread
call against the block-granularity maximum, with target verdicts, a table and a latency-vs-throughput
figure (`twlib.bench.load`; ``--concurrency``, ``--problems``).

``lab``: every notebook of the profile executed as JupyterLab's Run All does it (a kernel, working directory
``notebooks/``, the parameters cell edited), ``--passes`` times: seconds and slowest cells per notebook and pass
(`twlib.bench.lab`; ``--output-root`` for a clean first pass).

A benchmark module may define ``add_arguments(parser)`` for options of its own; they are passed to its
``run`` as keyword arguments.
"""
from __future__ import annotations

import argparse
import importlib
import json

from ..config import load_profile

BENCHES = ("data", "trie", "induction", "orchestrator", "rl", "sft", "gpu", "load", "lab")


def benchmark(name: str):
    """The ``run(profile)`` function of benchmark ``name`` (its module is imported here, not before)."""
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHES)}")
    return importlib.import_module(f"{__name__}.{name}").run


def main(argv: list[str] | None = None) -> int:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("name", nargs="?")
    name = first.parse_known_args(argv)[0].name
    parser = argparse.ArgumentParser(prog="python -m twlib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=BENCHES)
    parser.add_argument("--params", required=True, help="params/<profile>.yaml")
    if name in BENCHES:  # the benchmark's own options, if it has any
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser.add_argument_group(f"{name} options"))
    args = vars(parser.parse_args(argv))
    profile = load_profile(args.pop("params"))
    for record in benchmark(args.pop("name"))(profile, **args):
        print(json.dumps(record), flush=True)
    return 0


__all__ = ["BENCHES", "benchmark", "main"]
