"""The fork-join viewer on hand-built inputs: columns, token counts and the marked longest thread of a
two-block trajectory; timeline bars equal to hand-computed call records; the standalone report."""
import re

import pandas as pd

from twlib import format as fmt
from twlib import viewer
from twlib.orchestrator import CallRecord
from twlib.tokenizer import build_char_tokenizer, token_counter

TOK = build_char_tokenizer()
TWO_BLOCKS = fmt.Trajectory((
    fmt.Text("<think>\nstart\n"),
    fmt.Block.from_plan(["add a", "add bb"], ["a=1", "bb=22+3"]),
    fmt.Text("\nmiddle\n"),
    fmt.Block.from_plan(["x", "y", "z"], ["x1", "y22", "z"]),
    fmt.Text("\nend\n</think>\n\n\\boxed{5}"),
)).render()


def _columns(page: str) -> list[tuple[str, str, int, bool]]:
    """(block id, thread number, tokens, marked longest) of every thread column of a page."""
    out = []
    for m in re.finditer(r'<div class="tw-thread( tw-longest)?" id="tw\d+-b(\d)-t(\d)"><h4>thread \d · (\d+) tokens', page):
        out.append((m.group(2), m.group(3), int(m.group(4)), bool(m.group(1))))
    return out


def test_two_blocks_side_by_side_with_counts_and_the_longest_marked():
    page = str(viewer.trajectory_html(TWO_BLOCKS, TOK, title="two blocks"))
    traj = fmt.parse(TWO_BLOCKS, count=token_counter(TOK))
    expected = []
    for b, block in enumerate(traj.blocks):
        counts = [t.n_tokens for t in block.threads]
        # by hand: "<Thread>" (1 token) + "\nN:" (3) + body (1 per character) + "</Thread>" (1)
        assert counts == [1 + 3 + len(t.body) + 1 for t in block.threads]
        longest = counts.index(max(counts))
        expected += [(str(b), str(t.number), counts[k], k == longest) for k, t in enumerate(block.threads)]
    assert _columns(page) == expected
    assert [c[3] for c in expected] == [False, True, False, True, False]  # "bb=22+3" and "y22" are longest
    assert page.count("critical path</span>") == 2 and page.count('class="tw-block"') == 2
    for outline in ("add a", "add bb", "x", "y", "z"):  # each outline links to its thread's column
        assert re.search(rf'<a href="#tw\d+-b\d-t\d">\d: {outline}</a>', page)
    stats = fmt.statistics(traj)
    assert f"{stats.total_tokens} tokens, critical path {stats.critical_path_tokens}" in page
    assert "<b>two blocks</b>" in page and "&lt;think&gt;" not in page.split("</style>")[0]


def test_malformed_output_still_shows_as_text():
    page = str(viewer.trajectory_html("<think>\n<Parallel>\n<Thread>\n1: oops", TOK))
    assert 'class="tw-block"' not in page and "oops" in page and "&lt;Parallel&gt;" in page


CALLS = [CallRecord("sequential", 20, 12, "stop", 0.50, None, None, 0.0),
         CallRecord("thread", 35, 7, "stop", 0.25, 0, 1, 0.50),
         CallRecord("thread", 35, 9, "stop", 0.25, 0, 2, 0.50),
         CallRecord("sequential", 52, 6, "eos", 0.125, None, None, 0.75)]


def test_timeline_bars_match_the_call_records():
    frame = viewer.timeline_frame(CALLS)
    expected = pd.DataFrame({"lane": ["sequential", "thread 1", "thread 2", "sequential"],
                             "start": [0.0, 0.5, 0.5, 0.75], "end": [0.5, 0.75, 0.75, 0.875],
                             "block": [None, 0, 0, None], "tokens": [12, 7, 9, 6]})
    pd.testing.assert_frame_equal(frame, expected, check_dtype=False)
    dicts = [c.__dict__ for c in CALLS]  # the records' form in evaluation .jsonl files
    pd.testing.assert_frame_equal(viewer.timeline_frame(dicts), frame)
    fig = viewer.timeline(CALLS)
    bars = sorted((round(p.get_x(), 3), round(p.get_width(), 3), round(p.get_y() + p.get_height() / 2))
                  for p in fig.axes[0].patches)
    assert bars == [(0.0, 0.5, 0), (0.5, 0.25, 1), (0.5, 0.25, 2), (0.75, 0.125, 0)]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["sequential", "thread 1", "thread 2"]


def test_report_is_one_standalone_page(tmp_path):
    path = viewer.report([{"title": "forked", "question": "q?", "response": TWO_BLOCKS, "calls": CALLS},
                          {"title": "plain", "question": "p?", "response": "<think>\nx\n</think>\n\n\\boxed{1}"}],
                         tmp_path / "examples.html", tokenizer=TOK)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<h2>") == 2
    assert page.count("data:image/png;base64,") == 1 and page.count('class="tw-traj"') == 2
