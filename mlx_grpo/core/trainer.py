"""The GRPO-LoRA training loop: rollout -> rewards -> advantages -> updates -> metrics.

Each step takes B prompts, samples G completions of each in one batch,
scores them with the reward functions, and turns the rewards into group
advantages. pi_old log-probs are taken once after generation when more than
one pass runs over the rollout (mu > 1); the reference log-probs come from
the same model with the adapters switched off, and only when beta != 0.
Each of the mu passes accumulates gradients over the micro-batches and
makes one AdamW update. The math lives in objective.py; data-parallel runs
over several processes are described in distributed.py.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mlx_grpo.core import checkpoint, reward_calls
from mlx_grpo.core import rewards as rewards_mod
from mlx_grpo.core.adapters import Adapter
from mlx_grpo.core.config import TrainConfig, resolve
from mlx_grpo.core.distributed import PeerLost, connect
from mlx_grpo.core.interrupts import Interrupted, finishing, stop_on_signals
from mlx_grpo.core.objective import group_advantages
from mlx_grpo.core.reporting import (
    REWARD_ERRORS_FILE,
    Reporter,
    clean_record,
    length_metrics,
    reward_metrics,
)
from mlx_grpo.core.rollout import Noise, SamplingSettings, rollout
from mlx_grpo.core.runfolder import DiskFull, disk_full, is_disk_full, open_append
from mlx_grpo.core.setup import Run, next_prompts, setup, snapshot, summary
from mlx_grpo.core.update import lr_at, micro_batches, optimise


@dataclass
class TrainResult:
    output_dir: Path
    metrics: list[dict[str, Any]]
    rank: int = 0  # of this process in a distributed run; only process 0 wrote files


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite updates); its last good state is saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(
    config: TrainConfig | str | Path | None = None,
    *,
    reward_funcs: list[Callable] | None = None,
    show_progress: bool = True,
    resume: str | Path | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a LoRA adapter with GRPO; return the output directory and metrics.

    `config` is a TrainConfig or a YAML path; keyword overrides win over it.
    `reward_funcs` adds Python callables (TRL signature) after the named
    rewards; `reward_weights` then covers both, in that order. Given alone
    (no `rewards`, no config), the callables are the only rewards.

    `resume` continues the run in that output directory from its newest
    checkpoint, with the settings it started with (`overrides` may change
    only `checkpoint.RESUMABLE` ones, e.g. max_steps). The result equals an
    uninterrupted run's. Ctrl-C or SIGTERM saves a checkpoint and raises
    TrainingInterrupted; any other error saves one too before propagating.

    Example:
        >>> import mlx_grpo
        >>> def short(prompts, completions, completion_ids, **kw):
        ...     return [-len(c) / 100 for c in completions]
        >>> result = mlx_grpo.train(model="Qwen/Qwen3-0.6B", data="train.jsonl",
        ...                         rewards=["math_answer"], reward_funcs=[short],
        ...                         max_steps=50, output_dir="runs/demo")
        >>> result.metrics[-1]["reward"]
        >>> mlx_grpo.train(resume="runs/demo", max_steps=100)  # 50 more steps
    """
    peers = connect()  # several processes when started by mlx.launch
    settings = None
    if peers.main:  # the others take process 0's settings: a resumed run's are on its disk
        settings = _settings(config, reward_funcs, resume, overrides).to_dict()
    cfg = resolve(None, **peers.broadcast_json(settings, "the settings"))
    peers.timeout = cfg.distributed_timeout
    run = setup(cfg, reward_funcs or [], resume=resume is not None, peers=peers)
    try:  # the run folder stays locked until here
        # A time limit makes the step count unknown: show elapsed time and rate instead.
        total = None if cfg.max_minutes else cfg.max_steps
        reporter = Reporter(run.output_dir, total, show_progress, run.step, enabled=peers.main)
        reporter.write(summary(run))
        if resume is not None:
            reporter.write(_resumed(run))
        try:
            with stop_on_signals():
                _loop(run, reporter)
        finally:
            reporter.close()
            peers.on_timeout = None
    finally:
        run.release()
    return TrainResult(run.output_dir, run.history, peers.rank)


