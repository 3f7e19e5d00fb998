"""Calling reward functions as TRL does: by keyword, once per batch, async ones together.

    f(prompts=..., completions=..., completion_ids=..., trainer_state=...,
      log_extra=..., log_metric=..., **dataset_columns) -> list[float | None]

Every list is aligned with `completions` (a row repeated for each of its G
completions); the dataset columns are every column but the prompt column,
which arrives as `prompts`. A function with `**kwargs` gets every argument, one
without only those it names. A completion is the text, or `[{"role":
"assistant", "content": text}]` when the prompt is a list of chat messages.
`async def` functions of a batch run concurrently. None means "does not apply"
(NaN, skipped when the weighted rewards are summed). `log_extra(column,
values)` adds a value per completion to completions.jsonl, `log_metric(name,
value)` a number to metrics.jsonl (averaged over the step's calls). What the
functions return is checked: one finite float32 number (or None) per
completion. Loading the functions is rewards.py's work.

Example:
    >>> rewards = load_rewards(["math_answer", "think_format"], [1.0, 0.2])
    >>> score_completions(rewards, ["2+2?"], ["<think>easy</think> 4"], [[1]],
    ...                   {"answer": ["4"]}, ["data.jsonl:1"]).tolist()
    [[1.0, 1.0]]
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlx_grpo.core.data import per_completion
from mlx_grpo.core.reward_checks import (
    NUMBER,
    check_values,
    raised_error,
    report_failure,
)
from mlx_grpo.core.rewards import (
    NOT_CAUGHT,
    STANDARD_ARGUMENTS,
    Reward,
    RewardError,
    RewardFn,
    RewardSpecError,
    clash,
    parameters,
)

# The keys of a completions.jsonl record, so log_extra columns cannot overwrite them.
RESERVED_COLUMNS = (
    "step", "prompt", "completion", "rewards", "advantage", "messages", "trained_spans"
)  # fmt: skip


@dataclass(frozen=True)
class TrainerState:
    """Training progress, passed to reward functions as `trainer_state`.

    The attributes are those of transformers' `TrainerState` that this trainer
    knows, so `trainer_state.global_step` reads as under TRL.
    """

    global_step: int = 0  # steps completed before the one being scored
    max_steps: int = 0  # the run's step limit (0 in evaluation)
    epoch: float = 0.0  # passes over the data so far, 1.5 = one and a half (as TRL; the
    # `epoch` metric counts the passes begun)
    num_input_tokens_seen: int = 0  # prompt + completion tokens of the completed steps
    is_world_process_zero: bool = True  # process 0 of a distributed run


@dataclass
class RewardLogs:
    """What the reward functions logged on one batch with `log_extra` and `log_metric`.

    Only calls that succeed count: a call that raised or returned bad values
    logs nothing.
    """

    extra: dict[str, list] = field(default_factory=dict)  # column -> value per completion
    metrics: dict[str, list[float]] = field(default_factory=dict)  # name -> a value per call
    owners: dict[str, str] = field(default_factory=dict)  # metric name -> reward that logged it


class _Hooks:
    """`log_extra` and `log_metric` for one call on completions `rows` of a batch."""

    def __init__(self, reward: str, rows: range):
        self.reward, self.rows = reward, rows
        self.extra: dict[str, list] = {}
        self.metrics: list[tuple[str, float]] = []

    def log_extra(self, column: str, values: list) -> None:
        """A completions.jsonl column: one value per completion of this call."""
        if not isinstance(column, str) or column in RESERVED_COLUMNS:
            raise RewardError(
                f"reward function {self.reward!r} called log_extra with the column {column!r}; "
                f"name it with a string other than {', '.join(RESERVED_COLUMNS)}."
            )
        values = values.tolist() if isinstance(values, np.ndarray) else values
        if not isinstance(values, (list, tuple)) or len(values) != len(self.rows):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)
            raise RewardError(
                f"reward function {self.reward!r} called log_extra({column!r}, ...) with {got}; "
                f"give a list with one value per completion ({len(self.rows)} here)."
            )
        self.extra[column] = [_json_ready(v) for v in values]

    def log_metric(self, name: str, value: float) -> None:
        """A number for metrics.jsonl, averaged over the step's calls."""
        if not isinstance(name, str) or not isinstance(value, NUMBER):
            raise RewardError(
                f"reward function {self.reward!r} called log_metric({name!r}, {value!r}); give "
                "a string name and a number."
            )
        self.metrics.append((name, float(value)))

    def keep(self, logs: RewardLogs, n: int) -> None:
        for column, values in self.extra.items():
            kept = logs.extra.setdefault(column, [None] * n)
            for i, value in zip(self.rows, values):
                kept[i] = value
        for name, value in self.metrics:
            logs.metrics.setdefault(name, []).append(value)
            logs.owners.setdefault(name, self.reward)


