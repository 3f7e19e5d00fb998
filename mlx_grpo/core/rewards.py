"""Reward functions: the built-ins, and loading user functions from their specs.

A spec is a built-in name (BUILTIN_REWARDS), `package.module:function`,
`path/to/file.py:function`, or `hf:folder` for a Hugging Face
sequence-classification reward model (reward_model.py). Loading imports the
function and refuses one that TRL's keyword call could never satisfy;
`check_arguments` then checks each function's parameters against the
dataset's columns before anything is written. Reward functions are called
as TRL calls them, by keyword:

    f(prompts=..., completions=..., completion_ids=..., trainer_state=...,
      log_extra=..., log_metric=..., **dataset_columns) -> list[float | None]

so `def correct(completions, answer, **kwargs)` works as written for TRL;
reward_calls.py calls them and checks what they return.

Example:
    >>> rewards = load_rewards(["math_answer", "think_format"], [1.0, 0.2])
    >>> check_arguments(rewards, ["answer"], "train.jsonl")
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import math
import reprlib
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_grpo.core import reward_model
from mlx_grpo.core.builtin_rewards import (
    arithmetic,
    equation_format,
    exact_answer,
    math_answer,
    think_format,
)

RewardFn = Callable[..., list[float | None]]

# What every reward function is offered besides the dataset columns, as TRL names them.
STANDARD_ARGUMENTS = (
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
)
NOT_CAUGHT = (KeyboardInterrupt, GeneratorExit)  # Ctrl-C and SIGTERM stop the run


class RewardSpecError(ValueError):
    """A reward function cannot be loaded, or cannot get the arguments it asks for."""


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

# Where modules of mlx-grpo 0.1 moved, so the reward specs of runs they wrote still load.
MOVED_MODULES = {"mlx_grpo.toy": "mlx_grpo.tasks.toy"}


# --------------------------------------------------------------------------- loading


def load_reward(spec: str) -> tuple[str, RewardFn]:
    """Resolve a reward spec to (name, function).

    `spec` is a built-in name (see BUILTIN_REWARDS), `package.module:function`,
    `path/to/file.py:function` (relative to the current directory, or absolute)
    or `hf:path/to/reward-model` (reward_model.py). The name is the built-in
    name, the function's `__name__` or the reward model folder's name.

    Example:
        >>> load_reward("math_answer")[0]
        'math_answer'
        >>> name, fn = load_reward("my_rewards.py:length_penalty")  # doctest: +SKIP
    """
    if spec in BUILTIN_REWARDS:
        return spec, BUILTIN_REWARDS[spec]
    if spec.startswith(reward_model.PREFIX):
        try:
            model = reward_model.RewardModel(spec[len(reward_model.PREFIX) :])
        except reward_model.RewardModelError as e:
            raise RewardSpecError(str(e)) from None
        return model.__name__, model
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
    target = MOVED_MODULES.get(target, target)
    module = import_target(target, spec)
    fn = _get_function(module, attr, spec)
    return getattr(fn, "__name__", attr), fn


def import_target(target: str, spec: str, what: str = "reward") -> Any:
    """The module of a 'module:name' or 'path/to/file.py:name' spec (`what` names the
    kind of thing in errors, which are RewardSpecError)."""
    looks_like_file = target.endswith(".py") or "/" in target or "\\" in target
    if looks_like_file:
        return _import_file(target, spec, what)
    return _import_module(target, spec, what)


def _import_file(target: str, spec: str, what: str) -> Any:
    path = Path(target).expanduser()
    resolved = path if path.is_absolute() else Path.cwd() / path
    if not resolved.is_file():
        raise RewardSpecError(
            f"{what} file {target!r} (from {spec!r}) not found: looked at {resolved}. "
            f"Relative paths start at the current directory ({Path.cwd()}); "
            "check the path or give an absolute one."
        )
    name = f"_mlx_grpo_{what}_{abs(hash(str(resolved.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # as an import would: dataclasses and pickling look it up
    try:
        module_spec.loader.exec_module(module)
    except NOT_CAUGHT:
        raise
    except BaseException as exc:  # sys.exit() in the file too: it must not end the run silently
        del sys.modules[name]
        raise RewardSpecError(
            f"{what} file {resolved} (from {spec!r}) raised while being imported: "
            f"{describe_failure(exc, str(resolved))}"
        ) from exc
    return module


def _import_module(target: str, spec: str, what: str) -> Any:
    try:
        return importlib.import_module(target)
    except NOT_CAUGHT:
        raise
    except BaseException as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and (target + ".").startswith(f"{exc.name}."):
            hint = (
                f" Install it, add its folder to PYTHONPATH (the current directory is {Path.cwd()})"
                f", or name the file: 'path/to/{target.split('.')[-1]}.py:{spec.split(':')[-1]}'."
            )
        raise RewardSpecError(
            f"cannot import module {target!r} for {what} {spec!r}: "
            f"{describe_failure(exc, None)}.{hint}"
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
    _check_signature(fn, attr)
    return fn


def _check_signature(fn: RewardFn, name: str) -> None:
    """Refuse a function that no call by keyword can ever satisfy."""
    params = parameters(fn)
    if params is None:
        return  # no signature to read (some C functions): trust it
    problem = None
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for p in params:
        if p.kind is p.POSITIONAL_ONLY:
            problem = f"its parameter {p.name!r} is positional-only (before '/')"
            break
    else:
        if not named and not any(p.kind is p.VAR_KEYWORD for p in params):
            problem = "it takes no keyword arguments"
    if problem is not None:
        raise RewardSpecError(
            f"reward function {name}{inspect.signature(fn)} ({_defined_at(fn)}) cannot take "
            f"TRL's arguments: {problem}, but reward functions are called by keyword "
            f"({', '.join(STANDARD_ARGUMENTS)} and the dataset columns). Declare the ones it "
            "uses by name, e.g. def f(completions, answer, **kwargs)."
        )


def load_rewards(
    specs: list[str], weights: list[float] | None = None, callables: Iterable[RewardFn] = ()
) -> list[Reward]:
    """Load every spec (see `load_reward`), add the Python `callables`, pair each with its weight.

    `weights` None means 1.0 each; otherwise one per function, specs first. Two
    functions with the same name get suffixes (`reward`, `reward_2`) so their
    metrics stay apart.

    Example:
        >>> [r.name for r in load_rewards(["math_answer", "think_format"], [1.0, 0.5])]
        ['math_answer', 'think_format']
    """
    callables = list(callables)
    if not specs and not callables:
        raise RewardSpecError("no reward functions given; name at least one, e.g. 'math_answer'.")
    names = [*specs, *(getattr(f, "__name__", "reward") for f in callables)]
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise RewardSpecError(
            f"got {len(names)} reward functions ({', '.join(names)}) but {len(weights)} weights "
            f"({', '.join(map(str, weights))}); give one weight per reward function, in order."
        )
    for name, weight in zip(names, weights, strict=True):
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardSpecError(f"weight {weight!r} for reward {name!r} must be a finite number.")
    loaded = [load_reward(spec) for spec in specs]
    loaded += [(getattr(f, "__name__", "reward"), f) for f in callables]
    rewards: list[Reward] = []
    seen: dict[str, int] = {}
    for (name, fn), weight in zip(loaded, weights, strict=True):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        rewards.append(Reward(name=name, fn=fn, weight=float(weight)))
    return rewards


def check_arguments(rewards: list[Reward], columns: Iterable[str], where: str) -> None:
    """Refuse rewards that cannot get their arguments from a dataset with `columns`.

    Call once the data is loaded, before anything is written. `columns` are the
    dataset's columns except the prompt column; `where` names the data (its
    file). Refused: a column named like a standard argument (it would hide
    it), a function that cannot be called by keyword, and a required parameter
    that is neither a standard argument nor a column.

    Example:
        >>> check_arguments(load_rewards(["math_answer"]), ["answer"], "train.jsonl")
    """
    columns = list(dict.fromkeys(columns))
    for column in columns:
        if column in STANDARD_ARGUMENTS:
            raise RewardSpecError(clash(column, where))
    offered = [*STANDARD_ARGUMENTS, *columns]
    for reward in rewards:
        _check_signature(reward.fn, reward.name)
        for p in parameters(reward.fn) or []:
            required = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            if required and p.name not in offered:
                raise RewardSpecError(
                    f"reward function {reward.name!r} ({_defined_at(reward.fn)}) requires the "
                    f"argument {p.name!r}, which no call will give it: reward functions get "
                    f"{', '.join(STANDARD_ARGUMENTS)} and the columns of {where} "
                    f"({', '.join(columns) or 'none besides the prompt'}). Add a {p.name!r} "
                    f"column to the data, rename the parameter to one of those names, or give "
                    f"it a default ({p.name}=None)."
                )


def clash(column: str, where: str) -> str:
    return (
        f"the data {where} has a column {column!r}, the name of an argument every reward "
        f"function gets ({', '.join(STANDARD_ARGUMENTS)}), so the column would hide it; "
        f"rename the column {column!r} in {where} (and in the reward functions that read it)."
    )


def columns_read(fn: RewardFn) -> list[str]:
    """The dataset columns a reward function names (beyond the standard arguments)."""
    named = parameters(fn) or []
    kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    return [p.name for p in named if p.kind not in kinds and p.name not in STANDARD_ARGUMENTS]


def describe_builtins() -> list[tuple[str, str, list[str]]]:
    """(name, one-line description, columns read) of every built-in reward."""
    return [
        (name, (fn.__doc__ or "").strip().splitlines()[0], columns_read(fn))
        for name, fn in BUILTIN_REWARDS.items()
    ]


def parameters(fn: RewardFn) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def _code_of(fn: Any) -> Any:
    fn = inspect.unwrap(fn.func if isinstance(fn, functools.partial) else fn)
    if callable(fn) and not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        fn = type(fn).__call__  # an object with a __call__ method
    return getattr(fn, "__code__", None)


def _defined_at(fn: RewardFn) -> str:
    code = _code_of(fn)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else repr(fn)


def source_file(fn: RewardFn) -> str | None:
    code = _code_of(fn)
    return None if code is None else code.co_filename


def describe_failure(exc: BaseException, path: str | None, inside: str = __file__) -> str:
    """`Type: message at file:line`, the line being where it was raised in the user's code.

    `inside` is the module that made the call, whose frames are not the user's.
    """
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename != inside and not f.filename.startswith("<frozen")
    ]
    own = [f for f in frames if f.filename == path] or frames
    return f"{text} at {own[-1].filename}:{own[-1].lineno}" if own else text
