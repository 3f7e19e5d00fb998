"""Settings from defaults, a YAML file and flags or arguments: merged, typed and checked.

A refused value is explained in one paragraph with where it came from: the
flag, the YAML file and line, the argument, or the default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from mlx_grpo.core.config import TrainConfig, check_field, field_type, setting
from mlx_grpo.core.files import read_text
from mlx_grpo.core.values import SettingError, shown


def _coerce(name: str, value: Any) -> Any:
    """A value from YAML, a flag or an argument as the field's type; lists also from "a,b"."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    base, is_list, optional = field_type(f)
    if value is None:
        if optional:
            return None
        raise SettingError((name,), "cannot be empty", value)
    if is_list:
        items = value if isinstance(value, (list, tuple)) else [value]
        flat: list[Any] = []
        for item in items:  # repeated flags and comma lists, mixed as the user typed them
            if isinstance(item, str):
                flat += [part.strip() for part in item.split(",") if part.strip()]
            else:
                flat.append(item)
        return [_scalar(name, base, v) for v in flat]
    return _scalar(name, base, value)


_TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _scalar(name: str, base: type, value: Any) -> Any:
    if base is bool and isinstance(value, str):
        if value.lower() in ("true", "yes", "1", "on"):
            return True
        if value.lower() in ("false", "no", "0", "off"):
            return False
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    number = isinstance(value, (int, float, str)) and not isinstance(value, bool)
    try:
        if base is float and number:
            return float(value)
        if base is int and number:
            if isinstance(value, (int, str)):
                with contextlib.suppress(ValueError):
                    return int(value)  # "123" exactly, however large
            as_float = float(value)  # "1e3", 2.0
            if as_float.is_integer():
                return int(as_float)
    except (ValueError, OverflowError):
        pass
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise SettingError((name,), f"must be {_TYPE_NAMES.get(base, base.__name__)}", value)


def check_keys(keys: typing.Iterable[str], where: str) -> None:
    """Reject unknown setting names, suggesting the closest known one."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{where}: unknown setting '{key}'.{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML file (kebab-case keys accepted), checked for unknown keys."""
    return _read_yaml(Path(path))[0]


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The settings of a YAML file and the line of each key."""
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder; give --config a YAML file of settings.")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; check the path given to --config.")
    text = read_text(path, "save it as UTF-8 YAML")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ValueError(f"config file {path} is not valid YAML: {detail}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path} holds a {type(data).__name__}, not a mapping of settings; "
            "write one 'key: value' a line, e.g. 'learning_rate: 1e-5'."
        )
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
        key = str(key_node.value).replace("-", "_")
        line = key_node.start_mark.line + 1
        if key in lines:
            raise ValueError(
                f"config file {path}: the setting '{key}' is given twice (lines {lines[key]} "
                f"and {line}); keep one."
            )
        lines[key] = line
    # Accept kebab-case keys as written on the command line.
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    check_keys(data, str(path))
    return data, lines


def resolve(
    config_file: str | Path | None = None, *, given_as: str = "argument", **overrides: Any
) -> TrainConfig:
    """Build a config from defaults, then a YAML file, then `overrides`.

    Overrides whose value is None are "not given" and do not replace the file.
    A value that is not allowed raises ValueError naming the setting, the value,
    what is allowed and where it came from: the YAML file and line, or the
    override (`given_as` "flag" for command-line flags, "argument" otherwise).

    Example:
        >>> cfg = resolve("grpo.yaml", learning_rate=2e-5)
    """
    check_keys(overrides, "arguments")
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if config_file:
        data, lines = _read_yaml(Path(config_file))
        values.update(data)
        origins.update({k: f"{config_file}, line {lines.get(k, '?')}" for k in data})
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
            origins[key] = given_as
    try:
        return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    except SettingError as e:
        raise ValueError(_explain(e, origins, config_file)) from None


def setting_value(name: str, value: Any, given_as: str = "flag") -> Any:
    """One setting's value, typed and checked as `resolve` checks a whole config (lists also
    from repeated flags and comma lists); a refusal reads the same."""
    try:
        typed = _coerce(name, value)
        check_field(setting(name), typed)
    except SettingError as e:
        raise ValueError(_explain(e, {name: given_as}, None)) from None
    return typed


def check_settings(given_as: str = "argument", **values: Any) -> None:
    """Refuse any of `values` that `setting_value` refuses (a tool's own arguments)."""
    for name, value in values.items():
        setting_value(name, value, given_as)


def _explain(e: SettingError, origins: dict[str, str], config_file: str | Path | None) -> str:
    """A SettingError as one paragraph: which setting, its value, the rule, where it came from."""

    def told(key: str) -> tuple[str, str]:  # (where the value came from, how to change it)
        where, flag = origins.get(key, "default"), "--" + key.replace("_", "-")
        return {
            "flag": (f"the flag {flag}", f"pass {flag} another value"),
            "argument": (f"the argument {key}=", f"pass another {key}"),
            "default": ("its default", f"set {key}"),
        }.get(where, (where, f"change {key} in {config_file}"))

    key = e.keys[0]
    if len(e.keys) == 1:
        return f"{key} {e.rule}, got {shown(e.value)} (from {told(key)[0]}); {told(key)[1]}."
    given = "; ".join(f"{k} from {told(k)[0]}" for k in e.keys)
    return f"{e.rule} ({given}); {told(key)[1]}."
