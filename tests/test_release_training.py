"""Notebook 02 on the authors' released data: ``train_data: release`` reads the released schema (here the local
fixture copy), and the trie-SFT job trains the parallel model on what was accepted."""
from pathlib import Path

import pytest

from twlib import config, sft
from twlib.runs import RunFolder
from twlib.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_release_data_feeds_notebook_02(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = config.TrieSFTConfig.from_dict({
        "profile": "release-test", "output_root": str(tmp_path), "train_data": "release", "train_sequential": False,
        "release_data": "tests/fixtures/release", "release_subset": "sample_964", "hidden_size": 64, "num_layers": 1,
        "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128, "max_steps": 2, "batch_rows": 2,
        "row_tokens": 4096, "logging_steps": 1, "save_steps": 100, "bf16": False})
    run = RunFolder.open(cfg)
    train = sft.training_data(cfg, run)
    assert len(train) == 9 and train[0]["completion"][0]["content"].startswith("<think>\n")
    result = sft.train_model("parallel", cfg, build_char_tokenizer(), train, run)
    assert result["trajectories"] == 9 and len(sft.loss_history(result["log"])) == 2
    assert Path(result["model_path"], "model.safetensors").is_file()


def test_release_needs_the_sequential_model_off():
    with pytest.raises(config.ConfigError, match="'train_sequential' must be false with train_data 'release'"):
        config.TrieSFTConfig.from_dict({"profile": "p", "train_data": "release"})
