"""Reading the user's text and JSON files with errors that name the file; hashing, fsync."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def read_text(file: Path, fix: str) -> str:
    """The UTF-8 text of `file`; ValueError naming the file and the first bad byte.

    `fix` says what to do about it, e.g. "save it as UTF-8 YAML".
    """
    try:
        return Path(file).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{file} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#x}); {fix}."
        ) from None


def read_json_object(file: Path, fix: str) -> dict[str, Any]:
    """A file holding one JSON object, as a dict; ValueError naming the file when it is not."""
    text = read_text(file, fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}."
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} holds {json.dumps(value)[:40]}, not a JSON object; {fix}.")
    return value


def fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where downloads and converted models are kept (MLX_GRPO_CACHE overrides)."""
    default = Path.home() / ".cache" / "mlx-grpo"
    return Path(os.environ.get("MLX_GRPO_CACHE", default)).expanduser()


def models_dir() -> Path:
    """Where models kept under a name live: `--model NAME` finds `models_dir() / NAME`."""
    return cache_dir() / "models"