def _settings(
    config: TrainConfig | str | Path | None,
    reward_funcs: list[Callable] | None,
    resume: str | Path | None,
    overrides: dict[str, Any],
) -> TrainConfig:
    if resume is not None:
        return checkpoint.resume_settings(resume, config, overrides)
    if reward_funcs and config is None and "rewards" not in overrides:
        overrides["rewards"] = []  # callables alone, not the default math_answer too
    if isinstance(config, TrainConfig):
        return resolve(None, **{**config.to_dict(), **overrides})
    return resolve(config, **overrides)


def _loop(run: Run, reporter: Reporter) -> None:
    """Steps until max_steps or max_minutes; checkpoints; saving on every way out."""
    cfg = run.cfg
    run.last = snapshot(run)
    # A process that waited too long for the others saves what it has before exiting.
    run.peers.on_timeout = lambda: _save_checkpoint(run, run.last)
    started = time.perf_counter()
    try:
        for step in range(run.step, cfg.max_steps):
            metrics, samples = train_step(run, step)
            run.last = snapshot(run)  # before the logs show the step, so a save includes it
            reporter.log(metrics)
            if step % cfg.logging_steps == 0:
                reporter.samples(step + 1, samples)
            if cfg.save_steps and run.step % cfg.save_steps == 0:
                _save_checkpoint(run, run.last)
            if run.bad_updates >= cfg.max_nonfinite_updates:
                raise TrainingStopped(
                    f"{run.bad_updates} updates in a row had a NaN or Inf loss or gradient "
                    f"(up to step {run.step}); none was applied, so the adapter holds its last "
                    "finite weights. Lower learning_rate, check the rewards and data for extreme "
                    f"values, then continue with `mlx-grpo train --resume {run.output_dir}`."
                )
            out_of_time = cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes
            if cfg.max_minutes and run.peers.any(bool(out_of_time), "the time limit"):
                reporter.write(f"stopping after {step + 1} steps: {cfg.max_minutes:g} minutes")
                break
        _save_checkpoint(run, run.last)
        if run.peers.main:
            _save(run)
    except Interrupted as exc:
        where = _save_checkpoint(run, run.last)
        raise TrainingInterrupted(
            f"{exc} received: stopped after step {run.last.step}; {where}. "
            f"Resume with: {_resume_command(run)}",
            exc.exit_code,
        ) from None
    except PeerLost as exc:
        with finishing():  # mlx.launch signals the other processes as well
            where = _save_checkpoint(run, run.last)
        raise TrainingStopped(
            f"{exc} Stopped after step {run.last.step}; {where}. Once every process can run "
            f"again, resume with: {_resume_command(run)}"
        ) from None
    except BaseException:
        with finishing():
            reporter.write(f"run stopped by an error; {_save_checkpoint(run, run.last)}")
        raise


def _resume_command(run: Run) -> str:
    command = f"mlx-grpo train --resume {run.output_dir}"
    return command if run.peers.size == 1 else f"mlx.launch <same hosts> -- {command}"


def _save_checkpoint(run: Run, snap: checkpoint.Snapshot) -> str:
    """Write `snap` unless it is already on disk; say where the progress is.

    Only process 0 of a distributed run writes (every process holds the same state).
    """
    if not run.peers.main:
        return "process 0 keeps the checkpoints"
    if snap.step > run.saved_step and snap.step != run.unsaved_step:
        try:
            checkpoint.write(run.output_dir, snap, run.cfg.save_total_limit)
        except DiskFull:
            run.unsaved_step = snap.step  # the error path does not try the full disk again
            raise
        run.saved_step = snap.step
    if run.saved_step == 0:
        return "no step completed, nothing to save"
    return (
        f"checkpoint of step {run.saved_step} in {checkpoint.path(run.output_dir, run.saved_step)}"
    )


