"""What a reader sees in the notebooks: tables as HTML, progress bars that read the same live and saved,
library chatter kept out of the cells (docs/design.md §10).

Tables are pandas ``Styler`` objects (HTML in JupyterLab and in executed notebooks); progress bars are
plain-text tqdm bars on stdout, which JupyterLab redraws in place while a cell runs and which a saved
notebook shows at their final state (a widget bar would be saved as its first frame).

>>> import pandas as pd
>>> "<table" in table(pd.DataFrame({"a": [1.23456]})).to_html()
True
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import pandas as pd
from tqdm.std import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

__all__ = ["quiet", "progress", "table", "trie_table", "check", "TAG_STYLE", "TrainingProgress", "quiet_trainer"]

# Tags and orchestrator-written tokens stand out in token tables.
TAG_STYLE = "background-color: #fde8c8; font-weight: bold"


def quiet() -> None:
    """Silence library progress bars and log lines that would clutter the cells ("Generating train split",
    "Creating parquet", "Writing model shards", TRL's experimental-feature warnings); errors still show."""
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    for name in ("vllm", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # vLLM's engine processes log to the kernel's stderr (the pipeline's terminal) from their own loggers.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", message=r".*TRL currently supports vLLM.*")
    warnings.filterwarnings("ignore", message=r".*experimental.*", module=r"trl\..*")


def progress(total: int, desc: str, unit: str = "it", disable: bool = False) -> tqdm:
    """A text progress bar on stdout: redrawn in place live, shown at its final state in a saved notebook."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stdout, ncols=90, mininterval=1.0, disable=disable)


def table(df: pd.DataFrame, precision: int = 3, max_rows: int = 60, caption: str | None = None) -> Any:
    """``df`` as a Styler: numbers to ``precision`` decimals, column names wrapped so wide tables fit the page,
    at most ``max_rows`` rows (the caption says how many were left out)."""
    shown = df.head(max_rows)
    left = len(df) - len(shown)
    styler = shown.style.format(precision=precision, thousands=",")
    styler = styler.set_table_styles([
        {"selector": "th.col_heading", "props": "white-space: normal; max-width: 7em; font-size: 90%;"},
        {"selector": "td", "props": "font-size: 90%;"}])
    text = " ".join(t for t in (caption, f"(first {max_rows} of {len(df)} rows)" if left else None) if t)
    return styler.set_caption(text) if text else styler


def trie_table(frame: pd.DataFrame, max_rows: int = 80) -> Any:
    """A flattened trie (`twlib.trie.table`) with the tag tokens highlighted and untrained tokens greyed."""
    shown = frame.head(max_rows)

    def row_style(row: pd.Series) -> list[str]:
        tag = str(row["token"]).startswith("<") and str(row["token"]).endswith(">")
        base = TAG_STYLE if tag else ("" if row["trained"] else "color: #888888")
        return [base] * len(row)

    styler = shown.style.apply(row_style, axis=1)
    if len(frame) > max_rows:
        styler = styler.set_caption(f"first {max_rows} of {len(frame)} flattened positions")
    return styler


def check(name: str, found: int, expected: int = 0, unit: str = "rows") -> None:
    """A check printed as a sentence, raising when it fails.

    >>> check("tokenisation drift", 0)
    tokenisation drift: 0 rows (expected 0) ✓
    """
    line = f"{name}: {found} {unit} (expected {expected})"
    if found != expected:
        raise AssertionError(line)
    print(line + " ✓")


class TrainingProgress(TrainerCallback):
    """One text progress bar per training run (steps, with the last logged loss and reward) in place of the
    trainer's own bar and its log line every ``logging_steps``."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress(state.max_steps, self.desc, unit="step")
        self.bar.update(state.global_step)  # a resumed run starts where it stopped

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {k: f"{v:.4g}" for k, v in (logs or {}).items() if k in ("loss", "reward") and isinstance(v, float)}
        if self.bar is not None and shown:
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def quiet_trainer(trainer, desc: str):
    """Replace a transformers/TRL trainer's progress bar and printed logs by one `TrainingProgress` bar."""
    try:
        from transformers.utils.notebook import NotebookProgressCallback
    except ImportError:  # the notebook bar needs IPython
        NotebookProgressCallback = ProgressCallback
    for callback in (PrinterCallback, ProgressCallback, NotebookProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(TrainingProgress(desc))
    return trainer
