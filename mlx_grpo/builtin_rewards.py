"""Built-in rewards: a numeric math-answer check and Qwen3's think format.

Both have TRL's reward signature and live here with the answer parsing they
need; `rewards.BUILTIN_REWARDS` names them for `--rewards`.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

# --------------------------------------------------------------------------- answer parsing

_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_REAL = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_NEG = r"(?:(?<![\w)])-)?"  # a minus that is a sign, not "5-3"
_NUMBER_RE = re.compile(
    rf"(?P<fneg>{_NEG})\\[dt]?frac\s*\{{\s*(?P<fnum>-?{_REAL})\s*\}}\s*\{{\s*(?P<fden>-?{_REAL})\s*\}}"
    rf"|(?P<neg>{_NEG})(?P<num>{_REAL})(?:\s*/\s*(?P<den>{_REAL}))?"
)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")


def _last_number(text: str) -> float | None:
    """The last number in `text`: 1,234 / -3.5 / 3/4 / \\frac{3}{4}; $ and % are ignored."""
    value = None
    for m in _NUMBER_RE.finditer(text.replace("\\!", "").replace("{,}", ",")):
        if m.group("fnum") is not None:
            num, den, neg = m.group("fnum"), m.group("fden"), m.group("fneg")
        else:
            num, den, neg = m.group("num"), m.group("den"), m.group("neg")
        value = float(num.replace(",", ""))
        if den is not None:
            denominator = float(den.replace(",", ""))
            value = value / denominator if denominator != 0 else math.nan
        value = -value if neg else value
    return None if value is None or math.isnan(value) else value


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, nested braces included; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return text[i + 1 :]  # unclosed: take the rest


def extract_answer(text: str) -> float | None:
    """The final numeric answer of a completion or a reference solution.

    Reads the text after `</think>` when there is one, then the first format
    present, in this order: the last `\\boxed{...}`, the last
    `<answer>...</answer>`, the last GSM8K `#### X`, else the last number in
    the text. None if the chosen part holds no number.

    Example:
        >>> extract_answer("<think>2+2</think> So \\\\boxed{\\\\frac{8}{2}}.")
        4.0
        >>> extract_answer("She pays $1,234.")
        1234.0
    """
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    boxed = _last_boxed(text)
    if boxed is not None:
        return _last_number(boxed)
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        return _last_number(tags[-1])
    marks = _GSM8K_RE.findall(text)
    if marks:
        return _last_number(marks[-1])
    return _last_number(text)


def completion_text(completion: Any) -> str:
    """Plain text of a completion: a string, or TRL's chat form (the last message's content)."""
    if isinstance(completion, (list, tuple)):
        return str(completion[-1]["content"]) if completion else ""
    return str(completion)


# --------------------------------------------------------------------------- built-in rewards


def math_answer(
    prompts: list,
    completions: list,
    completion_ids: list,
    answer: list | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 if the completion's final number equals the row's `answer`, else 0.0.

    Both sides are read with `extract_answer` (a GSM8K reference "... #### 18"
    works) and compared with a relative tolerance of 1e-6. None where the row has
    no answer, or an answer without a number (this also warns: likely a wrong column).

    Example:
        >>> math_answer(["q"], ["The total is $18."], [[0]], answer=["... #### 18"])
        [1.0]
    """
    if answer is None:
        return [None] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"got {len(answer)} answers for {len(completions)} completions")
    scores: list[float | None] = []
    unreadable = []
    for completion, ref in zip(completions, answer, strict=True):
        is_number = isinstance(ref, (int, float)) and not isinstance(ref, bool)
        target = float(ref) if is_number else None if ref is None else extract_answer(str(ref))
        if target is None:
            if ref is not None:
                unreadable.append(ref)
            scores.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        ok = predicted is not None and abs(predicted - target) <= 1e-6 * max(1.0, abs(target))
        scores.append(1.0 if ok else 0.0)
    if unreadable:
        warnings.warn(
            f"math_answer: {len(unreadable)} reference answer(s) hold no number "
            f"(first: {str(unreadable[0])[:80]!r}); those rows get no math reward. "
            "The answer column must be a number or end with '#### <number>'.",
            stacklevel=2,
        )
    return scores


def think_format(
    prompts: list, completions: list, completion_ids: list, **kwargs: Any
) -> list[float | None]:
    """1.0 if the completion is `<think>reasoning</think>answer`, else 0.0.

    Exactly one `</think>`, a non-empty answer after it, and no `<think>` except an
    optional one at the very start (thinking templates may end the prompt with it).

    Example:
        >>> think_format(["q"] * 2, ["<think>hm</think> 4", "4"], [[0], [0]])
        [1.0, 0.0]
    """
    return [1.0 if _is_think_formatted(completion_text(c)) else 0.0 for c in completions]


def _is_think_formatted(text: str) -> bool:
    text = text.strip()
    if text.count("</think>") != 1:
        return False
    before, after = text.split("</think>")
    if "<think>" in after or not after.strip():
        return False
    opens = before.count("<think>")
    return opens == 0 or (opens == 1 and before.startswith("<think>"))