def _json_ready(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


@dataclass
class _Batch:
    """One scoring call's inputs, every list aligned with the completions."""

    lists: dict[str, list]  # prompts, completions, completion_ids, then the dataset columns
    row_sources: list[str]
    state: TrainerState
    logs: RewardLogs

    @property
    def completions(self) -> list:
        return self.lists["completions"]


@dataclass
class _Attempt:
    """One call of a reward function: what it returned or raised, and what it logged."""

    hooks: _Hooks
    values: Any = None
    error: BaseException | None = None


def _arguments(fn: RewardFn, batch: _Batch, hooks: _Hooks) -> dict[str, Any]:
    """The keyword arguments for `fn` on the completions `hooks.rows`."""
    rows = hooks.rows
    whole = len(rows) == len(batch.row_sources)
    offered = {k: v if whole else v[rows.start : rows.stop] for k, v in batch.lists.items()}
    offered |= {
        "trainer_state": batch.state,
        "log_extra": hooks.log_extra,
        "log_metric": hooks.log_metric,
    }
    params = parameters(fn)
    if params is None:
        return offered
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        offered = {k: v for k, v in offered.items() if k in {p.name for p in named}}
    for p in named:  # a column no row of this batch has: None for each, as for a missing cell
        if p.default is p.empty and p.name not in offered:
            offered[p.name] = [None] * len(rows)
    return offered


def _attempts(calls: list[tuple[Reward, range]], batch: _Batch) -> list[_Attempt]:
    """Call each reward on its rows: sync ones in turn, then the async ones concurrently."""
    attempts, waiting = [], []
    for reward, rows in calls:
        attempt = _Attempt(_Hooks(reward.name, rows))
        try:
            attempt.values = reward.fn(**_arguments(reward.fn, batch, attempt.hooks))
        except NOT_CAUGHT:
            raise
        except BaseException as exc:  # SystemExit too: a reward's failure, not the run's end
            attempt.error = exc
        if inspect.isawaitable(attempt.values):
            waiting.append(attempt)
        attempts.append(attempt)
    settled = _run_concurrently([a.values for a in waiting])
    for attempt, (values, error) in zip(waiting, settled):
        attempt.values, attempt.error = values, error
    return attempts


async def _settle(awaitable: Awaitable) -> tuple[Any, BaseException | None]:
    try:
        return await awaitable, None
    except NOT_CAUGHT:
        raise
    except BaseException as exc:
        return None, exc


def _run_concurrently(awaitables: list[Awaitable]) -> list[tuple[Any, BaseException | None]]:
    """(value, error) of each awaitable, all run in one event loop with asyncio.gather."""
    if not awaitables:
        return []

    async def gather() -> list[tuple[Any, BaseException | None]]:
        return list(await asyncio.gather(*(_settle(a) for a in awaitables)))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with ThreadPoolExecutor(1) as pool:  # called from a running loop (a notebook): use another
        return pool.submit(asyncio.run, gather()).result()


def _outcome(reward: Reward, attempt: _Attempt, batch: _Batch) -> np.ndarray | BaseException:
    """The attempt's checked scores, its logs kept; or what went wrong."""
    if attempt.error is not None:
        return attempt.error
    rows = attempt.hooks.rows
    try:
        values = check_values(
            reward.name,
            attempt.values,
            batch.completions[rows.start : rows.stop],
            batch.row_sources[rows.start : rows.stop],
        )
    except RewardError as exc:
        return exc
    attempt.hooks.keep(batch.logs, len(batch.row_sources))
    return values


# --------------------------------------------------------------------------- scoring


def score_completions(
    rewards: list[Reward],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list],
    row_sources: list[str],
    on_error: str = "raise",
    log: Callable[[dict[str, Any]], None] | None = None,
    *,
    state: TrainerState | None = None,
    logs: RewardLogs | None = None,
) -> np.ndarray:
    """Call each reward function once on the batch; return raw scores (N, K) float32.

    All lists are aligned with `completions` (N of them, text or chat
    messages). Functions get them by keyword with `columns`, `state` (as
    `trainer_state`) and the `log_extra`/`log_metric` hooks, whose records go
    to `logs`; see the module docstring. None becomes NaN. Weights are not
    applied here.

    When a function raises (SystemExit included) or returns something
    invalid, `on_error` "raise" raises RewardError naming the function, the
    file:line it raised at and, where it can, the row; "zero" and "skip" call
    it again one completion at a time and score the failing ones 0 or NaN
    (unscored). Each failure goes to `log` with its traceback and completion.

    Example:
        >>> score_completions(load_rewards(["think_format"]), ["q"], ["4"], [[52]], {},
        ...                   ["data.jsonl:1"]).tolist()
        [[0.0]]
    """
    n = len(completions)
    aligned = {"prompts": prompts, "completion_ids": completion_ids, "row_sources": row_sources}
    _check_inputs(n, {**aligned, **columns}, columns, row_sources)
    lists = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
    batch = _Batch({**lists, **columns}, row_sources, state or TrainerState(), logs or RewardLogs())
    scores = np.full((n, len(rewards)), np.nan, dtype=np.float32)
    attempts = _attempts([(r, range(n)) for r in rewards], batch)
    for k, (reward, attempt) in enumerate(zip(rewards, attempts)):
        outcome = _outcome(reward, attempt, batch)
        if isinstance(outcome, np.ndarray):
            scores[:, k] = outcome
        elif on_error != "raise":
            scores[:, k] = _score_rows(reward, batch, on_error, log)
        elif isinstance(outcome, RewardError):  # it ran but returned bad values
            report_failure(log, reward, "batch", completions, outcome, on_error)
            raise outcome
        else:
            i = _failing_row(reward, batch)
            row, completion = (
                ("batch", completions) if i is None else (row_sources[i], completions[i])
            )
            report_failure(log, reward, row, completion, outcome, on_error)
            raise raised_error(
                reward, batch.completions, batch.row_sources, outcome, i
            ) from outcome
    return scores


