"""Experiment trackers for the step metrics, through the trackers' own packages (optional).

`--report-to tensorboard` writes the run folder's `tensorboard/` with
TensorBoard's framework-free `tensorboard.summary.Writer`; `--report-to
wandb` logs to a Weights & Biases run (project from WANDB_PROJECT, default
mlx-grpo; offline with WANDB_MODE=offline). Both get every numeric metric
of metrics.jsonl under `train/<name>` at its step (the evaluation's
`eval_<name>` under `eval/<name>`), as transformers' callbacks name TRL's.
metrics.jsonl is written either way.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Protocol

# tracker -> (module to import, pip extra)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
TRACKERS = tuple(PACKAGES)


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def missing(names: list[str]) -> list[str]:
    """The install command for each named tracker whose package is absent."""
    return [
        f'pip install "mlx-grpo[{PACKAGES[n][1]}]"'
        for n in names
        if n in PACKAGES and importlib.util.find_spec(PACKAGES[n][0]) is None
    ]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers (not the step), under train/<name> or eval/<name>."""
    return {
        f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}": float(v)
        for k, v in record.items()
        if k != "step"
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


class TensorBoard:
    def __init__(self, output_dir: Path, config: dict[str, Any]):
        from tensorboard.summary import Writer

        self.writer = Writer(str(output_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, output_dir: Path, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mlx-grpo"),
            name=output_dir.name,
            dir=str(output_dir),
            config=config,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": TensorBoard, "wandb": WandB}


def open_trackers(names: list[str], output_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    return [OPENERS[name](output_dir, config) for name in names]
