"""Built-in rewards (TRL's signature): numeric answers, Qwen3's think format, equations.

`rewards.BUILTIN_REWARDS` names them for `--rewards`. `math_answer` and
`think_format` fit GSM8K-style data; `arithmetic`, `equation_format` and
`exact_answer` check one-line "a op b = c" replies against a row's `answer`
and `equation` columns.
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


# --------------------------------------------------------------------------- equations

_INTEGER = re.compile(r"-?\d+")
_EQUATION = re.compile(r"-?\d+ [+-] -?\d+ = -?\d+\.?")


def _replies(completions: list, answer: list | None) -> list[tuple[str, str | None]]:
    texts = [completion_text(c).strip() for c in completions]
    return list(zip(texts, answer or [None] * len(completions)))


def arithmetic(prompts, completions, completion_ids, answer=None, **kwargs) -> list[float | None]:
    """Correctness: 1.0 when the reply's last number is the answer, in any wording."""
    out: list[float | None] = []
    for reply, expected in _replies(completions, answer):
        numbers = _INTEGER.findall(reply)
        out.append(None if expected is None else float(bool(numbers) and numbers[-1] == expected))
    return out


def equation_format(prompts, completions, completion_ids, **kwargs) -> list[float | None]:
    """Format: 1.0 when the reply is one equation "a op b = c" and nothing else."""
    return [float(_EQUATION.fullmatch(completion_text(c).strip()) is not None) for c in completions]


def exact_answer(
    prompts, completions, completion_ids, equation=None, **kwargs
) -> list[float | None]:
    """Answer and format checked exactly: the reply is the row's equation (final period allowed)."""
    return [
        None if e is None else float(r.removesuffix(".") == e)
        for r, e in _replies(completions, equation)
    ]
