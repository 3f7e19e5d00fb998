"""What reward functions return and raise: checked, and explained with the function and row."""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlx_grpo.core.builtin_rewards import completion_text
from mlx_grpo.core.rewards import Reward, RewardError, describe_failure, source_file

FLOAT32_MAX = float(np.finfo(np.float32).max)
NUMBER = (int, float, np.integer, np.floating, np.bool_)
CALLER = str(Path(__file__).with_name("reward_calls.py"))  # left out of reported tracebacks


def report_failure(
    log: Callable[[dict[str, Any]], None] | None,
    reward: Reward,
    row: str,
    completion: Any,
    exc: BaseException,
    on_error: str,
) -> None:
    if log is None:
        return
    if row == "batch":
        completion = [completion_text(c) for c in completion]
    else:
        completion = completion_text(completion)
    log(
        {
            "function": reward.name,
            "row": row,
            "completion": completion,
            "error": describe_failure(exc, source_file(reward.fn), CALLER),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "action": on_error,
        }
    )


def describe_row(i: int, completions: list, row_sources: list[str]) -> str:
    text = completion_text(completions[i])
    shown = text if len(text) <= 120 else text[:120] + "..."
    return f"row {row_sources[i]} (completion {i}: {shown!r})"


def raised_error(
    reward: Reward, completions: list, row_sources: list[str], exc: BaseException, i: int | None
) -> RewardError:
    """The error for a function that raised on the batch and, alone, on row `i` (or none)."""
    message = describe_failure(exc, source_file(reward.fn), CALLER)
    if i is not None:
        return RewardError(
            f"reward function {reward.name!r} raised on "
            f"{describe_row(i, completions, row_sources)}: {message}. Fix the function, "
            "return None for rows it cannot score, or set on_reward_error to zero or skip."
        )
    sources = row_sources
    return RewardError(
        f"reward function {reward.name!r} raised on a batch of {len(sources)} completions "
        f"(rows {', '.join(dict.fromkeys(sources))}) but on no single row: {message}."
    )


def check_values(name: str, values: Any, completions: list, row_sources: list[str]) -> np.ndarray:
    """Validate a function's return value; return float32 (N,) with NaN for None."""
    n = len(completions)
    if isinstance(values, np.ndarray):
        values = values.tolist() if values.ndim == 1 else values
    if not isinstance(values, (list, tuple)):
        raise RewardError(
            f"reward function {name!r} returned a {type(values).__name__}; it must return a list "
            f"with one float (or None) per completion ({n} here)."
        )
    if len(values) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(values)} values for {n} completions "
            f"(rows {', '.join(dict.fromkeys(row_sources))}); expected {n}, one per completion."
        )
    out = np.full(n, np.nan, dtype=np.float32)
    for i, value in enumerate(values):
        if value is None:
            continue
        number = as_float(value)
        if number is None or not abs(number) <= FLOAT32_MAX:
            beyond = number is not None and math.isfinite(number)
            raise RewardError(
                f"reward function {name!r} returned {value!r} ({type(value).__name__}) for "
                f"{describe_row(i, completions, row_sources)}; each value must be a finite number"
                f"{' within float32 range (+-3.4e38)' if beyond else ''}, or None where the "
                "reward does not apply."
            )
        out[i] = number
    return out


def as_float(value: Any) -> float | None:
    """The value as a float; None if it is not a real number or overflows a float."""
    if not isinstance(value, NUMBER):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond 1e308
        return None