def _resumed(run: Run) -> str:
    notes = "".join(f"\n  {note}" for note in run.resume_notes)
    return f"resumed at step {run.step} from {checkpoint.path(run.output_dir, run.step)}{notes}"


def train_step(run: Run, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One rollout and its mu updates; returns the step's metrics and samples.

    In a distributed run this process rolls out and trains on its share of
    the step's prompts; rewards are gathered, so advantages and metrics are
    the whole step's.
    """
    cfg, model, peers = run.cfg, run.lm.model, run.peers
    g, b = cfg.num_generations, cfg.prompts_per_step
    state = _trainer_state(run)  # before this step's prompts are taken
    every_row = next_prompts(run)
    rows = every_row[peers.rank * b : (peers.rank + 1) * b]
    mx.reset_peak_memory()  # so peak_memory_gb is this step's peak
    t0 = time.perf_counter()
    model.eval()
    sampling = SamplingSettings(
        cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p, cfg.max_completion_length
    )
    batch = rollout(
        model,
        [r.prompt_ids for r in rows],
        g,
        sampling,
        run.lm.eos_ids,
        run.lm.pad_id,
        Noise.fresh(peers.rank * b * g, len(every_row) * g),
    )
    t_rollout = time.perf_counter() - t0
    peaks = {"memory/rollout_gb": mx.get_peak_memory() / 1e9}

    ids = batch.completion_lists()
    texts = [run.lm.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    errors: list[dict[str, Any]] = []
    logged = reward_calls.RewardLogs()
    per_func = reward_calls.score_groups(
        run.rewards,
        rows,
        g,
        texts,
        ids,
        cfg.on_reward_error,
        _reward_error_log(run, step, errors),
        state=state,
        logs=logged,
    )
    _write_reward_errors(run, errors)
    # Rewards, lengths and truncation of every process's rows, in rank order (exact bytes).
    local = np.column_stack([per_func, batch.lengths, batch.truncated]).astype(np.float64)
    every = peers.gather(local, "the rewards")
    per_func, lengths, truncated = every[:, :-2], every[:, -2], every[:, -1].astype(bool)
    weights = np.array([r.weight for r in run.rewards], dtype=np.float32)
    adv = group_advantages(per_func, weights, g, cfg.scale_rewards)
    mine = slice(peers.rank * b * g, (peers.rank + 1) * b * g)

    t1 = time.perf_counter()
    mx.reset_peak_memory()
    micro = micro_batches(model, batch, mx.array(adv.advantages[mine]), cfg)
    t_reference = time.perf_counter() - t1
    peaks["memory/reference_gb"] = mx.get_peak_memory() / 1e9

    t2 = time.perf_counter()
    mx.reset_peak_memory()
    update = optimise(model, run.optimizer, micro, cfg, lr_at(step, cfg), peers)
    for applied in update.applied:
        run.bad_updates = 0 if applied else run.bad_updates + 1
    t_update = time.perf_counter() - t2
    peaks["memory/update_gb"] = mx.get_peak_memory() / 1e9

    n_completion = int(lengths.sum())
    run.num_tokens += n_completion + g * sum(len(r.prompt_ids) for r in every_row)
    metrics = {
        "step": step + 1,
        "epoch": run.epoch,
        **reward_metrics([r.name for r in run.rewards], per_func, adv),
        **length_metrics(lengths.astype(int).tolist(), truncated.tolist()),
        **update.metrics,
        "num_tokens": run.num_tokens,
        "tokens_per_second": n_completion / max(t_rollout, 1e-9),
        "time/rollout": t_rollout,
        "time/reference": t_reference,
        "time/update": t_update,
        "time/step": time.perf_counter() - t0,  # with any wait for the other processes
        "peak_memory_gb": max(peaks.values()),
        **peaks,
    }
    metrics |= _logged_metrics(run, logged, metrics)
    run.step = step + 1
    run.history.append(clean_record(metrics))
    samples = [
        {
            "prompt": rows[i // g].prompt,
            "completion": texts[i],
            "rewards": {
                r.name: reward_calls.optional_float(per_func[i, k])
                for k, r in enumerate(run.rewards)
            },
            "advantage": float(adv.advantages[i]),
            **{column: values[i] for column, values in logged.extra.items()},
        }
        for i in range(g)
    ]
    return metrics, samples


def _trainer_state(run: Run) -> reward_calls.TrainerState:
    """What reward functions see as `trainer_state` during the next step."""
    return reward_calls.TrainerState(
        global_step=run.step,
        max_steps=run.cfg.max_steps,
        epoch=run.epoch - len(run.queue) / len(run.rows),  # the share of the data used so far
        num_input_tokens_seen=run.num_tokens,
        is_world_process_zero=run.peers.main,
    )


def _logged_metrics(
    run: Run, logged: reward_calls.RewardLogs, metrics: dict[str, Any]
) -> dict[str, float]:
    """The step's `log_metric` values, each name's mean over every process's calls."""
    local = {name: [sum(values), len(values)] for name, values in logged.metrics.items()}
    totals: dict[str, list[float]] = {}
    for part in run.peers.gather_json(local, "the metrics logged by reward functions"):
        for name, (total, count) in part.items():
            totals.setdefault(name, [0.0, 0])
            totals[name][0] += total
            totals[name][1] += count
    for name in totals:
        if name in metrics:
            owner = logged.owners.get(name, "a reward function")
            raise rewards_mod.RewardError(
                f"reward function {owner!r} logged the metric {name!r}, which the trainer "
                "writes itself; give log_metric another name (e.g. with a prefix)."
            )
    return {name: total / count for name, (total, count) in sorted(totals.items())}


def _reward_error_log(
    run: Run, step: int, records: list[dict[str, Any]]
) -> Callable[[dict[str, Any]], None]:
    """Collect a reward failure for reward_errors.jsonl and say so on the console.

    With on_reward_error=raise the record is written at once: the run stops.
    """

    def log(record: dict[str, Any]) -> None:
        record = {"step": step + 1, **record}
        if record["action"] == "raise":
            _append_reward_errors(run, [record])
        else:
            records.append(record)
        action = {"raise": "stopping", "zero": "scored 0", "skip": "left unscored"}
        where = "" if run.peers.size == 1 else f"{run.peers.label()}: "
        tqdm.write(
            f"{where}reward {record['function']} failed on {record['row']} at step {step + 1} "
            f"({record['error']}); {action[record['action']]}. Details in "
            f"{run.output_dir / REWARD_ERRORS_FILE}",
            file=sys.stderr,
        )

    return log


def _write_reward_errors(run: Run, records: list[dict[str, Any]]) -> None:
    """Log this step's reward failures of every process (zero/skip modes)."""
    if run.peers.size > 1 and run.cfg.on_reward_error != "raise":
        every = run.peers.gather_json(records, "the reward errors")
        records = [r for part in every for r in part]
    _append_reward_errors(run, records)


def _append_reward_errors(run: Run, records: list[dict[str, Any]]) -> None:
    if not (run.peers.main and records):
        return
    path = run.output_dir / REWARD_ERRORS_FILE
    try:
        with open_append(path) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        what = f"the reward errors of step {records[0]['step']}"
        then = f"continue with: {_resume_command(run)}"
        raise disk_full(what, path, "The checkpoints already written are intact.", then) from None


def _save(run: Run) -> Path:
    cfg = run.cfg
    adapter = Adapter.from_model(
        run.lm.model, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, base_model=cfg.model
    )
    return adapter.save(run.output_dir)
