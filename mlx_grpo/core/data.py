"""Prompt datasets: read JSONL / JSON / Hugging Face rows, validate them, encode the prompts.

A row is a JSON object with a prompt column (text, or chat messages
`[{"role": "user", "content": "..."}]`) and any other columns (e.g. `answer`),
which are handed to the reward functions. Every error names the file and the
line of the offending row, says what is wrong and how to fix it.

Example:
    >>> rows = load_prompts("gsm8k.jsonl", tokenizer, prompt_column="question")  # doctest: +SKIP
    >>> rows[0].source, rows[0].columns["answer"][-7:]  # doctest: +SKIP
    ('gsm8k.jsonl:1', '#### 72')
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_grpo.core.files import read_text

ROLES = ("system", "user", "assistant", "tool", "developer")
_PROMPT_LIKE = ("prompt", "question", "problem", "instruction", "query", "input", "messages")
_HF_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


class DataError(ValueError):
    """The prompt data cannot be read or a row is invalid."""


@dataclass
class PromptRow:
    prompt: str | list[dict]  # as in the data: what reward functions get as `prompts`
    prompt_ids: list[int]  # (T,) token ids fed to the model, chat template applied
    columns: dict[str, Any]  # every other column of the row (e.g. "answer")
    source: str  # "path/file.jsonl:LINE" (1-based) or "hf:<id>[<split>]:<index>"


def per_completion(rows: list[PromptRow], g: int) -> list[PromptRow]:
    """The row of each of G completions per row: completions b * G .. b * G + G - 1 are row b's,
    as a rollout orders them."""
    return [row for row in rows for _ in range(g)]


def load_rows(
    path_or_id: str, prompt_column: str = "prompt", split: str = "train"
) -> tuple[list[dict], list[str]]:
    """Read and validate raw rows; return them with their sources ("file:LINE").

    `path_or_id` is a `.jsonl` file (one object a line, blank lines skipped),
    a `.json` file holding a list of objects, or, when no such file exists, a
    Hugging Face dataset id `org/name` or `org/name:config` (needs the
    optional `datasets` package and network access).

    Example:
        >>> rows, sources = load_rows("train.jsonl", prompt_column="question")  # doctest: +SKIP
        >>> sources[0]  # doctest: +SKIP
        'train.jsonl:1'
    """
    if not str(path_or_id).strip():
        raise DataError("no prompt data given: pass --data a .jsonl or .json file of prompt rows.")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        raise DataError(f"{path_or_id} is a folder; give a .jsonl or .json file of prompt rows.")
    if path.is_file():
        try:
            text = read_text(path, "save it as UTF-8 JSON lines")
        except ValueError as exc:
            raise DataError(str(exc).replace(str(path), path_or_id, 1)) from None
        pairs = _parse_json_list(text, path_or_id) if _is_json_list(path, text) else None
        if pairs is None:
            pairs = _parse_jsonl(text, path_or_id)
        if not pairs:
            raise DataError(
                f"{path_or_id} holds no rows; write one JSON object a line, "
                f'e.g. {{"{prompt_column}": "What is 2+2?", "answer": "4"}}.'
            )
        sources = [f"{path_or_id}:{line}" for line, _ in pairs]
        rows = [row for _, row in pairs]
    elif _HF_ID_RE.match(path_or_id) and path.suffix.lower() not in (".json", ".jsonl"):
        rows, sources = _load_hf(path_or_id, split)
    else:
        raise DataError(
            f"prompt file {path_or_id!r} does not exist (looked at {path.resolve()}). "
            "Check the path; Hugging Face datasets are given as 'org/name'."
        )
    for row, source in zip(rows, sources, strict=True):
        _validate_row(row, source, prompt_column)
    return rows, sources


def _is_json_list(path: Path, text: str) -> bool:
    return path.suffix.lower() == ".json" and text.lstrip().startswith("[")


def _parse_jsonl(text: str, name: str) -> list[tuple[int, Any]]:
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pairs.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            start = line.strip()[:80]
            raise DataError(
                f"{name}:{number}: invalid JSON ({exc.msg} at column {exc.colno}) in line "
                f"starting {start!r}. Each line must be one complete JSON object."
            ) from exc
    return pairs


def _parse_json_list(text: str, name: str) -> list[tuple[int, Any]]:
    """Decode a JSON array element by element, keeping each element's line number."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    pairs = []
    try:
        while True:
            pos = _skip_space(text, pos)
            if text.startswith("]", pos):
                return pairs
            value, end = decoder.raw_decode(text, pos)
            pairs.append((text.count("\n", 0, pos) + 1, value))
            pos = _skip_space(text, end)
            if text.startswith(",", pos):
                pos += 1
            elif not text.startswith("]", pos):
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
    except json.JSONDecodeError as exc:
        line = text.splitlines()[exc.lineno - 1].strip()[:80] if text.strip() else ""
        raise DataError(
            f"{name}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}) in line "
            f"starting {line!r}. The file must hold one JSON list of objects."
        ) from exc


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        raise json.JSONDecodeError("the list is not closed with ']'", text, len(text))
    return pos


def _load_hf(dataset_id: str, split: str) -> tuple[list[dict], list[str]]:
    try:
        import datasets  # optional: not a dependency of mlx-grpo
    except ImportError as exc:
        raise DataError(
            f"no file named {dataset_id!r}, and loading it as a Hugging Face dataset needs the "
            "`datasets` package (`pip install datasets`) and network access. "
            "Otherwise give the path of a .jsonl file."
        ) from exc
    name, _, config = dataset_id.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:
        raise DataError(
            f"could not load Hugging Face dataset {dataset_id!r} (split {split!r}): "
            f"{type(exc).__name__}: {exc}. Check the id, the split, and 'org/name:config' "
            "for datasets with configs."
        ) from exc
    rows = [dict(row) for row in data]
    if not rows:
        raise DataError(f"Hugging Face dataset {dataset_id!r} split {split!r} has no rows.")
    return rows, [f"hf:{dataset_id}[{split}]:{i}" for i in range(len(rows))]


