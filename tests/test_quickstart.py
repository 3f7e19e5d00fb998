"""The main job end to end on the real SmolLM2-135M-Instruct, for a few steps."""

import json
import shlex
from pathlib import Path

import pytest
from conftest import run_cli

from mlx_grpo.core.outputs import kind_of
from mlx_grpo.tasks.quickstart import next_steps, report, run_quickstart


def test_main_job_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "paper.md").write_text("draft")
    with pytest.raises(ValueError, match="paper.md.*was not written by mlx-grpo"):
        run_quickstart(tmp_path, minutes=0.1, show_progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["paper.md"]
    assert (tmp_path / "paper.md").read_text() == "draft"


@pytest.mark.slow
def test_main_job_evaluates_trains_exports_and_plots(tmp_path):
    summary = run_quickstart(
        tmp_path, minutes=5, n_train=32, n_test=10, max_steps=2, show_progress=False
    )
    assert summary["steps"] == 2
    for when in ("before", "after"):
        records = [
            json.loads(x) for x in (tmp_path / f"eval_{when}.jsonl").read_text().splitlines()
        ]
        assert len(records) == 10 and all(r["completion"].strip() for r in records)
        figures = summary[when]
        assert figures["add1"]["prompts"] == 5 and figures["add2"]["prompts"] == 5
        assert 0.0 <= figures["all"]["accuracy"] <= 1.0
    # The base model computes most small sums; an exact answer needs value and format.
    assert summary["before"]["add1"]["arithmetic"] > 0.5
    before = summary["before"]["all"]
    assert before["accuracy"] <= min(before["arithmetic"], before["equation_format"])

    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(0.0 <= m["reward"] <= 1.0 for m in metrics)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["r"] == 16 and len(config["target_modules"]) == 7
    assert (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size > 1e6
    assert "SmolLM2" in (tmp_path / "peft" / "README.md").read_text()
    png = (tmp_path / "run" / "training.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert "add1" in report(summary)
    assert kind_of(tmp_path) == "quickstart" and kind_of(tmp_path / "peft") == "peft"

    # The closing summary: every output it names exists, and its eval command runs as printed.
    text = next_steps(summary)
    listed = text.split("Next:")[0].splitlines()[1:]
    assert len(listed) == len(summary["outputs"])
    for line in listed:
        assert Path(line.split()[-1]).exists(), line
    command = next(line for line in text.splitlines() if line.strip().startswith("mlx-grpo eval"))
    result = run_cli(*shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert f"change from {tmp_path / 'eval_before.jsonl'}" in result.output

    again = run_quickstart(  # a rerun replaces the run and the export in its own folder
        tmp_path, minutes=5, n_train=32, n_test=10, max_steps=1, show_progress=False
    )
    assert again["steps"] == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
