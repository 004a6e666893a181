"""Notebook hygiene, parameter agreement (cell ↔ YAML ↔ config), and papermill smoke runs."""
import ast
import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from twlib import config, dataset, pipeline, sft, width
from twlib import format as fmt

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
PROFILES = sorted((ROOT / "params").glob("*.yaml"))
COMMON = {"profile", "output_root", "force"}


def _parameters_cell(path: Path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    return tagged[0]


def _cell_defaults(path: Path) -> dict:
    """name → default of every `name: type = default  # help` line of the parameters cell."""
    cell = _parameters_cell(path)
    out = {}
    for line, node in zip(cell.source.splitlines(), ast.parse(cell.source).body):
        assert isinstance(node, ast.AnnAssign), f"{path.name}: parameters must be `name: type = default`"
        assert "#" in line, f"{path.name}: parameter {node.target.id} has no '# help' comment"
        out[node.target.id] = ast.literal_eval(node.value)
    return out


def test_there_are_notebooks_and_profiles():
    assert [p.stem for p in NOTEBOOKS][:1] == ["01_trajectories"]
    assert {"smoke", "cpu-demo"} <= {p.stem for p in PROFILES}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_clean_and_thin(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"
        for node in ast.walk(ast.parse(cell.source)):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), \
                f"{path.name}: define functions in twlib, not in notebooks"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_kernelspec_is_what_the_kernel_reports(path):
    """JupyterLab rewrites a kernelspec that differs from the kernel's own, marking a merely opened notebook
    modified (and autosave then writes it)."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"] == {"display_name": spec.display_name, "language": spec.language,
                                         "name": "python3"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_agree_with_config_and_profiles(path):
    """The cell names every knob (None: from the profile), documents it with the cpu-demo value, and resolves to
    exactly the profile's values; every profile's section lists every knob."""
    stage = path.stem
    cls = config.STAGE_CONFIGS[stage]
    defaults = _cell_defaults(path)
    knobs = [n for n in cls.names() if n not in COMMON]
    assert list(defaults) == ["profile", "params_file", "output_root", "force", *knobs], "cell and config differ"
    assert (defaults["profile"], defaults["params_file"], defaults["force"]) == ("cpu-demo", "", False)
    assert all(defaults[n] is None for n in ["output_root", *knobs]), "knobs must default to None (the profile's)"
    import papermill
    documented = papermill.inspect_notebook(str(path))  # what `papermill --help-notebook` shows
    assert list(documented) == list(defaults), "papermill cannot parse every parameter line"
    assert all(p["help"] for p in documented.values())
    demo = yaml.safe_load((ROOT / "params" / "cpu-demo.yaml").read_text())
    for name in knobs:
        shown = re.search(r"\(cpu-demo: (.*)\)$", documented[name]["help"])
        assert shown, f"{name}: the help text does not give the cpu-demo value"
        assert ast.literal_eval(shown.group(1).replace("true", "True")) == demo[stage][name], name
    for params in PROFILES:
        profile = config.load_profile(params)
        if stage in profile.stages:
            section = yaml.safe_load(params.read_text())[stage]
            assert set(section) == set(knobs), f"{params.name}: {stage} keys differ from the cell"
            ns = dict(defaults, profile=profile.name, params_file=str(params))
            resolved = cls.from_namespace(ns)
            assert resolved == profile.stage_config(stage)
            assert set(resolved.sources.values()) == {"profile"} | ({"override"} if "force" in ns else set())


def test_every_profile_validates():
    for params in PROFILES:
        profile = config.load_profile(params)
        for stage in profile.stages:
            assert (ROOT / "notebooks" / f"{stage}.ipynb").exists()
            profile.stage_config(stage)


def test_bad_parameter_is_named():
    with pytest.raises(config.ConfigError, match="'n_tset'.*did you mean 'n_test'"):
        config.TrajectoriesConfig.from_dict({"profile": "x", "n_tset": 3})
    with pytest.raises(config.ConfigError, match="'family_weights'"):
        config.TrajectoriesConfig.from_dict({"profile": "x", "family_weights": [1.0]})
    with pytest.raises(config.ConfigError, match="'families'.*sudoku"):
        config.TrajectoriesConfig.from_dict({"profile": "x", "families": ["sudoku"], "family_weights": [1.0]})
    with pytest.raises(config.ConfigError, match="'expr_groups_min'"):
        config.TrajectoriesConfig.from_dict({"profile": "x", "expr_groups_min": 0})


@pytest.mark.notebooks
def test_notebook_01_smoke(smoke_outputs):
    folder, spec = smoke_outputs
    stage = folder / "01_trajectories"
    params = spec["01_trajectories"]
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["params"]["n_test"] == params["n_test"]
    assert metrics["metrics"]["drifted_rows"] == 0
    assert metrics["metrics"]["examples"] == {"train": params["n_train"] + params["n_train_short"],
                                              "validation": params["n_validation"], "test": params["n_test"]}
    for key in ("git_sha", "packages", "device", "timings"):
        assert key in metrics
    dsd = dataset.load_parquet(stage / "data")
    questions = {s: set(dsd[s]["question"]) for s in dsd}
    shapes = {s: set(dsd[s]["shape"]) for s in dsd}
    assert {"short-balanced", "short-chain"} & shapes["train"] and not any(
        sh.startswith("short-") or sh.endswith("-coarse") for sh in shapes["validation"] | shapes["test"])
    coarse = [r for r in dsd["train"] if r["shape"].endswith("-coarse")]
    assert coarse and all(r["coarse_completion"] == r["completion"] for r in coarse)
    for row in coarse:  # paired threads: still valid forks, same answer as the sequential CoT
        par = fmt.parse(row["completion"][0]["content"], strict=True)
        assert par.answer == fmt.parse(row["sequential_completion"][0]["content"]).answer
        assert all(len(b.threads) >= 2 for b in par.blocks)
    assert not (questions["train"] & questions["test"]) and not (questions["train"] & questions["validation"])
    for row in dsd["test"]:
        traj = fmt.parse(row["completion"][0]["content"])
        assert traj.answer == row["answer"] == fmt.parse(row["sequential_completion"][0]["content"]).answer
    for fig in ("total_vs_critical.png", "ideal_speedup.png"):
        assert (stage / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from twlib.tokenizer import check_tags_atomic, load_tokenizer
    check_tags_atomic(load_tokenizer(stage / "tokenizer"))
    executed = nbformat.read(stage / "01_trajectories.ipynb", as_version=4)
    assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "--- parallel CoT" in text and "<Parallel>" in text


@pytest.mark.notebooks
def test_pipeline_skips_complete_stage(smoke_outputs, tmp_path, capsys):
    folder, spec = smoke_outputs
    params = tmp_path / "smoke.yaml"
    spec = dict(spec, output_root=str(folder.parent))
    params.write_text(yaml.safe_dump(spec))
    before = (folder / "01_trajectories" / "metrics.json").read_text()
    assert pipeline.main([str(params)]) == 0
    assert "skip" in capsys.readouterr().out.lower()
    assert (folder / "01_trajectories" / "metrics.json").read_text() == before


@pytest.mark.notebooks
def test_notebook_02_smoke(smoke_outputs):
    folder, spec = smoke_outputs
    stage = folder / "02_trie_sft"
    params = spec["02_trie_sft"]
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    for kind in ("sequential", "parallel"):
        m = metrics["metrics"][kind]
        assert m["steps"] == params["max_steps"] and m["final_loss"] > 0 and m["label_tokens"] > 0
        rows_seen = params["max_steps"] * params["batch_rows"] * params.get("gradient_accumulation_steps", 1)
        assert m["epochs"] == round(rows_seen / m["rows"], 3)  # steps × rows per step over the packed rows
        assert m["trajectories"] == spec["01_trajectories"]["n_train"] + spec["01_trajectories"]["n_train_short"]
        from twlib.models import load_model
        from twlib.tokenizer import load_tokenizer, prompt_ids
        model, tok = load_model(stage / f"{kind}_model"), load_tokenizer(stage / f"{kind}_model")
        import torch
        logits = model(input_ids=torch.tensor([prompt_ids(tok, "a1+b2*c3")])).logits
        assert torch.isfinite(logits).all() and model.config.hidden_size == params["hidden_size"]
        validation = dataset.load_parquet(folder / "01_trajectories" / "data")["validation"]
        reproduced = sft.reference_match(model, tok, sft.dataset_examples(validation, parallel=kind == "parallel"))
        if kind == "parallel":  # either granularity of the plan counts
            coarse = [{"question": r["question"], "text": r["coarse_completion"][0]["content"]} for r in validation]
            reproduced = [a or b for a, b in zip(reproduced, sft.reference_match(model, tok, coarse))]
        assert m["validation_reproduced"] == pytest.approx(sum(reproduced) / len(reproduced))
        assert (stage / f"{kind}_checkpoints" / f"checkpoint-{params['max_steps']}").is_dir()
    history = json.loads((stage / "loss_history.json").read_text())
    assert [r["step"] for r in history["parallel"]] == list(range(1, params["max_steps"] + 1))
    assert params["concurrent_jobs"] == 2  # the smoke profile trains its two models side by side
    executed = nbformat.read(stage / "02_trie_sft.ipynb", as_version=4)
    shown = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "2 jobs, 2 at a time" in shown and f"{2 * params['max_steps']}/{2 * params['max_steps']}" in shown
    for kind in ("sequential", "parallel"):
        assert f"{params['max_steps']}/{params['max_steps']} [" in (stage / "launch" / f"sft-{kind}.log").read_text()
        assert metrics["timings"][f"train_{kind}"] > 0
    for fig in ("trie_masks.png", "loss_curves.png"):
        assert (stage / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.notebooks
def test_notebook_01b_smoke(smoke_outputs):
    """The tiny model cannot follow the rewriting prompts: every trace is rejected, and the books balance."""
    folder, spec = smoke_outputs
    stage = folder / "01b_rewriting"
    params = spec["01b_rewriting"]
    report = json.loads((stage / "metrics.json").read_text())["metrics"]["report"]
    assert report["traces"] == params["n_traces"] == report["accepted"] + report["rejected"]
    assert sum(report["rejected_by_reason"].values()) == report["rejected"]
    # each rejected trace was asked once and sent back at most max_retries times, all in this run
    assert report["cache_hits"] == 0
    assert report["rejected"] <= report["llm_calls"] <= report["traces"] * 4 * (params["max_retries"] + 1)
    accepted = (stage / "accepted.jsonl").read_text().splitlines()
    rejected = (stage / "rejected.jsonl").read_text().splitlines()
    assert (len(accepted), len(rejected)) == (report["accepted"], report["rejected"])
    for line in rejected:
        r = json.loads(line)
        assert (stage / "stage1" / "traces" / r["id"] / "0_input.json").exists() and r["reason"]
    assert len(list((stage / "stage1" / "llm_cache").rglob("*.json"))) == report["llm_calls"]


@pytest.mark.notebooks
def test_notebook_03_smoke(smoke_outputs):
    from twlib import format as fmt
    from twlib.grading import grade
    from twlib.models import load_model

    folder, spec = smoke_outputs
    stage = folder / "03_self_training"
    params = spec["03_self_training"]
    metrics = json.loads((stage / "metrics.json").read_text())["metrics"]
    records = [json.loads(line) for line in (stage / "rollouts.jsonl").read_text().splitlines()]
    assert len(records) == params["n_prompts"] * params["samples_per_prompt"] == metrics["yield"]["rollouts"]
    assert sum(metrics["yield"]["counts"].values()) == len(records)
    for reason, n in metrics["yield"]["counts"].items():
        assert n == sum(r["reason"] == reason for r in records)
    for r in records:
        assert (r["text"] is not None) == (r["reason"] in ("kept", "duplicate"))
        assert r["total_tokens"] <= params["max_new_tokens"]
        if r["text"] is not None:
            fmt.parse(r["text"], strict=True)
            assert grade(r["text"], r["answer"]).correct
    merged = [json.loads(line) for line in (stage / "data" / "train.jsonl").read_text().splitlines()]
    assert len(merged) == metrics["merged"] == metrics["kept_rollouts"] + sum(metrics["stage1"].values())
    assert metrics["stage1"]["rewritten"] == 0  # the smoke 01b run accepts nothing
    assert metrics["stage1"]["synthetic"] == params["merge_synthetic"]
    assert all(fmt.parse(e["text"], strict=True).answer for e in merged)
    assert (stage / "parallel_checkpoints" / f"checkpoint-{params['max_steps']}").is_dir()
    assert load_model(stage / "parallel_model").config.hidden_size == spec["02_trie_sft"]["hidden_size"]
    assert set(metrics["before_after"]) == {"parallel_sft", "self_trained"}
    for row in metrics["before_after"].values():
        assert 0 <= row["format_correct_rate"] <= 1 and row["total_tokens"] <= params["max_new_tokens"]
    for fig in ("rollout_fates.png", "loss_curve.png"):
        assert (stage / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.notebooks
def test_notebook_04_smoke(smoke_outputs):
    folder, spec = smoke_outputs
    stage = folder / "04_pgrpo"
    params = spec["04_pgrpo"]
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    names = {"pgrpo", "grpo_sequential", "pgrpo_std"}
    assert set(metrics["metrics"]["runs"]) == names
    histories = json.loads((stage / "histories.json").read_text())
    top = 1 + params["rho"] * params["clip"]
    for name in names:
        rows = histories[name]
        assert [r["step"] for r in rows] == list(range(1, params["max_steps"] + 1))
        assert all(0 <= r["reward"] <= top + 1e-9 and r["total_tokens"] <= params["max_new_tokens"] for r in rows)
        assert (stage / f"{name}_checkpoints" / f"checkpoint-{params['max_steps']}").is_dir()
        from twlib.models import load_model
        assert load_model(stage / f"{name}_model").config.hidden_size == spec["02_trie_sft"]["hidden_size"]
    # branching off: the sequential baseline never forks, whatever it writes
    assert all(r["activation_ratio"] == 0 and r["threads_per_block"] == 0 for r in histories["grpo_sequential"])
    example = metrics["metrics"]["example"]
    assert example["trie_tokens"] <= example["expanded_tokens"] and example["scored_tokens"] > 0
    assert (stage / "rl_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    executed = nbformat.read(stage / "04_pgrpo.ipynb", as_version=4)
    assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


@pytest.mark.notebooks
def test_notebook_05_smoke(smoke_outputs):
    from twlib.grading import grade

    folder, spec = smoke_outputs
    stage = folder / "05_evaluation"
    params = spec["05_evaluation"]
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    records = {kind: [json.loads(line) for line in (stage / f"{kind}.jsonl").read_text().splitlines()]
               for kind in ("sequential", "parallel", "self_trained", "grpo_sequential", "pgrpo", "pgrpo_std")}
    test = dataset.load_parquet(folder / "01_trajectories" / "data")["test"]
    for kind, rows in records.items():
        assert [r["id"] for r in rows] == test["id"][:params["n_test"]]
        assert all(r["total_tokens"] <= params["max_new_tokens"] for r in rows)
        assert all(grade(r["response"], r["gold"]).correct == r["correct"] for r in rows)
        accuracy = sum(r["correct"] for r in rows) / len(rows)
        assert metrics["metrics"]["models"][kind]["accuracy"] == pytest.approx(accuracy)
        if kind in ("sequential", "parallel"):
            assert metrics["metrics"][f"{kind}_accuracy"] == pytest.approx(accuracy)
        format_ok = sum(r["format_correct"] for r in rows) / len(rows)
        assert metrics["metrics"]["models"][kind]["format_correct_rate"] == pytest.approx(format_ok)
    speedups = [s["total_tokens"] / p["critical_path_tokens"] for s, p in zip(records["sequential"], records["parallel"])]
    assert metrics["metrics"]["mean_speedup"] == pytest.approx(sum(speedups) / len(speedups))
    models = metrics["metrics"]["models"]
    assert set(models) == set(records)
    for kind, rows in records.items():  # every model against the sequential SFT model's tokens
        per_problem = [s["total_tokens"] / r["critical_path_tokens"] for s, r in zip(records["sequential"], rows)]
        assert models[kind]["mean_speedup"] == pytest.approx(sum(per_problem) / len(per_problem))
    for fig in ("speedup_hist.png", "accuracy_vs_latency.png", "thread_counts.png", "models.png", "adaptive_width.png"):
        assert (stage / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Per model and available width: the expression problems of the test set, counted from the questions.
    problems = [dict(r) for r in test.select(range(params["n_test"]))]
    expected = {}
    for p, r in zip(problems, records["pgrpo"]):
        if p["family"] == "expressions":
            chosen = max(r["threads_per_block"]) if r["threads_per_block"] else 1
            expected.setdefault(width.available_width(p), []).append(chosen)
    rows = {row["available width"]: row for row in metrics["metrics"]["width"] if row["model"] == "pgrpo"}
    assert set(rows) == set(expected) and {row["model"] for row in metrics["metrics"]["width"]} == set(records) - {"sequential"}
    for w, chosen in expected.items():
        assert rows[w]["problems"] == len(chosen)
        assert rows[w]["threads_chosen"] == pytest.approx(sum(chosen) / len(chosen), abs=1e-3)
    executed = nbformat.read(stage / "05_evaluation.ipynb", as_version=4)
    assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    shown = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "no load benchmark of smoke yet: python -m twlib.bench load --params params/smoke.yaml" in shown


@pytest.mark.notebooks
def test_bench_rl_on_smoke_outputs(smoke_outputs, tmp_path, capsys):
    from twlib import bench

    folder, spec = smoke_outputs
    params = tmp_path / "smoke.yaml"
    params.write_text(yaml.safe_dump(dict(spec, output_root=str(folder.parent))))
    assert bench.main(["rl", "--params", str(params)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["policy"] for r in records] == ["parallel_sft", "pgrpo"]  # the start and the end of RL
    rl = spec["04_pgrpo"]
    for record in records:
        assert record["rollouts"] == rl["prompts_per_step"] * rl["num_generations"]
        assert record["expanded_sequences"] >= record["rollouts"]
        # each rollout's trie holds its prompt once; expanded units repeat it once per engine call
        assert record["trie_tokens"] <= record["expanded_tokens"]
        assert record["trie_over_expanded"] == pytest.approx(record["trie_tokens"] / record["expanded_tokens"], abs=1e-3)
        assert record["trie_step_seconds"] > 0 and record["expanded_step_seconds"] > 0


@pytest.mark.notebooks
def test_bench_sft_on_smoke_outputs(smoke_outputs, tmp_path):
    from twlib import bench

    folder, spec = smoke_outputs
    params = tmp_path / "smoke.yaml"
    params.write_text(yaml.safe_dump(dict(spec, output_root=str(folder.parent))))
    records = list(bench.benchmark("sft")(config.load_profile(params), n_trajectories=40, steps=4, warmup=1))
    assert [r["model"] for r in records] == ["sequential", "parallel"]
    for record in records:
        assert record["trajectories"] == 40 and record["rows"] >= 1 and record["steps_timed"] == 3
        assert record["bf16_speedup"] == pytest.approx(
            record["fp32_seconds_per_step"] / record["bf16_seconds_per_step"], rel=0.01)
        # same initialisation and rows: bf16 autocast moves the first loss by rounding only
        fp32, bf16 = record["fp32_first_losses"], record["bf16_first_losses"]
        assert len(fp32) == len(bf16) == 3
        assert fp32[0] == pytest.approx(bf16[0], rel=0.02)