def _validate_row(row: Any, source: str, prompt_column: str) -> None:
    if not isinstance(row, dict):
        raise DataError(
            f'{source}: expected a JSON object like {{"{prompt_column}": "..."}}, '
            f"got {_a(type(row).__name__)}: {json.dumps(row)[:80]}"
        )
    if prompt_column not in row:
        raise DataError(
            f"{source}: no {prompt_column!r} column; the row has {sorted(row)}."
            f"{_column_hint(prompt_column, list(row))}"
        )
    prompt = row[prompt_column]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(
                f"{source}: the {prompt_column!r} column is empty; write a prompt there or "
                "delete that row."
            )
    elif isinstance(prompt, list):
        _validate_messages(prompt, source, prompt_column)
    else:
        raise DataError(
            f"{source}: the {prompt_column!r} column is {_a(type(prompt).__name__)}; it must be "
            'text or a list of messages [{"role": "user", "content": "..."}].'
        )


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _column_hint(prompt_column: str, columns: list[str]) -> str:
    close = difflib.get_close_matches(prompt_column, columns, n=1, cutoff=0.5)
    if not close:
        close = [c for c in _PROMPT_LIKE if c in columns][:1]
    if close:
        return f" Did you mean --prompt-column {close[0]}?"
    return " Name the prompt column with --prompt-column."


def _validate_messages(messages: list, source: str, column: str) -> None:
    if not messages:
        raise DataError(f"{source}: the {column!r} column is an empty list of messages.")
    for i, message in enumerate(messages):
        where = f"{source}: message {i} of the {column!r} column"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f'{where} must be an object {{"role": ..., "content": ...}}; '
                f"got {json.dumps(message)[:80]}"
            )
        if message["role"] not in ROLES:
            raise DataError(f"{where} has role {message['role']!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where} has content of type {type(message['content']).__name__}; it must be text."
            )
    if not any(m["content"].strip() for m in messages):
        raise DataError(f"{source}: every message of the {column!r} column is empty.")


def encode_prompt(
    prompt: str | list[dict],
    tokenizer: Any,
    system_prompt: str | None = None,
    enable_thinking: bool | None = None,
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids for one prompt, through the tokenizer's chat template when it has one.

    With a chat template, a text prompt becomes one user message, the system
    prompt is put first unless the messages start with one, and the generation
    prompt is added (`enable_thinking` goes to templates that read it, such as
    Qwen3's). Without one, the text (after `system_prompt` and a blank line) is
    encoded with the tokenizer's default special tokens (BOS where it adds one).

    Example:
        >>> encode_prompt("2+2?", tokenizer, enable_thinking=False)  # doctest: +SKIP
        [151644, 872, ...]
    """
    if getattr(tokenizer, "chat_template", None):
        messages = (
            list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        )
        if system_prompt and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": system_prompt})
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        if tools:  # an agent's: their schemas, which the template shows the model
            extra["tools"] = tools
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **extra
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    if isinstance(prompt, list):
        raise DataError(
            "the prompt is a list of chat messages but the tokenizer has no chat template; "
            "give text prompts, or use a model whose tokenizer_config.json has a chat_template."
        )
    text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    return list(tokenizer.encode(text))


def load_prompts(
    path_or_id: str,
    tokenizer: Any,
    prompt_column: str = "prompt",
    system_prompt: str | None = None,
    enable_thinking: bool | None = None,
    max_prompt_tokens: int | None = None,
    split: str = "train",
) -> list[PromptRow]:
    """Load, validate and encode a prompt dataset (see `load_rows`, `encode_prompt`).

    Example:
        >>> rows = load_prompts("train.jsonl", tokenizer, prompt_column="question",
        ...                     enable_thinking=False, max_prompt_tokens=512)  # doctest: +SKIP
        >>> rows[0].source, len(rows[0].prompt_ids) <= 512  # doctest: +SKIP
        ('train.jsonl:1', True)
    """
    rows, sources = load_rows(path_or_id, prompt_column=prompt_column, split=split)
    out = []
    for row, source in zip(rows, sources, strict=True):
        prompt = row[prompt_column]
        try:
            ids = encode_prompt(prompt, tokenizer, system_prompt, enable_thinking)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from exc
        except Exception as exc:
            raise DataError(
                f"{source}: the tokenizer's chat template failed on this prompt: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise DataError(
                f"{source}: the prompt has {len(ids)} tokens (chat template included), more "
                f"than the limit of {max_prompt_tokens}: --max-prompt-length, or when unset the "
                "model's context (max_position_embeddings in its config.json) less "
                "--max-completion-length. Shorten or drop that row, raise --max-prompt-length if "
                "you set it, lower --max-completion-length, or use a model with a longer context."
            )
        columns = {k: v for k, v in row.items() if k != prompt_column}
        out.append(PromptRow(prompt=prompt, prompt_ids=ids, columns=columns, source=source))
    return out


def fingerprint(rows: list[PromptRow]) -> dict[str, Any]:
    """Row count and SHA-256 of the prompt rows (prompt, encoded ids, other columns)."""
    digest = hashlib.sha256()
    for row in rows:
        record = [row.prompt, row.prompt_ids, row.columns]
        digest.update(json.dumps(record, sort_keys=True, default=str).encode() + b"\n")
    return {"rows": len(rows), "sha256": digest.hexdigest()}


__all__ = ["DataError", "PromptRow", "encode_prompt", "load_prompts", "load_rows"]
