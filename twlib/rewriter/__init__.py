r"""Stage 1 of the paper's two-stage parallel trajectory generator (docs/design.md §9): an LLM rewrites
sequential reasoning traces into fork-join ones.

The package: ``chat`` (any chat LLM, the on-disk answer cache, bounded retries), ``steps`` (the pure
steps), ``stage1`` (the run over all traces), ``sources`` (notebook 01b's choice of LLM and traces). Steps,
each saved per trace as ``<run_dir>/traces/<id>/<n>_<step>.json``:

1. ``steps``: the LLM cuts the numbered reasoning lines into gapless steps (`parse_steps`);
2. ``groups``: the LLM groups adjacent independent steps into threads (`parse_groups`);
3. ``splice``: rules turn groups into blocks: ≥ 2 threads, no overlap, diversity (`splice`);
4. ``edits``: the LLM removes references to earlier sibling threads with ``{src, dest}`` edits (`parse_edits`);
5. ``outlines``: the LLM writes one outline per thread (`parse_outlines`);
6. ``result``: strict format check, gold answer, statistics (`finish`).

A malformed answer is sent back with the problem named, at most ``max_retries`` times; then the
trace is rejected with the reason (``steps/gap``, ``edits/src_not_found``, ...). The pure steps,
on a five-line trace::

    >>> lines = ["x=1+1", "=2", "y=3*1", "=3", "x+y=5"]
    >>> steps = parse_steps('{"steps": [{"start": 1, "end": 2}, {"start": 3, "end": 4}, {"start": 5, "end": 5}]}', 5)
    >>> groups = parse_groups('{"groups": [{"threads": [[1], [2]]}]}', len(steps))
    >>> draft, skipped = splice(lines, block_ranges(groups, steps), min_diversity=1)
    >>> draft
    [{'threads': ['x=1+1\n=2', 'y=3*1\n=3']}, {'lines': ['x+y=5']}]
    >>> draft[0]["outlines"] = parse_outlines('{"outlines": ["x", "y"]}', 2)
    >>> print(render(draft, "</think>\n\n\\boxed{5}"))  # doctest: +NORMALIZE_WHITESPACE
    <think> <Parallel> <Outlines> <Outline>1: x</Outline> <Outline>2: y</Outline> </Outlines>
    <Thread> 1: x=1+1 =2 </Thread><Thread> 2: y=3*1 =3 </Thread> </Parallel> x+y=5 </think>
    \boxed{5}
"""
from .chat import CachedChat, ChatLLM, EngineChat, HTTPChat, Malformed
from .stage1 import Stage1Result, run_stage1
from .steps import (
                    Stage1Settings,
                    Trace,
                    apply_edits,
                    as_traces,
                    block_ranges,
                    finish,
                    number_lines,
                    parse_edits,
                    parse_groups,
                    parse_outlines,
                    parse_steps,
                    render,
                    splice,
                    split_response,
)

__all__ = ["ChatLLM", "EngineChat", "HTTPChat", "CachedChat", "Malformed", "Stage1Settings", "Stage1Result", "Trace",
           "as_traces", "split_response", "number_lines", "parse_steps", "parse_groups", "block_ranges", "splice",
           "apply_edits", "parse_edits", "parse_outlines", "render", "finish", "run_stage1"]
