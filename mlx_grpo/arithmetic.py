"""A built-in verifiable task: small arithmetic problems, generated from a seed.

Each row asks for a sum or difference and a bare-number reply:
"What is 7 + 5? Reply with the number only." The reward `arithmetic` gives
1.0 for a reply that is exactly the number ("12"), 0.5 for a reply whose
last number is right but which says more ("7 + 5 = 12."), 0 otherwise; the
half credit lets a model that computes but chats learn the format.

Kinds: `add1` one-digit sums (0-9 + 0-9); `addsub2` two-digit sums and
differences (10-99 +/- 10-99, differences may be negative).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

KINDS = ("add1", "addsub2")
INSTRUCTION = "Reply with the number only."
_NUMBER = re.compile(r"-?\d+")


def problem(kind: str, rng: random.Random) -> dict[str, Any]:
    """One problem row: prompt, answer (a string of digits), kind."""
    if kind == "add1":
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), "+"
    elif kind == "addsub2":
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
    else:
        raise ValueError(f"unknown arithmetic kind {kind!r}; use one of {', '.join(KINDS)}")
    value = a + b if op == "+" else a - b
    return {"prompt": f"What is {a} {op} {b}? {INSTRUCTION}", "answer": str(value), "kind": kind}


def make_split(
    n_train: int, n_test: int, seed: int = 0, kinds: tuple[str, ...] = KINDS
) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out problem sets, kinds in equal shares."""
    rng = random.Random(seed)
    test: list[dict] = []
    seen: set[str] = set()
    while len(test) < n_test:
        row = problem(kinds[len(test) % len(kinds)], rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            test.append(row)
    train: list[dict] = []
    while len(train) < n_train:
        row = problem(kinds[len(train) % len(kinds)], rng)
        if row["prompt"] not in seen:  # repeats within train are fine, test leaks are not
            train.append(row)
    return train, test


def write_split(
    directory: str | Path, n_train: int, n_test: int, seed: int = 0
) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl into `directory`; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.jsonl", directory / "test.jsonl"
    for path, rows in zip(paths, make_split(n_train, n_test, seed)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def arithmetic(prompts, completions, completion_ids, answer=None, **kwargs) -> list[float | None]:
    """1.0 for exactly the number, 0.5 for the right last number in a longer reply, else 0."""
    out: list[float | None] = []
    for text, expected in zip(completions, answer or [None] * len(completions)):
        if expected is None:
            out.append(None)
            continue
        reply = text.strip()
        numbers = _NUMBER.findall(reply)
        if reply == str(expected):
            out.append(1.0)
        elif numbers and numbers[-1] == str(expected):
            out.append(0.5)
        else:
            out.append(0.0)
    return out
