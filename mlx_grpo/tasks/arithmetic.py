"""A built-in verifiable task: small arithmetic problems, generated from a seed.

Each row asks for a sum or difference in a fixed reply format:
"What is 7 + 5? Reply with the equation and its result, like 2 + 2 = 4."
Each row carries the `answer` and `equation` columns that the built-in rewards
`arithmetic`, `equation_format` and `exact_answer` check. Training uses the
first two, so a model is paid for being right and learns the format from the
second; evaluation counts `exact_answer`.

Kinds: `add1` one-digit sums (0-9 + 0-9); `add2` two-digit sums (10-99 +
10-99); `addsub2` two-digit sums and differences (10-99 +/- 10-99,
differences may be negative).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

KINDS = ("add1", "add2")  # the main job's; addsub2 is harder than 10 minutes can teach
ALL_KINDS = ("add1", "add2", "addsub2")
INSTRUCTION = "Reply with the equation and its result, like 2 + 2 = 4."


def all_problems(kind: str) -> list[dict[str, Any]]:
    """Every problem of a kind, in a fixed order."""
    if kind == "add1":
        triples = [(a, "+", b) for a in range(10) for b in range(10)]
    elif kind == "add2":
        triples = [(a, "+", b) for a in range(10, 100) for b in range(10, 100)]
    elif kind == "addsub2":
        triples = [(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-"]
    else:
        raise ValueError(f"unknown arithmetic kind {kind!r}; use one of {', '.join(ALL_KINDS)}")
    return [
        {
            "prompt": f"What is {a} {op} {b}? {INSTRUCTION}",
            "answer": str(a + b if op == "+" else a - b),
            "equation": f"{a} {op} {b} = {a + b if op == '+' else a - b}",
            "kind": kind,
        }
        for a, op, b in triples
    ]


def make_split(
    n_train: int,
    n_test: int,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
    mix: tuple[int, ...] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out sets; the held-out set has the kinds in equal shares.

    Each kind's problems are shuffled with `seed`; the held-out set takes
    the first ones, training samples (with repeats) from the rest. At most
    half of a kind may be held out (one-digit sums have only 100 problems).
    `mix` gives the kinds' shares of the training rows as whole numbers
    ((1, 3): a quarter `add1`, three quarters `add2`); equal by default.
    """
    mix = mix or (1,) * len(kinds)
    if len(mix) != len(kinds) or min(mix) < 0 or sum(mix) == 0:
        raise ValueError(f"mix {mix} needs one share >= 0 per kind ({', '.join(kinds)})")
    cycle = [i for i, share in enumerate(mix) for _ in range(share)]
    rng = random.Random(seed)
    test: list[dict] = []
    pools = []
    for i, kind in enumerate(kinds):
        problems = all_problems(kind)
        rng.shuffle(problems)
        n = n_test // len(kinds) + (i < n_test % len(kinds))
        if n > len(problems) // 2:
            raise ValueError(
                f"{n} held-out {kind} problems is more than half of the {len(problems)} there "
                f"are; ask for at most {len(problems) // 2 * len(kinds)} test problems"
            )
        test += problems[:n]
        pools.append(problems[n:])
    train = [rng.choice(pools[cycle[i % len(cycle)]]) for i in range(n_train)]
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
