"""One metrics path: each step's dict goes to metrics.jsonl, the progress bar and stdout."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mlx_grpo.objective import Advantages, nanstd

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
REWARD_ERRORS_FILE = "reward_errors.jsonl"
CONFIG_FILE = "config.yaml"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value reads better than a crash
    return value


def clean_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """A metrics dict as written to metrics.jsonl (NaN and Inf become None)."""
    return {k: _clean(v) for k, v in metrics.items()}


def rewrite_logs(output_dir: Path, metrics: list[dict[str, Any]], step: int) -> None:
    """Set a run's logs back to step `step`: its metrics, and records of steps <= `step`.

    Used on resume, so the logs read as if the run had never stopped.
    """
    _replace(output_dir / METRICS_FILE, [json.dumps(m) for m in metrics])
    for name in (COMPLETIONS_FILE, REWARD_ERRORS_FILE):
        path = output_dir / name
        if path.exists():
            lines = path.read_text().splitlines()
            _replace(path, [x for x in lines if x.strip() and json.loads(x)["step"] <= step])


def _replace(path: Path, lines: list[str]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in lines))
    partial.replace(path)


class Reporter:
    """Writes step metrics and completion samples; shows a progress bar.

    A reporter that is not `enabled` (the other processes of a distributed
    run) writes and shows nothing.
    """

    def __init__(
        self,
        output_dir: Path,
        total_steps: int | None,
        show_progress: bool = True,
        initial: int = 0,
        enabled: bool = True,
    ):
        self.output_dir = output_dir
        self.enabled = enabled
        self.metrics_file = open(output_dir / METRICS_FILE, "a") if enabled else None
        self.samples_file = open(output_dir / COMPLETIONS_FILE, "a") if enabled else None
        self.bar = tqdm(
            total=total_steps,
            initial=initial,
            disable=not (show_progress and enabled),
            unit="step",
            dynamic_ncols=True,
        )

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = clean_record(metrics)
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        shown = {"reward": "reward", "loss": "loss", "kl": "kl", "completions/mean_length": "len"}
        self.bar.set_postfix(
            {short: f"{metrics[k]:.4g}" for k, short in shown.items() if metrics.get(k) is not None}
        )
        self.bar.update(1)

    def samples(self, step: int, rows: list[dict[str, Any]], show: int = 1) -> None:
        """Record completions of this step; print the first `show` of them."""
        if not self.enabled:
            return
        for row in rows:
            self.samples_file.write(json.dumps({"step": step, **row}) + "\n")
        self.samples_file.flush()
        for row in rows[:show]:
            prompt = (
                row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
            )
            rewards = ", ".join(f"{k}={_fmt(v)}" for k, v in row["rewards"].items())
            self.write(
                f"--- step {step} | {rewards} | advantage {row['advantage']:+.3f}\n"
                f"prompt: {_short(prompt)}\ncompletion: {_short(row['completion'], 400)}"
            )

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.metrics_file.close()
            self.samples_file.close()


def _fmt(v: float | None) -> str:
    return "None" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _short(text: str, limit: int = 200) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reward_metrics(
    names: list[str], per_func: np.ndarray, adv: Advantages
) -> dict[str, float | None]:
    """TRL's reward statistics of one step; NaN rows (None rewards) are skipped."""
    with np.errstate(all="ignore"):
        out = {
            "reward": float(np.nanmean(adv.rewards)) if np.any(~np.isnan(adv.rewards)) else None,
            "reward_std": float(nanstd(adv.rewards)),
            "frac_reward_zero_std": float(np.mean(np.isclose(adv.std, 0.0))),
        }
        for k, name in enumerate(names):
            col = per_func[:, k]
            scorable = np.any(~np.isnan(col))
            out[f"rewards/{name}/mean"] = float(np.nanmean(col)) if scorable else None
            out[f"rewards/{name}/std"] = float(nanstd(col))
    return out


def length_metrics(lengths: list[int], truncated: list[bool]) -> dict[str, float]:
    """Completion lengths; `clipped_ratio` is the share that hit the length limit."""
    lengths = np.array(lengths, dtype=np.float64)
    truncated = np.array(truncated, dtype=bool)
    terminated = lengths[~truncated]
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(truncated.mean()),
        "completions/mean_terminated_length": float(terminated.mean()) if terminated.size else 0.0,
    }
