"""The fork-join trajectory format (paper §3.1): tags, parsing, validation, rendering, statistics.

A trajectory is the assistant response: ``<think>`` reasoning with any number of ``<Parallel>``
blocks, then ``</think>`` and the final answer in the last ``\\boxed{}``. Worked example::

    <think>
    <Parallel>
    <Outlines>
    <Outline>1: A</Outline>
    <Outline>2: B</Outline>
    </Outlines>
    <Thread>
    1: A=1+2
    =3
    </Thread><Thread>
    2: B=4
    </Thread>
    </Parallel>
    A+B
    =3+4
    =7
    </think>

    \\boxed{7}

This module is the one source of the tag strings. Everything here is pure Python; token ids come
from any tokenizer that encodes each tag as one id.
"""
from .parser import Piece, id_pieces, parse, parse_ids, tag_id_map, text_pieces
from .segments import Segment, Source, render_segments, segments
from .tags import (
                   BOXED,
                   JOIN,
                   OUTLINE_CLOSE,
                   OUTLINE_OPEN,
                   OUTLINES_CLOSE,
                   OUTLINES_OPEN,
                   PARALLEL_CLOSE,
                   PARALLEL_OPEN,
                   STRUCTURE_TAGS,
                   TAG_RE,
                   TAGS,
                   THINK_CLOSE,
                   THINK_OPEN,
                   THREAD_CLOSE,
                   THREAD_OPEN,
                   FormatError,
                   thread_header,
)
from .tree import Block, Outline, Text, Thread, Trajectory, TrajectoryStats, extract_boxed, statistics

__all__ = ["PARALLEL_OPEN", "PARALLEL_CLOSE", "OUTLINES_OPEN", "OUTLINES_CLOSE", "OUTLINE_OPEN", "OUTLINE_CLOSE",
           "THREAD_OPEN", "THREAD_CLOSE", "THINK_OPEN", "THINK_CLOSE", "STRUCTURE_TAGS", "TAGS", "TAG_RE", "BOXED", "JOIN",
           "FormatError", "thread_header", "Text", "Outline", "Thread", "Block", "Trajectory", "TrajectoryStats",
           "extract_boxed", "statistics", "Piece", "text_pieces", "id_pieces", "parse", "parse_ids", "tag_id_map",
           "Source", "Segment", "segments", "render_segments"]
