"""A step's rewards: scored, gathered over processes, failures and `log_metric` values logged.

The trainer calls `score_rollout` between the rollout and the advantages.
Reward failures go to the console and reward_errors.jsonl (all processes'
in rank order); with `on_reward_error=raise` the record is written before
the run stops.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from mlx_grpo.core import reward_calls
from mlx_grpo.core.agent import AgentRollout
from mlx_grpo.core.data import PromptRow
from mlx_grpo.core.reporting import REWARD_ERRORS_FILE
from mlx_grpo.core.rewards import RewardError
from mlx_grpo.core.rollout import RolloutBatch
from mlx_grpo.core.runfolder import disk_full, is_disk_full, open_append
from mlx_grpo.core.setup import Run, resume_command


@dataclass
class StepRewards:
    """Rewards of every process's completions (rank order); texts and logs of this one's."""

    per_func: np.ndarray  # (N, F) float64, NaN where a function gave None
    weights: np.ndarray  # (F,) float32
    lengths: np.ndarray  # (N,) completion tokens
    truncated: np.ndarray  # (N,) bool: no EOS within max_completion_length
    texts: list[str]  # this process's completions, decoded
    logged: reward_calls.RewardLogs  # this process's log_extra and log_metric values


def trainer_state(run: Run) -> reward_calls.TrainerState:
    """What reward functions see as `trainer_state` during the next step."""
    return reward_calls.TrainerState(
        global_step=run.state.step,
        max_steps=run.cfg.max_steps,
        epoch=run.state.data_used(len(run.rows)),
        num_input_tokens_seen=run.state.num_tokens,
        is_world_process_zero=run.peers.main,
    )


def score_rollout(
    run: Run,
    step: int,
    rows: list[PromptRow],
    batch: RolloutBatch,
    state: reward_calls.TrainerState,
    agent: AgentRollout | None = None,
) -> StepRewards:
    """Score this process's completions, then gather every process's rewards and lengths.

    An agent's completions are its episodes' conversations, and the reward
    functions get its `environments` too (TRL's arguments); lengths count
    the tokens the model wrote.
    """
    ids = batch.completion_lists()
    texts = [run.lm.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    completions: list = texts if agent is None else [ep.messages for ep in agent.episodes]
    extra = {"environments": agent.environments} if agent and agent.environments else None
    errors: list[dict[str, Any]] = []
    logged = reward_calls.RewardLogs()
    per_func = reward_calls.score_groups(
        run.rewards,
        rows,
        run.cfg.num_generations,
        completions,
        ids,
        run.cfg.on_reward_error,
        _error_log(run, step, errors),
        state=state,
        logs=logged,
        extra=extra,
        prompts=agent.prompts if agent is not None else None,
    )
    if agent is not None:
        _failed_resets(run, rows, agent, per_func, _error_log(run, step, errors))
    _write_errors(run, errors)
    if agent is not None:  # completions.jsonl keeps each whole episode
        logged.extra["messages"] = [ep.messages for ep in agent.episodes]
        logged.extra["trained_spans"] = [trained_spans(ep.trained) for ep in agent.episodes]
    # Rewards, lengths and truncation of every process's rows, in rank order (exact bytes).
    lengths = batch.trained_lengths
    local = np.column_stack([per_func, lengths, batch.truncated]).astype(np.float64)
    every = run.peers.gather(local, "the rewards")
    weights = np.array([r.weight for r in run.rewards], dtype=np.float32)
    truncated = every[:, -1].astype(bool)
    return StepRewards(every[:, :-2], weights, every[:, -2], truncated, texts, logged)


def _failed_resets(
    run: Run,
    rows: list[PromptRow],
    agent: AgentRollout,
    per_func: np.ndarray,
    log: Callable[[dict[str, Any]], None],
) -> None:
    """Episodes whose environment's reset raised: every reward 0 (on_reward_error zero) or
    none (skip), logged as reward failures are."""
    action = run.cfg.on_reward_error
    for i, ep in enumerate(agent.episodes):
        if ep.failure is None:
            continue
        per_func[i] = 0.0 if action == "zero" else np.nan
        exc = ep.failure
        log(
            {
                "function": f"{type(agent.environments[i]).__name__}.reset",
                "row": rows[i // run.cfg.num_generations].source,
                "completion": None,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                "action": action,
            }
        )


def trained_spans(trained: list[int]) -> list[list[int]]:
    """[start, end) of each run of tokens the model wrote (a completion's others are tool
    results, which the loss leaves out)."""
    spans: list[list[int]] = []
    for i, on in enumerate(trained):
        if on and (not spans or spans[-1][1] != i):
            spans.append([i, i + 1])
        elif on:
            spans[-1][1] = i + 1
    return spans


def logged_metrics(
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
            raise RewardError(
                f"reward function {owner!r} logged the metric {name!r}, which the trainer "
                "writes itself; give log_metric another name (e.g. with a prefix)."
            )
    return {name: total / count for name, (total, count) in sorted(totals.items())}


def _error_log(
    run: Run, step: int, records: list[dict[str, Any]]
) -> Callable[[dict[str, Any]], None]:
    """Collect a reward failure for reward_errors.jsonl and say so on the console.

    With on_reward_error=raise the record is written at once: the run stops.
    """

    def log(record: dict[str, Any]) -> None:
        record = {"step": step + 1, **record}
        if record["action"] == "raise":
            _append(run, [record])
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


def _write_errors(run: Run, records: list[dict[str, Any]]) -> None:
    """Log this step's reward failures of every process (zero/skip modes)."""
    if run.peers.size > 1 and run.cfg.on_reward_error != "raise":
        every = run.peers.gather_json(records, "the reward errors")
        records = [r for part in every for r in part]
    _append(run, records)


def _append(run: Run, records: list[dict[str, Any]]) -> None:
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
        then = f"continue with: {resume_command(run)}"
        raise disk_full(what, path, "The checkpoints already written are intact.", then) from None
