"""An agent task: multi-digit multiplication with a tool, and an answer to submit.

`PythonSandbox` is a TRL-style environment: `reset` takes the row (its
`answer`), the model may run `python(code)` (the built-in tool's subprocess)
any number of times, and `submit(answer)` records its answer; `get_reward`
is 1 for the right one, 0 otherwise. `Calculator` is the same with a
`multiply(a, b)` tool instead of Python. `write_task` writes the prompts.
`with_tool_template` gives a ChatML model whose template lacks tools (such
as SmolLM2) one that shows them in Qwen3's form.

Example:
    >>> from mlx_grpo.tasks.tool_arithmetic import PythonSandbox, write_task
    >>> write_task("mult.jsonl", rows=200)
    >>> mlx_grpo.train(model=..., data="mult.jsonl", environment_factory=PythonSandbox)
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from mlx_grpo.core.python_tool import run_python
from mlx_grpo.tasks.toy import GENERATION_PROMPT, TOOL_MESSAGES

PROMPT = (
    "What is {a} * {b}? You can run Python with the python tool. When you know the "
    "product, call submit with it."
)
CALCULATOR_PROMPT = (
    "What is {a} * {b}? Call the multiply tool, then call submit with the product it gives."
)

# Qwen3's way of showing tools, calls and results, for a ChatML template without tools.
TOOLS_TEMPLATE = (
    (
        "{%- if tools %}"
        "{{- '<|im_start|>system\\n' }}"
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}"
        "{%- else %}{{- 'You are a helpful assistant.\\n\\n' }}{%- endif %}"
        "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n"
        "\\nThe function signatures are within <tools></tools> XML tags:\\n<tools>' }}"
        "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
        "{{- '\\n</tools>\\n\\nFor each function call, return a JSON object with the function "
        "name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
        '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n'
        "</tool_call><|im_end|>\\n' }}"
        "{%- endif %}"
    )
    + TOOL_MESSAGES
    + GENERATION_PROMPT
)


class _Answered:
    """An episode that ends with `submit(answer)`, scored 1 for the row's answer."""

    def reset(self, answer: int | None = None, **row) -> None:
        self.answer, self.submitted, self.runs = answer, None, 0

    def submit(self, answer: int) -> str:
        """Give the final answer.

        Args:
            answer: The product.
        """
        self.submitted = answer
        return "submitted"

    def get_reward(self) -> float:
        return 1.0 if self.submitted is not None and self.submitted == self.answer else 0.0


class PythonSandbox(_Answered):
    """One episode: a multiplication to solve with `python`, answered with `submit`."""

    def python(self, code: str) -> str:
        """Run a Python program and return what it prints.

        Args:
            code: A complete Python program; print every value you need to see.
        """
        self.runs += 1
        return run_python(code)


class Calculator(_Answered):
    """One episode: a multiplication to solve with `multiply`, answered with `submit`."""

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        """
        self.runs += 1
        return a * b


def write_task(
    path: str | Path, rows: int = 200, seed: int = 0, digits: int = 4, prompt: str = PROMPT
) -> Path:
    """`rows` multiplications of two numbers of up to `digits` digits, with their answers."""
    rng = random.Random(seed)
    path = Path(path)
    with path.open("w") as f:
        for _ in range(rows):
            a, b = rng.randrange(10, 10**digits), rng.randrange(10, 10**digits)
            f.write(json.dumps({"prompt": prompt.format(a=a, b=b), "answer": a * b}) + "\n")
    return path


def with_tool_template(model: str | Path, target: str | Path) -> Path:
    """A copy of the model folder `model` (weights linked, not copied) whose chat template
    shows tools in Qwen3's form (`TOOLS_TEMPLATE`), for ChatML models without one."""
    model, target = Path(model), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        if item.name == "tokenizer_config.json" or (target / item.name).exists():
            continue
        if item.suffix == ".safetensors":
            (target / item.name).symlink_to(item.resolve())
        else:
            shutil.copy(item, target / item.name)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return target
