"""Reward functions: the built-ins, loading user functions, and scoring a batch.

A reward function has TRL's signature, `f(prompts, completions, completion_ids,
**columns) -> list[float | None]`, and is called once per batch. Every list it gets
is aligned with `completions` (a row repeated for each of its G completions); extra
dataset columns (e.g. `answer`) arrive as keyword arguments. None means "does not
apply" (NaN, skipped when the weighted rewards are summed).

Example:
    >>> rewards = load_rewards(["math_answer", "think_format"], [1.0, 0.2])
    >>> score_completions(rewards, ["2+2?"], ["<think>easy</think> 4"], [[1]],
    ...                   {"answer": ["4"]}, ["data.jsonl:1"]).tolist()
    [[1.0, 1.0]]
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import reprlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_grpo.arithmetic import arithmetic, equation_format, exact_answer
from mlx_grpo.builtin_rewards import completion_text, math_answer, think_format

RewardFn = Callable[..., list[float | None]]


class RewardSpecError(ValueError):
    """A reward spec (`name`, `module:function` or `file.py:function`) cannot be loaded."""


class RewardError(ValueError):
    """A reward function failed or returned something that is not one number per completion."""


@dataclass(frozen=True)
class Reward:
    name: str  # metrics key: rewards/<name>/mean
    fn: RewardFn
    weight: float = 1.0


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math_answer": math_answer,
    "think_format": think_format,
    "arithmetic": arithmetic,
    "equation_format": equation_format,
    "exact_answer": exact_answer,
}


# --------------------------------------------------------------------------- loading


def load_reward(spec: str) -> tuple[str, RewardFn]:
    """Resolve a reward spec to (name, function).

    `spec` is a built-in name (see BUILTIN_REWARDS), `package.module:function` or
    `path/to/file.py:function` (relative to the current directory, or absolute).
    The name is the built-in name or the function's `__name__`.

    Example:
        >>> load_reward("math_answer")[0]
        'math_answer'
        >>> name, fn = load_reward("my_rewards.py:length_penalty")  # doctest: +SKIP
    """
    if spec in BUILTIN_REWARDS:
        return spec, BUILTIN_REWARDS[spec]
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(BUILTIN_REWARDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RewardSpecError(
            f"unknown reward {spec!r}.{hint} Built-in rewards: {', '.join(BUILTIN_REWARDS)}; "
            "for your own function give 'package.module:function' or 'path/to/file.py:function'."
        )
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise RewardSpecError(
            f"reward spec {spec!r} must be 'module:function' or 'file.py:function'"
        )
    looks_like_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _import_file(target, spec) if looks_like_file else _import_module(target, spec)
    fn = _get_function(module, attr, spec)
    return getattr(fn, "__name__", attr), fn


def _import_file(target: str, spec: str) -> Any:
    path = Path(target).expanduser()
    resolved = path if path.is_absolute() else Path.cwd() / path
    if not resolved.is_file():
        raise RewardSpecError(
            f"reward file {target!r} (from {spec!r}) not found: looked at {resolved}. "
            f"Relative paths start at the current directory ({Path.cwd()}); "
            "check the path or give an absolute one."
        )
    name = f"_mlx_grpo_reward_{abs(hash(str(resolved.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # as an import would: dataclasses and pickling look it up
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise RewardSpecError(
            f"reward file {resolved} (from {spec!r}) raised while being imported: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return module


def _import_module(target: str, spec: str) -> Any:
    try:
        return importlib.import_module(target)
    except Exception as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and (target + ".").startswith(f"{exc.name}."):
            hint = (
                f" Install it, add its folder to PYTHONPATH (the current directory is {Path.cwd()})"
                f", or name the file: 'path/to/{target.split('.')[-1]}.py:{spec.split(':')[-1]}'."
            )
        raise RewardSpecError(
            f"cannot import module {target!r} for reward {spec!r}: {type(exc).__name__}: {exc}."
            + hint
        ) from exc


def _get_function(module: Any, attr: str, spec: str) -> RewardFn:
    where = getattr(module, "__file__", None) or module.__name__
    if not hasattr(module, attr):
        callables = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
        )
        close = difflib.get_close_matches(attr, callables, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RewardSpecError(
            f"{where} has no attribute {attr!r} (from reward {spec!r}).{hint} "
            f"Callables it defines: {', '.join(callables) or 'none'}."
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardSpecError(
            f"{attr!r} in {where} is the {type(fn).__name__} {reprlib.repr(fn)}, not a function "
            f"(from reward {spec!r}); point the spec at a function "
            "f(prompts, completions, completion_ids, **kwargs)."
        )
    try:
        signature = inspect.signature(fn)
        # Dataset columns come as keywords, so only the three positionals must fit.
        signature.bind_partial([], [], [])
    except ValueError:
        return fn  # no signature to read (some C functions): trust it
    except TypeError as exc:
        raise RewardSpecError(
            f"reward function {attr}{signature} in {where} cannot be called as "
            f"f(prompts, completions, completion_ids, **kwargs) ({exc}); "
            "give it TRL's signature: def f(prompts, completions, completion_ids, **kwargs)."
        ) from exc
    return fn


def load_rewards(specs: list[str], weights: list[float] | None = None) -> list[Reward]:
    """Load every spec (see `load_reward`) and pair it with its weight.

    `weights` None means 1.0 each. Two functions with the same name get
    suffixes (`reward`, `reward_2`) so their metrics stay apart.

    Example:
        >>> [r.name for r in load_rewards(["math_answer", "think_format"], [1.0, 0.5])]
        ['math_answer', 'think_format']
    """
    if not specs:
        raise RewardSpecError("no reward functions given; name at least one, e.g. 'math_answer'.")
    if weights is None:
        weights = [1.0] * len(specs)
    if len(weights) != len(specs):
        raise RewardSpecError(
            f"got {len(specs)} reward functions ({', '.join(specs)}) but {len(weights)} weights "
            f"({', '.join(map(str, weights))}); give one weight per reward function, in order."
        )
    rewards: list[Reward] = []
    seen: dict[str, int] = {}
    for spec, weight in zip(specs, weights, strict=True):
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardSpecError(f"weight {weight!r} for reward {spec!r} must be a finite number.")
        name, fn = load_reward(spec)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        rewards.append(Reward(name=name, fn=fn, weight=float(weight)))
    return rewards


# --------------------------------------------------------------------------- scoring


def score_completions(
    rewards: list[Reward],
    prompts: list,
    completions: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list],
    row_sources: list[str],
    on_error: str = "raise",
    log: Callable[[dict[str, Any]], None] | None = None,
) -> np.ndarray:
    """Call each reward function once on the batch; return raw scores (N, K) float32.

    All lists are aligned with `completions` (N of them); `columns` go to the
    functions as keyword arguments (a function without **kwargs gets only the
    columns it names). None becomes NaN. Weights are not applied here.

    When a function raises or returns something invalid, `on_error` "raise"
    raises RewardError naming the function and, where it can, the row;
    "zero" and "skip" call it again one completion at a time and score the
    failing ones 0 or NaN (unscored). Each failure goes to `log` with its
    traceback and completion.

    Example:
        >>> score_completions(load_rewards(["think_format"]), ["q"], ["4"], [[52]], {},
        ...                   ["data.jsonl:1"]).tolist()
        [[0.0]]
    """
    n = len(completions)
    aligned = {"prompts": prompts, "completion_ids": completion_ids, "row_sources": row_sources}
    for what, values in {**aligned, **columns}.items():
        if len(values) != n:
            raise ValueError(f"{what!r} has {len(values)} entries for {n} completions")
    scores = np.full((n, len(rewards)), np.nan, dtype=np.float32)
    for k, reward in enumerate(rewards):
        args, kwargs = (prompts, completions, completion_ids), _accepted_columns(reward.fn, columns)
        try:
            values = reward.fn(*args, **kwargs)
            scores[:, k] = _check_values(reward.name, values, completions, row_sources)
        except Exception as exc:
            if on_error == "raise":
                invalid = isinstance(exc, RewardError)  # it ran but returned bad values
                i = None if invalid else _failing_row(reward, args, kwargs)
                if i is None:
                    _report(log, reward, "batch", completions, exc, on_error)
                else:
                    _report(log, reward, row_sources[i], completions[i], exc, on_error)
                if invalid:
                    raise
                raise _raised_error(reward, args, row_sources, exc, i) from exc
            scores[:, k] = _score_rows(reward, args, kwargs, row_sources, on_error, log)
    return scores


def _score_rows(
    reward: Reward,
    args: tuple,
    kwargs: dict,
    row_sources: list[str],
    on_error: str,
    log: Callable[[dict[str, Any]], None] | None,
) -> np.ndarray:
    """Score a failing function one completion at a time; failed ones get 0 or NaN."""
    out = np.full(len(row_sources), np.nan, dtype=np.float32)
    for i in range(len(row_sources)):
        one = tuple(a[i : i + 1] for a in args)
        try:
            values = reward.fn(*one, **{k: v[i : i + 1] for k, v in kwargs.items()})
            out[i] = _check_values(reward.name, values, one[1], row_sources[i : i + 1])[0]
        except Exception as exc:
            _report(log, reward, row_sources[i], args[1][i], exc, on_error)
            out[i] = 0.0 if on_error == "zero" else np.nan
    return out


def _report(
    log: Callable[[dict[str, Any]], None] | None,
    reward: Reward,
    row: str,
    completion: Any,
    exc: Exception,
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
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "action": on_error,
        }
    )


def score_groups(
    rewards: list[Reward],
    rows: list,
    g: int,
    completions: list[str],
    completion_ids: list[list[int]],
    on_error: str = "raise",
    log: Callable[[dict[str, Any]], None] | None = None,
) -> np.ndarray:
    """`score_completions` for G completions per row (rows b * G .. b * G + G - 1 are row b's).

    Each row's prompt, columns and source are repeated for its completions.
    """
    names = sorted({k for r in rows for k in r.columns})
    return score_completions(
        rewards,
        [r.prompt for r in rows for _ in range(g)],
        completions,
        completion_ids,
        {k: [r.columns.get(k) for r in rows for _ in range(g)] for k in names},
        [r.source for r in rows for _ in range(g)],
        on_error,
        log,
    )


def optional_float(x: float) -> float | None:
    """A reward value for JSON: NaN (a None reward) becomes None."""
    return None if math.isnan(x) else float(x)


def _accepted_columns(fn: RewardFn, columns: dict[str, list]) -> dict[str, list]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return dict(columns)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(columns)
    names = {p.name for p in params}
    return {k: v for k, v in columns.items() if k in names}


def _row(i: int, completions: list, row_sources: list[str]) -> str:
    text = completion_text(completions[i])
    shown = text if len(text) <= 120 else text[:120] + "..."
    return f"row {row_sources[i]} (completion {i}: {shown!r})"


def _raised_error(
    reward: Reward, args: tuple, row_sources: list[str], exc: Exception, i: int | None
) -> RewardError:
    """The error for a function that raised on the batch and, alone, on row `i` (or none)."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" at {frames[-1].filename}:{frames[-1].lineno}" if len(frames) > 1 else ""
    message = f"{type(exc).__name__}: {exc}{at}"
    if i is not None:
        return RewardError(
            f"reward function {reward.name!r} raised on {_row(i, args[1], row_sources)}: "
            f"{message}. Fix the function, return None for rows it cannot score, or set "
            "on_reward_error to zero or skip."
        )
    return RewardError(
        f"reward function {reward.name!r} raised on a batch of {len(row_sources)} completions "
        f"(rows {', '.join(dict.fromkeys(row_sources))}) but on no single row: {message}."
    )


def _failing_row(reward: Reward, args: tuple, kwargs: dict) -> int | None:
    """The first completion the function raises on when called on it alone."""
    for i in range(len(args[1])):
        try:
            reward.fn(*(a[i : i + 1] for a in args), **{k: v[i : i + 1] for k, v in kwargs.items()})
        except Exception:
            return i
    return None


def _check_values(name: str, values: Any, completions: list, row_sources: list[str]) -> np.ndarray:
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
        is_real = isinstance(value, (int, float, np.integer, np.floating, np.bool_))
        if not is_real or not math.isfinite(float(value)):
            raise RewardError(
                f"reward function {name!r} returned {value!r} ({type(value).__name__}) for "
                f"{_row(i, completions, row_sources)}; each value must be a finite number, "
                "or None where the reward does not apply."
            )
        out[i] = float(value)
    return out
