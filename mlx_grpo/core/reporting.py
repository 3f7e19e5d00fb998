"""One metrics path: each step's dict goes to metrics.jsonl and the progress display."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_grpo.core.advantages import Advantages, nanstd
from mlx_grpo.core.files import read_text
from mlx_grpo.core.progress import Progress
from mlx_grpo.core.runfolder import disk_full, is_disk_full, open_append, open_new, refuse_symlinks
from mlx_grpo.core.trackers import Tracker, scalars

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
REWARD_ERRORS_FILE = "reward_errors.jsonl"
CONFIG_FILE = "config.yaml"
LOG_FILES = (METRICS_FILE, COMPLETIONS_FILE, REWARD_ERRORS_FILE)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value reads better than a crash
    return value


def clean_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """A metrics dict as written to metrics.jsonl (NaN and Inf become None)."""
    return {k: _clean(v) for k, v in metrics.items()}


def rewrite_logs(output_dir: Path, metrics: list[dict[str, Any]], step: int) -> list[str]:
    """Set a run's logs back to step `step`: its metrics, and records of steps <= `step`.

    Used on resume, so the logs read as if the run had never stopped (the
    records of restarts up to `step`, `"event"` in supervise.py, stay). A
    last line cut short (the process was killed while writing it) is dropped;
    returns a warning for each such line. Any other line that is not a JSON
    record is refused with its file and line number.
    """
    output_dir = Path(output_dir)
    refuse_symlinks(output_dir, LOG_FILES)
    notes, events = [], []
    for name in LOG_FILES:
        path = output_dir / name
        records, note = read_log(path)
        notes += [note] if note else []
        if name != METRICS_FILE and path.exists():
            _replace(path, [json.dumps(r) for r in records if r["step"] <= step])
        elif name == METRICS_FILE:
            events = [r for r in records if "event" in r and r["step"] <= step]
    # The metrics come from the checkpoint, which holds every step up to `step`; a restart
    # at step k goes after step k's record.
    lines = sorted([*metrics, *events], key=lambda r: (r["step"], "event" in r))
    _replace(output_dir / METRICS_FILE, [json.dumps(r) for r in lines])
    return notes


def check_logs(output_dir: Path) -> list[str]:
    """Read a run's logs as `rewrite_logs` will (writes nothing); its warnings, or ValueError."""
    refuse_symlinks(output_dir, LOG_FILES)
    notes = [read_log(output_dir / name)[1] for name in LOG_FILES]
    return [note for note in notes if note]


def read_log(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The step records of a run's JSON-lines log, and a warning when its last line was cut short.

    A last line that is not JSON (a kill mid-write) is left out; any other
    line that is not a JSON object with an integer `step` is refused with its
    file and line number.
    """
    if not path.exists():
        return [], None
    lines = read_text(path, "it is not a log mlx-grpo wrote").rstrip().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                return records, (
                    f"warning: dropped the last line of {path} (line {number}), cut short when "
                    "the run stopped while writing it"
                )
            raise ValueError(
                f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}); the "
                "file was edited or damaged: repair or delete that line."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            got = type(record).__name__ if not isinstance(record, dict) else "one with no step"
            raise ValueError(
                f"{path}, line {number}: expected a JSON object of metrics with an integer "
                f"'step', got {got}; repair or delete that line."
            )
        records.append(record)
    return records, None


def _replace(path: Path, lines: list[str]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)  # a symlink left there is removed, not written through
    try:
        with open_new(partial) as f:
            f.write("".join(line + "\n" for line in lines))
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        if is_disk_full(exc):
            kept = "The checkpoints and the other logs are intact."
            raise disk_full("the logs", path, kept, _resume_hint(path.parent)) from None
        raise


class Reporter:
    """Writes step metrics and completion samples; shows the run's progress.

    A reporter that is not `enabled` (the other processes of a distributed
    run) writes and shows nothing. `mode` and `every` choose the display; see `Progress`.
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        max_steps: int,
        max_minutes: float | None = None,
        start_step: int = 0,
        mode: str = "auto",
        every: int = 1,
        enabled: bool = True,
        trackers: list[Tracker] | None = None,
    ):
        # First, so a bad mode is refused before any file is opened.
        self.progress = Progress(
            mode if enabled else "off", max_steps, max_minutes, start_step, every
        )
        self.output_dir = output_dir
        self.enabled = enabled
        self.metrics_file = open_append(output_dir / METRICS_FILE) if enabled else None
        self.samples_file = open_append(output_dir / COMPLETIONS_FILE) if enabled else None
        self.trackers = trackers or []  # TensorBoard, W&B (trackers.py)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = clean_record(metrics)
        with self._writing(f"the metrics of step {metrics.get('step')}", METRICS_FILE):
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if "step" in record:
            for tracker in self.trackers:
                tracker.log(scalars(record), int(record["step"]))
        self.progress.update(metrics.get("step"), metrics.get("time/step"), metrics.get("reward"))

    def samples(self, step: int, rows: list[dict[str, Any]], show: int = 1) -> None:
        """Record completions of this step; print the first `show` of them."""
        if not self.enabled:
            return
        with self._writing(f"the completions of step {step}", COMPLETIONS_FILE):
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

    @contextmanager
    def _writing(self, what: str, name: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            kept = "The checkpoints already written are intact."
            where = self.output_dir / name
            raise disk_full(what, where, kept, _resume_hint(self.output_dir)) from None

    def write(self, text: str) -> None:
        if self.enabled:
            self.progress.above(text)

    def close(self) -> None:
        self.progress.close()
        for tracker in self.trackers:
            tracker.close()
        if self.enabled:
            for f in (self.metrics_file, self.samples_file):
                try:
                    f.close()
                except OSError as exc:  # a line still buffered on a full disk: already reported
                    if not is_disk_full(exc):
                        raise


def _resume_hint(output_dir: Path) -> str:
    return f"continue with `mlx-grpo train --resume {output_dir}`"


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


class PhaseTimer:
    """Seconds and peak memory of a step's phases, as `time/<phase>` and `memory/<phase>_gb`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}
        self.peaks: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        mx.reset_peak_memory()  # so the peak is this phase's
        started = time.perf_counter()
        yield
        # a phase that runs several times (rollout rounds) adds up, its peak the highest
        key = f"time/{name}"
        self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - started
        key = f"memory/{name}_gb"
        self.peaks[key] = max(self.peaks.get(key, 0.0), mx.get_peak_memory() / 1e9)

    def metrics(self, completion_tokens: int) -> dict[str, float]:
        """The step's timing and memory metrics; `time/step` includes any wait for other
        processes."""
        return {
            "tokens_per_second": completion_tokens / max(self.times["time/rollout"], 1e-9),
            **self.times,
            "time/step": time.perf_counter() - self.start,
            "peak_memory_gb": max(self.peaks.values()),
            **self.peaks,
        }


def sample_records(
    prompt: Any,
    texts: list[str],
    names: list[str],
    per_func: np.ndarray,
    advantages: np.ndarray,
    extra: dict[str, list[Any]],
) -> list[dict[str, Any]]:
    """completions.jsonl records of one group: its prompt, completions, rewards, advantages
    and the columns reward functions added with `log_extra`."""
    return [
        {
            "prompt": prompt,
            "completion": text,
            "rewards": {name: _clean(float(per_func[i, k])) for k, name in enumerate(names)},
            "advantage": float(advantages[i]),
            **{column: values[i] for column, values in extra.items()},
        }
        for i, text in enumerate(texts)
    ]