def _check_inputs(
    n: int, aligned: dict[str, list], columns: dict[str, list], row_sources: list[str]
) -> None:
    """Refuse lists of another length than the completions, and columns named like arguments."""
    for what, values in aligned.items():
        if len(values) != n:
            raise ValueError(f"{what!r} has {len(values)} entries for {n} completions")
    for column in columns:
        if column in STANDARD_ARGUMENTS:
            where = row_sources[0].rsplit(":", 1)[0] if row_sources else "the data"
            raise RewardSpecError(clash(column, where))


def _score_rows(
    reward: Reward, batch: _Batch, on_error: str, log: Callable[[dict[str, Any]], None] | None
) -> np.ndarray:
    """Score a failing function one completion at a time; failed ones get 0 or NaN."""
    n = len(batch.row_sources)
    out = np.full(n, np.nan, dtype=np.float32)
    for i in range(n):
        (attempt,) = _attempts([(reward, range(i, i + 1))], batch)
        outcome = _outcome(reward, attempt, batch)
        if isinstance(outcome, np.ndarray):
            out[i] = outcome[0]
            continue
        report_failure(log, reward, batch.row_sources[i], batch.completions[i], outcome, on_error)
        out[i] = 0.0 if on_error == "zero" else np.nan
    return out


def _failing_row(reward: Reward, batch: _Batch) -> int | None:
    """The first completion the function raises on when called on it alone."""
    for i in range(len(batch.row_sources)):
        (attempt,) = _attempts([(reward, range(i, i + 1))], batch)
        if attempt.error is not None:
            return i
    return None


def score_groups(
    rewards: list[Reward],
    rows: list,
    g: int,
    completions: list[str] | list[list[dict]],
    completion_ids: list[list[int]],
    on_error: str = "raise",
    log: Callable[[dict[str, Any]], None] | None = None,
    *,
    state: TrainerState | None = None,
    logs: RewardLogs | None = None,
    extra: dict[str, list] | None = None,
    prompts: list | None = None,
) -> np.ndarray:
    """`score_completions` for G completions per row (rows b * G .. b * G + G - 1 are row b's).

    Each row's prompt, columns and source are repeated for its completions. A
    row whose prompt is chat messages gets its completions as TRL gives them:
    `[{"role": "assistant", "content": text}]`; a completion given as messages
    (an agent's episode) goes as it is. `extra` adds lists aligned with the
    completions (an agent's `environments`); `prompts`, one per completion,
    replaces the rows' (an agent's, with its environment's reset text).
    """
    names = sorted({k for r in rows for k in r.columns})
    each = per_completion(rows, g)
    prompts = prompts or [r.prompt for r in each]
    return score_completions(
        rewards,
        prompts,
        [
            [{"role": "assistant", "content": c}]
            if isinstance(p, list) and isinstance(c, str)
            else c
            for p, c in zip(prompts, completions)
        ],
        completion_ids,
        {k: [r.columns.get(k) for r in each] for k in names} | (extra or {}),
        [r.source for r in each],
        on_error,
        log,
        state=state,
        logs=logs,
    )


def optional_float(x: float) -> float | None:
    """A reward value for JSON: NaN (a None reward) becomes None."""
    return None if math.isnan(x) else float(x)
