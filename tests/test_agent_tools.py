"""Agent tools: loading, schemas, parsing the model's tool calls, and running them safely
(a tool that raises, hangs, or is called wrongly gives an error result; episodes run at
once)."""

import asyncio
import json
import time

import pytest
from transformers.utils import get_json_schema

from mlx_grpo.core.agent_tools import (
    ToolCall,
    ToolRunner,
    ToolSpecError,
    environment_tools,
    load_callable,
    parse_tool_calls,
    schemas,
)


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def fail(x: str) -> str:
    """Always raises.

    Args:
        x: Anything.
    """
    raise ValueError(f"cannot handle {x}")


def nap(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return f"slept {seconds}"


async def anap(seconds: float) -> str:
    """Sleep without blocking, then say so.

    Args:
        seconds: How long.
    """
    await asyncio.sleep(seconds)
    return f"async slept {seconds}"


class Counter:
    """A TRL-style environment: reset, two tools, a reward, and a private helper."""

    def reset(self, **row):
        self.total = 0

    def add(self, n: int) -> int:
        """Add to the total.

        Args:
            n: How much.
        """
        self.total += n
        return self.total

    def read(self) -> int:
        """The total so far."""
        return self.total

    def get_reward(self) -> float:
        return float(self.total)

    def _helper(self):
        return None


TOOLS = {f.__name__: f for f in (multiply, fail, nap, anap)}


def test_tool_calls_are_read_as_the_model_wrote_them():
    text = (
        'Let me compute.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n'
        '</tool_call>\n<tool_call>{"name": "nap", "arguments": "{\\"seconds\\": 0}"}</tool_call>'
    )
    assert parse_tool_calls(text) == [
        ToolCall("multiply", {"a": 6, "b": 7}),
        ToolCall("nap", {"seconds": 0}),  # arguments given as a JSON string
    ]
    assert parse_tool_calls("The answer is 42.") == []


@pytest.mark.parametrize(
    "text, error",
    [
        ("<tool_call>{name: multiply}</tool_call>", "not valid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'must be {"name": ..., "arguments": {...}}'),
        (
            '<tool_call>{"name": "multiply", "arguments": [1, 2]}</tool_call>',
            "must be a JSON object",
        ),
        ('<tool_call>{"name": "multiply", "arguments": {"a": 1', "no closing </tool_call>"),
    ],
    ids=["not-json", "no-name", "arguments-not-object", "unclosed"],
)
def test_a_malformed_call_is_kept_with_the_reason(text, error):
    (call,) = parse_tool_calls(text)
    assert error in call.error


def test_results_errors_and_unknown_tools_read_as_trl_writes_them():
    calls = [
        ToolCall("multiply", {"a": 6, "b": 7}),
        ToolCall("fail", {"x": "this"}),
        ToolCall("divide", {"a": 1}),
        ToolCall("multiply", {"a": 1}),  # a missing argument: the call raises TypeError
        ToolCall("unknown", error="the tool call is not valid JSON (...)"),
    ]
    (results,) = ToolRunner().run([(calls, TOOLS)])
    assert [(r.name, r.failed) for r in results] == [
        ("multiply", False),
        ("fail", True),
        ("divide", True),
        ("multiply", True),
        ("unknown", True),
    ]
    assert results[0].content == "42"
    assert results[1].content == str({"error": "cannot handle this"})
    assert results[2].content == "{'error': 'Tool divide not found.'}"
    assert "missing 1 required positional argument" in results[3].content


def test_a_hanging_tool_times_out_without_holding_the_other_episodes():
    runner = ToolRunner(timeout=0.3)
    jobs = [
        ([ToolCall("nap", {"seconds": 30})], TOOLS),
        ([ToolCall("multiply", {"a": 2, "b": 3})], TOOLS),
        ([ToolCall("anap", {"seconds": 30})], TOOLS),
    ]
    start = time.perf_counter()
    hung, quick, hung_async = runner.run(jobs)
    assert time.perf_counter() - start < 2.0
    assert hung[0].failed and "did not finish within 0.3 s" in hung[0].content
    assert hung_async[0].failed and "did not finish within 0.3 s" in hung_async[0].content
    assert quick[0].content == "6" and not quick[0].failed


def test_episodes_run_at_once_and_async_calls_come_after_sync_ones():
    runner = ToolRunner(timeout=5)
    jobs = [([ToolCall("anap", {"seconds": 0.4}), ToolCall("nap", {"seconds": 0.4})], TOOLS)] * 4
    start = time.perf_counter()
    results = runner.run(jobs)
    assert time.perf_counter() - start < 2.4  # 4 episodes x 0.8 s in sequence would be 3.2 s
    for episode in results:
        assert [r.content for r in episode] == ["slept 0.4", "async slept 0.4"]


def test_an_environments_tools_are_its_public_methods_but_reset_and_get_reward():
    env = Counter()
    env.reset()
    tools = environment_tools(env)
    assert [t.__name__ for t in tools] == ["add", "read"]
    by_name = {t.__name__: t for t in tools}
    results = ToolRunner().run([([ToolCall("add", {"n": 2}), ToolCall("add", {"n": 3})], by_name)])
    assert [r.content for r in results[0]] == ["2", "5"]  # in order, on this instance
    assert env.get_reward() == 5.0


def test_schemas_are_transformers_own_and_an_undocumented_tool_is_refused():
    env = Counter()
    assert schemas([multiply, *environment_tools(env)]) == [
        get_json_schema(multiply),
        get_json_schema(env.add),
        get_json_schema(env.read),
    ]
    assert schemas([multiply])[0]["function"]["parameters"]["properties"]["a"]["type"] == "integer"

    def bare(a):
        return a

    with pytest.raises(ToolSpecError, match="bare cannot be described.*type hint"):
        schemas([bare])


def test_tools_and_environments_load_from_files_and_modules(tmp_path):
    (tmp_path / "my_tools.py").write_text(
        "def double(x: int) -> int:\n"
        '    """Double it.\n\n    Args:\n        x: A number.\n    """\n'
        "    return 2 * x\n\nclass Env:\n    def reset(self, **row):\n        return None\n"
    )
    assert load_callable(f"{tmp_path}/my_tools.py:double", "tool")(4) == 8
    assert load_callable(f"{tmp_path}/my_tools.py:Env", "environment")().reset() is None
    assert load_callable("json:dumps", "tool")([1]) == json.dumps([1])
    with pytest.raises(ToolSpecError, match="has no callable 'triple'.*double"):
        load_callable(f"{tmp_path}/my_tools.py:triple", "tool")
    with pytest.raises(ToolSpecError, match="tool file .*nowhere.py.* not found"):
        load_callable("nowhere.py:double", "tool")
    with pytest.raises(ToolSpecError, match="must be 'module:name'"):
        load_callable("double", "tool")
