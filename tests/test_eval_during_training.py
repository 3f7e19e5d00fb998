"""Evaluation during training: eval_* metrics at every eval_steps-th step, equal to what
`mlx-grpo eval` gives for that step's adapter; training unchanged by it; the best adapter
kept by an eval metric, across a resume too."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_refused, cli_flags, run_cli

from mlx_grpo.core.trainer import train
from mlx_grpo.tasks.toy import write_toy_task
from mlx_grpo.tools.evaluate import evaluate

VOLATILE = ("time/", "memory/", "peak_memory_gb", "tokens_per_second")


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    return write_toy_task(tmp_path_factory.mktemp("heldout") / "eval.jsonl", rows=6, seed=1)


@pytest.fixture
def settings(quick_settings, eval_data):
    return {**quick_settings, "eval_data": str(eval_data), "show_progress": False}


def records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_eval_rows_come_at_every_eval_steps_th_step_and_match_the_eval_command(settings):
    out = Path(settings["output_dir"])
    run = {**settings, "max_steps": 5, "eval_steps": 2, "save_steps": 4, "save_total_limit": 5}
    steps = train(**run).metrics
    with_eval = [m["step"] for m in steps if "eval_reward" in m]
    assert with_eval == [2, 4]
    assert [r["step"] for r in records(out) if "eval_reward" in r] == [2, 4]
    assert all("time/eval" in m for m in steps if "eval_reward" in m)
    last = steps[3]
    for key in ("eval_accuracy", "eval_rewards/allowed_share/mean", "eval_completions/mean_length"):
        assert key in last
    # The same prompts through `mlx-grpo eval` on step 4's checkpoint: the same figures.
    checkpoint = out / "checkpoints" / "step-000004"
    result = evaluate(
        settings["model"],
        settings["eval_data"],
        settings["rewards"],
        adapter=checkpoint,
        max_completion_length=settings["max_completion_length"],
        show_progress=False,
    )
    figures = result.summary["all"]
    assert last["eval_reward"] == pytest.approx(figures["mean_reward"], abs=1e-6)
    assert last["eval_accuracy"] == pytest.approx(figures["accuracy"])
    assert last["eval_rewards/allowed_share/mean"] == pytest.approx(figures["allowed_share"])
    assert last["eval_completions/clipped_ratio"] == pytest.approx(figures["truncated"])
    assert "eval_pass@1" not in last  # one greedy completion per prompt


def test_evaluating_changes_nothing_in_training(settings, tmp_path):
    sampled = {"eval_steps": 1, "eval_samples": 3, "eval_temperature": 1.0}
    plain = {k: v for k, v in settings.items() if k != "eval_data"}
    a = train(**{**plain, "output_dir": str(tmp_path / "a"), "max_steps": 3}).metrics
    b = train(**{**settings, **sampled, "output_dir": str(tmp_path / "b"), "max_steps": 3}).metrics
    wa = weights(tmp_path / "a" / "adapters.safetensors")
    wb = weights(tmp_path / "b" / "adapters.safetensors")
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    for ma, mb in zip(a, b):
        trained = {k: v for k, v in ma.items() if not k.startswith(VOLATILE)}
        assert trained == {k: v for k, v in mb.items() if k in trained}
        assert {"eval_pass@1", "eval_pass@3"} <= set(mb)
        assert 0.0 <= mb["eval_pass@1"] <= mb["eval_pass@3"] <= 1.0


def test_keep_best_holds_the_adapter_of_the_best_eval_step(settings):
    out = Path(settings["output_dir"])
    best_settings = {
        **settings,
        "max_steps": 4,
        "eval_steps": 1,
        "save_steps": 1,
        "save_total_limit": 10,
        "keep_best": "eval_reward",
        "learning_rate": 0.05,  # big steps: the held-out reward moves
    }
    steps = train(**best_settings).metrics
    values = [m["eval_reward"] for m in steps]
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["metric"] == "eval_reward"
    assert best["value"] == pytest.approx(max(values))
    assert best["step"] == 1 + values.index(max(values))
    kept = weights(out / "best" / "adapters.safetensors")
    at_step = weights(out / "checkpoints" / f"step-{best['step']:06d}" / "adapters.safetensors")
    assert kept.keys() == at_step.keys()
    for k in kept:
        np.testing.assert_array_equal(kept[k], at_step[k])


def test_keep_best_resumes_with_the_best_value_so_far(settings, tmp_path):
    best_settings = {
        **settings,
        "eval_steps": 1,
        "save_steps": 2,
        "keep_best": "eval_reward",
        "learning_rate": 0.05,
    }
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(**{**best_settings, "output_dir": str(whole), "max_steps": 4})
    train(**{**best_settings, "output_dir": str(resumed), "max_steps": 2})
    train(resume=resumed, max_steps=4, show_progress=False)
    assert (whole / "best" / "best.json").read_text() == (
        resumed / "best" / "best.json"
    ).read_text()
    wa, wb = (
        weights(whole / "best" / "adapters.safetensors"),
        weights(resumed / "best" / "adapters.safetensors"),
    )
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])


@pytest.mark.parametrize(
    "changes, phrases",
    [
        ({"keep_best": "eval_reward", "eval_data": None}, ["keep_best needs an evaluation"]),
        ({"keep_best": "reward"}, ["keep_best must name an eval metric"]),
        ({"keep_best": "eval_pass@4"}, ["keep_best 'eval_pass@4' is not a metric", "eval_reward"]),
        ({"eval_samples": 4}, ["eval_samples=4 needs sampling"]),
    ],
    ids=["no-eval-data", "not-eval", "unknown-metric", "greedy-samples"],
)
def test_evaluation_settings_that_cannot_work_are_refused(settings, changes, phrases):
    chosen = {k: v for k, v in {**settings, **changes}.items() if v is not None}
    assert_refused(run_cli("train", *cli_flags(chosen)), *phrases)
    assert not Path(settings["output_dir"]).exists()
