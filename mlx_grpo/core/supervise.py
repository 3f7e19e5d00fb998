"""--auto-resume: train in a child process and restart it from its checkpoint when it dies.

Long MLX runs on Macs die of Metal out-of-memory errors and of the GPU
watchdog; other crashes happen too. The supervisor starts the run as a
child process; when the child dies of such an error, or of any crash once a
checkpoint exists, it starts it again with `--resume`, up to N times. A run
that ends, is stopped by the user (Ctrl-C, SIGTERM), stops itself
(non-finite updates) or was given bad input is not restarted. Each restart
is a record in metrics.jsonl ({"step", "event": "restart", ...}), which
resumes keep. A resumed run equals an uninterrupted one, so the final
adapter does too. After a memory error the next try gets a smaller memory
plan: a budget of 80% of the estimated peak the dead try planned for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_grpo.core import checkpoint
from mlx_grpo.core.reporting import CONFIG_FILE, METRICS_FILE

# The child writes its memory plan's estimated peak here when it has one, and what stopped
# it (JSON: {"plan_peak": bytes, "error": type name, "message": ...}).
FAILURE_FILE_ENV = "MLX_GRPO_FAILURE_FILE"
USER_ERROR = 2  # the CLI's exit code for bad input
_MEMORY = ("out of memory", "unable to allocate", "insufficient memory", "outofmemory")
SHRINK = 0.8  # after a memory error, the next budget as a share of the last plan's peak
_GPU = ("gpu timeout", "impactinginteractivity", "command buffer execution failed")


@dataclass(frozen=True)
class Outcome:
    """How a child run ended: its exit code (negative: killed by that signal) and the error
    it reported, if it reported one."""

    returncode: int
    error: str | None = None  # exception type name
    message: str = ""
    plan_peak: int | None = None  # bytes: the estimated peak of the child's memory plan


def cause(outcome: Outcome) -> str | None:
    """Why a child died, when a restart may help: "memory", "gpu" or "crash"; None when it
    ended, was stopped, stopped itself or was given bad input (restarting would not help)."""
    code, text = outcome.returncode, outcome.message.lower()
    if code == 0 or code == USER_ERROR or code >= 128:  # 128 + n: stopped by signal n, saved
        return None
    if any(pattern in text for pattern in _MEMORY):
        return "memory"
    if any(pattern in text for pattern in _GPU):
        return "gpu"
    if code < 0:  # killed by a signal: the kernel's OOM killer, an abort, SIGKILL
        return "crash"
    if outcome.error in ("TrainingStopped", "PeerLost") or outcome.error is None:
        return None  # exit 1 without an unexpected error: the run stopped itself
    return "crash"


def describe(outcome: Outcome) -> str:
    if outcome.returncode < 0:
        try:
            name = signal.Signals(-outcome.returncode).name
        except ValueError:
            name = f"signal {-outcome.returncode}"
        return f"killed by {name}"
    return f"{outcome.error}: {outcome.message}" if outcome.error else f"exit {outcome.returncode}"


def supervise(
    launch: Callable[[str, int | None], Outcome],
    output_dir: Path,
    restarts: int,
    say: Callable[[str], None],
) -> int:
    """Run `launch(how, max_memory)` until it ends, restarting it up to `restarts` times;
    its exit code.

    `how` is "start" (the run as asked), "resume" (from `output_dir`'s newest
    checkpoint) or "again" (from the start, over the folder the first try
    began: only after a memory or GPU error before any checkpoint).
    `max_memory` is None (the run's own budget) or, after a memory error, a
    budget in bytes below the plan the dead try made.
    """
    started, how, done, budget = time.time(), "start", 0, None
    while True:
        outcome = launch(how, budget)
        why = cause(outcome)
        if why is None:
            return outcome.returncode
        step = _newest(output_dir)
        if step is None and why == "crash":
            say(f"the run died ({describe(outcome)}) before its first checkpoint: not restarted")
            return max(outcome.returncode, 1)
        if done == restarts:
            say(f"the run died ({describe(outcome)}); no restart left of --auto-resume {restarts}")
            return max(outcome.returncode, 1)
        done += 1
        record_restart(output_dir, step or 0, done, restarts, why, describe(outcome))
        where = f"its checkpoint at step {step}" if step is not None else "the start"
        if why == "memory" and outcome.plan_peak:
            budget = int(SHRINK * outcome.plan_peak)
            where += f", with a smaller memory plan (max_memory {budget / 1e9:.2f} GB)"
        say(f"auto-resume {done}/{restarts}: the run died ({describe(outcome)}); from {where}")
        if step is not None:
            how = "resume"
        else:  # no checkpoint yet
            how = "again" if _began(output_dir, started) else "start"


def _newest(output_dir: Path) -> int | None:
    """The step of the run's newest usable checkpoint; None when it has none (or none that a
    resume would take: a symlinked checkpoints folder is refused there too)."""
    try:
        return checkpoint.latest(output_dir).step
    except ValueError:  # CheckpointError, SymlinkRefused
        return None


def _began(output_dir: Path, since: float) -> bool:
    """Whether a run was set up in `output_dir` after `since` (its config.yaml written)."""
    config = Path(output_dir) / CONFIG_FILE
    return config.is_file() and config.stat().st_mtime >= since - 1


def record_restart(
    output_dir: Path, step: int, number: int, restarts: int, why: str, what: str
) -> None:
    """Append a restart record to the run's metrics.jsonl."""
    record: dict[str, Any] = {
        "step": step,
        "event": "restart",
        "restart": number,
        "of": restarts,
        "cause": why,
        "error": what,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = Path(output_dir) / METRICS_FILE
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):  # a line cut short by the kill
        text = text[: text.rfind("\n") + 1]
    path.write_text(text + json.dumps(record) + "\n")


def report_failure(error: BaseException) -> None:
    """In a supervised child, write what stopped it for the supervisor (no-op otherwise)."""
    _report({"error": type(error).__name__, "message": str(error)})


def report_plan(peak: int) -> None:
    """In a supervised child, tell the supervisor the memory plan's estimated peak."""
    _report({"plan_peak": peak})


def _report(fields: dict[str, Any]) -> None:
    where = os.environ.get(FAILURE_FILE_ENV)
    if where:
        path = Path(where)
        known = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**known, **fields}))


def run_child(cli_args: list[str]) -> Outcome:
    """`mlx-grpo CLI_ARGS` in a child process, its stderr passed through; how it ended.

    Ctrl-C reaches the child too (it saves a checkpoint and exits) and we wait
    for it; a SIGTERM sent to us is passed on, with the same effect.
    """
    with tempfile.TemporaryDirectory() as tmp:
        failure = Path(tmp) / "failure.json"
        env = {**os.environ, FAILURE_FILE_ENV: str(failure)}
        command = [sys.executable, "-m", "mlx_grpo.cli", *cli_args]
        child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
        before = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        try:
            tail = _pass_through(child.stderr.fileno())
            code = _wait(child)
        finally:
            signal.signal(signal.SIGTERM, before)
        report = json.loads(failure.read_text()) if failure.is_file() else {}
    message = report.get("message", "") + "\n" + tail.decode(errors="replace")
    return Outcome(code, report.get("error"), message, report.get("plan_peak"))


def _pass_through(fd: int) -> bytes:
    """Copy the child's stderr to ours until it closes; its last 8 KB."""
    tail = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except KeyboardInterrupt:
            continue
        if not chunk:
            return tail
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-8192:]


def _wait(child: subprocess.Popen) -> int:
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue
