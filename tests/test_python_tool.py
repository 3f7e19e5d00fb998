"""The built-in python tool: output back, errors raised for the model to read, a time
limit, a memory limit and no network."""

import sys
import time

import pytest

from mlx_grpo.core.agent_tools import ToolCall, ToolRunner, schemas
from mlx_grpo.core.python_tool import python, run_python


def test_it_returns_what_the_program_prints():
    assert python("print(6 * 7)") == "42\n"
    assert python("import math\nprint(math.factorial(20))") == "2432902008176640000\n"


def test_an_error_is_the_last_line_of_the_traceback():
    with pytest.raises(RuntimeError, match="ZeroDivisionError: division by zero"):
        python("print(1 / 0)")


def test_a_program_that_runs_too_long_is_stopped():
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="ran past 0.5 s"):
        run_python("while True: pass", timeout=0.5)
    assert time.perf_counter() - start < 5


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is enforced on Linux")
def test_a_program_past_the_memory_limit_fails():
    with pytest.raises(RuntimeError, match="MemoryError"):
        run_python("x = bytearray(400 * 1024 * 1024)\nprint(len(x))", memory_mb=200)


def test_sockets_are_refused():
    with pytest.raises(RuntimeError, match="network access is disabled"):
        python("import socket\nsocket.create_connection(('127.0.0.1', 9))")


def test_it_runs_in_an_empty_folder_without_the_parent_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    assert python("import os\nprint(sorted(os.listdir('.')), 'SECRET_TOKEN' in os.environ)") == (
        "[] False\n"
    )


def test_as_a_tool_its_failures_reach_the_model():
    assert schemas([python])[0]["function"]["name"] == "python"
    (results,) = ToolRunner(timeout=30).run(
        [([ToolCall("python", {"code": "print(2 ** 10)"}), ToolCall("python", {"code": "1/0"})],
          {"python": python})]
    )  # fmt: skip
    assert results[0].content == "1024\n" and not results[0].failed
    assert results[1].failed and "ZeroDivisionError" in results[1].content
