"""An agent task: multi-digit multiplication with a Python tool, and an answer to submit.

`PythonSandbox` is a TRL-style environment: `reset` takes the row (its
`answer`), the model may run `python(code)` (the built-in tool's subprocess)
any number of times, and `submit(answer)` records its answer; `get_reward`
is 1 for the right one, 0 otherwise. `write_task` writes the prompts.

Example:
    >>> from mlx_grpo.tasks.tool_arithmetic import PythonSandbox, write_task
    >>> write_task("mult.jsonl", rows=200)
    >>> mlx_grpo.train(model=..., data="mult.jsonl", environment_factory=PythonSandbox)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mlx_grpo.core.python_tool import run_python

PROMPT = (
    "What is {a} * {b}? You can run Python with the python tool. When you know the "
    "product, call submit with it."
)


class PythonSandbox:
    """One episode: a multiplication to solve with `python`, answered with `submit`."""

    def reset(self, answer: int | None = None, **row) -> None:
        self.answer, self.submitted, self.runs = answer, None, 0

    def python(self, code: str) -> str:
        """Run a Python program and return what it prints.

        Args:
            code: A complete Python program; print every value you need to see.
        """
        self.runs += 1
        return run_python(code)

    def submit(self, answer: int) -> str:
        """Give the final answer.

        Args:
            answer: The product.
        """
        self.submitted = answer
        return "submitted"

    def get_reward(self) -> float:
        return 1.0 if self.submitted is not None and self.submitted == self.answer else 0.0


def write_task(path: str | Path, rows: int = 200, seed: int = 0, digits: int = 4) -> Path:
    """`rows` multiplications of two numbers of up to `digits` digits, with their answers."""
    rng = random.Random(seed)
    path = Path(path)
    with path.open("w") as f:
        for _ in range(rows):
            a, b = rng.randrange(10, 10**digits), rng.randrange(10, 10**digits)
            f.write(json.dumps({"prompt": PROMPT.format(a=a, b=b), "answer": a * b}) + "\n")
    return path
