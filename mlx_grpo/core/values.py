"""The values a setting or a command's option allows, and how a refusal reads.

A `Range` is the finite numbers between two bounds, each open or closed; it
prints as messages say it ("> 0", "in [0, 1)"). `check_option` refuses a
command's option outside its range; `SettingError` names the settings a
TrainConfig value breaks, for settings.resolve to say where the value came from.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

MAX_SEED = 2**63 - 1
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38  # rewards and weights are float32 in the objective


@dataclass(frozen=True)
class Range:
    """The finite numbers a setting allows: `low` and `high` bounds, each closed or open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        """As in messages: '>= 1', '> 0', 'in (0, 1]', 'a finite number'."""
        low, high = _number(self.low), _number(self.high)
        if self.low is None and self.high is None:
            return "a finite number"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{low}, {high}{right}"


def shown(value: Any) -> str:
    """A value as messages show it: repr, with huge whole numbers shortened."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**19:
        return f"{float(value):.3g}" if abs(value) < 10**308 else "a number too large to use"
    return repr(value)


def _number(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e19 else f"{x:g}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
SHARE = Range(0, 1, high_open=True)  # [0, 1)
OPEN_UNIT = Range(0, 1, low_open=True, high_open=True)  # (0, 1)


def check_option(flag: str, value: float | None, allowed: Range) -> None:
    """Refuse a command's numeric option outside `allowed` (None: not given)."""
    if value is not None and value not in allowed:
        raise ValueError(f"{flag} must be {allowed}, got {value!r}; pass {flag} another value.")


# A model's org/name as the Hub spells repositories: no path tricks, no spaces, no newlines.
_HUB_ID = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def is_hub_id(name: str | None) -> bool:
    """Whether `name` has the shape of a Hub model id, org/name."""
    return isinstance(name, str) and _HUB_ID.fullmatch(name) is not None


class SettingError(ValueError):
    """A setting's value is not allowed; `keys` are the settings involved."""

    def __init__(self, keys: tuple[str, ...], rule: str, value: Any = None):
        self.keys, self.rule, self.value = keys, rule, value
        super().__init__(f"{keys[0]} {rule}, got {shown(value)}" if len(keys) == 1 else rule)
