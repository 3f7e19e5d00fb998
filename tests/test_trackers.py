"""--report-to: the step metrics in TensorBoard and W&B, the same values as metrics.jsonl."""

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import cli_flags

from mlx_grpo.cli import main
from mlx_grpo.core import trackers
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.trainer import train
from mlx_grpo.core.values import SettingError


def logged(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step" in r and "event" not in r]


def test_tensorboard_holds_every_step_metric_of_metrics_jsonl(quick_settings, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(
        **{**quick_settings, "output_dir": str(out), "max_steps": 3, "report_to": ["tensorboard"]}
    )
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    records = logged(out)
    assert len(records) == 3
    for key in ("reward", "loss", "entropy", "grad_norm", "num_tokens"):
        series = events.Tensors(f"train/{key}")  # TensorBoard's own scalar summaries
        assert [e.step for e in series] == [r["step"] for r in records]
        values = [float(make_ndarray(e.tensor_proto)) for e in series]
        assert values == pytest.approx([r[key] for r in records], rel=1e-6)


class FakeWandb(types.ModuleType):
    """Records the calls of W&B's documented API: init(...) -> run; run.log; run.finish."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake = self

        class Run:
            def log(self, metrics, step):
                fake.calls.append(("log", metrics, step))

            def finish(self):
                fake.calls.append(("finish",))

        return Run()


def test_wandb_gets_each_step_under_its_step_and_the_run_settings(
    quick_settings, tmp_path, monkeypatch
):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    train(**{**quick_settings, "output_dir": str(out), "max_steps": 2, "report_to": ["wandb"]})
    (init, config), *logs, finish = fake.calls
    assert init == "init" and finish == ("finish",)
    assert config["config"]["max_steps"] == 2 and config["name"] == "run"
    records = logged(out)
    assert [step for _, _, step in logs] == [r["step"] for r in records]
    for (_, metrics, _), record in zip(logs, records):
        assert metrics["train/reward"] == pytest.approx(record["reward"])
        assert "train/step" not in metrics


def test_eval_metrics_go_under_eval_and_the_rest_under_train():
    record = {"step": 3, "reward": 0.5, "eval_reward": 0.25, "eval_pass@2": 1, "note": None}
    assert trackers.scalars(record) == {
        "train/reward": 0.5,
        "eval/reward": 0.25,
        "eval/pass@2": 1.0,
    }


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(
    quick_settings, tmp_path, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else real(name, *a),
    )
    with pytest.raises(SettingError, match=r'pip install "mlx-grpo\[wandb\]"'):
        TrainConfig(report_to=["wandb"])
    with pytest.raises(SettingError, match="tensorboard, wandb"):
        TrainConfig(report_to=["mlflow"])
    out = tmp_path / "run"
    args = cli_flags({**quick_settings, "output_dir": out, "report_to": ["wandb"]})
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 2 and "mlx-grpo[wandb]" in result.output
    assert "Traceback" not in result.output and not out.exists()
