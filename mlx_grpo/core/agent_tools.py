"""Tools for agent episodes, as TRL 1.16 takes them: plain functions and environments.

A tool is a Python function (sync or `async def`) with type hints and a
Google-style docstring; the chat template's tool schema is built from them
by transformers' `get_json_schema`, as TRL's is. An environment factory
makes one instance per episode: the public methods of its class (all but
`reset` and `get_reward`) are its tools.

Tool calls are read from the model's text in the Qwen3 / Hermes form
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. The calls of many
episodes run at once (`ToolRunner`): each episode's sync calls in order in a
thread of its own, its async calls together on one event loop, as TRL orders
them. A call that raises, names no tool, cannot be parsed or runs past the
time limit gives the model `{'error': ...}` and counts as a failure; a call
that hangs is left running in its daemon thread and never holds the step.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlx_grpo.core.rewards import NOT_CAUGHT, RewardSpecError, import_target


class ToolSpecError(ValueError):
    """A tool or environment cannot be loaded or described to the model."""


def load_callable(spec: str, what: str) -> Callable:
    """The callable a 'module:name' or 'path/to/file.py:name' spec names (`what`: tool or
    environment, for the errors)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ToolSpecError(f"{what} spec {spec!r} must be 'module:name' or 'path/to/file.py:name'")
    try:
        module = import_target(target, spec, what)
    except RewardSpecError as exc:
        raise ToolSpecError(str(exc)) from None
    found = getattr(module, attr, None)
    if not callable(found):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ToolSpecError(
            f"{spec!r}: {getattr(module, '__file__', target)} has no callable {attr!r} "
            f"(it defines {', '.join(names) or 'none'})."
        )
    return found


def environment_tools(environment: Any) -> list[Callable]:
    """An environment instance's tools: its class's public methods but reset and get_reward."""
    return [
        getattr(environment, name)
        for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
        if not name.startswith("_") and name not in ("reset", "get_reward")
    ]


def schemas(tools: list[Callable]) -> list[dict[str, Any]]:
    """The JSON schema the chat template shows the model for each tool."""
    from transformers.utils import get_json_schema

    out = []
    for tool in tools:
        try:
            out.append(get_json_schema(tool))
        except Exception as exc:
            where = getattr(tool, "__qualname__", repr(tool))
            raise ToolSpecError(
                f"tool {where} cannot be described to the model: {exc} A tool needs a type "
                "hint on every argument and a Google-style docstring with an Args: section."
            ) from None
    return out


@dataclass
class ToolCall:
    """One call as the model wrote it; `error` says why it cannot be made."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.S)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls in a turn's text, in order (none: the turn is the answer)."""
    calls = []
    for body, closed in CALL.findall(text):
        if not closed:
            calls.append(ToolCall("unknown", error="the tool call has no closing </tool_call>"))
            continue
        try:
            call = json.loads(body)
        except ValueError as exc:
            calls.append(ToolCall("unknown", error=f"the tool call is not valid JSON ({exc})"))
            continue
        calls.append(_call(call))
    return calls


def _call(call: Any) -> ToolCall:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ToolCall("unknown", error='a tool call must be {"name": ..., "arguments": {...}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(call["name"], error="the tool call's arguments must be a JSON object")
    return ToolCall(call["name"], arguments)


@dataclass
class ToolResult:
    """What the model reads back (TRL's `str(result)`, or `str({'error': ...})`)."""

    name: str
    content: str
    failed: bool = False


def _failure(name: str, message: str) -> ToolResult:
    return ToolResult(name, str({"error": message}), failed=True)


class ToolRunner:
    """Runs the tool calls of many episodes at once, each call within `timeout` seconds."""

    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # episodes' threads ask for the loop at once

    def run(self, jobs: list[tuple[list[ToolCall], dict[str, Callable]]]) -> list[list[ToolResult]]:
        """For each (calls, tools by name): the results, sync ones first, then async ones."""
        return self.start(jobs)()

    def start(
        self, jobs: list[tuple[list[ToolCall], dict[str, Callable]]]
    ) -> Callable[[], list[list[ToolResult]]]:
        """Start the jobs' calls now; the function returned waits for `run`'s results."""
        out: list[list[ToolResult]] = [[] for _ in jobs]
        threads = [
            threading.Thread(target=self._episode, args=(calls, tools, out[i]), daemon=True)
            for i, (calls, tools) in enumerate(jobs)
        ]
        for t in threads:
            t.start()

        def results() -> list[list[ToolResult]]:
            for t in threads:
                t.join()  # each call is bounded by the timeout, so each episode is too
            return out

        return results

    def _episode(self, calls: list[ToolCall], tools: dict[str, Callable], out: list) -> None:
        waiting = []
        for call in calls:
            fn = tools.get(call.name)
            if call.error is not None:
                out.append(_failure(call.name, call.error))
            elif fn is None:
                out.append(_failure(call.name, f"Tool {call.name} not found."))
            elif inspect.iscoroutinefunction(fn):
                waiting.append(call)
            else:
                out.append(self._sync(fn, call))
        if waiting:
            out += self._async(waiting, tools)

    def _sync(self, fn: Callable, call: ToolCall) -> ToolResult:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn(**call.arguments)
            except NOT_CAUGHT:
                raise
            except BaseException as exc:  # SystemExit in a tool must not end the run
                box["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            return _failure(call.name, f"the tool did not finish within {self.timeout:g} s")
        if "error" in box:
            return _failure(call.name, str(box["error"]))
        return ToolResult(call.name, str(box["value"]))

    def _async(self, calls: list[ToolCall], tools: dict[str, Callable]) -> list[ToolResult]:
        async def one(call: ToolCall) -> Any:
            return await asyncio.wait_for(tools[call.name](**call.arguments), self.timeout)

        async def every() -> list[Any]:
            return await asyncio.gather(*(one(c) for c in calls), return_exceptions=True)

        results = asyncio.run_coroutine_threadsafe(every(), self._event_loop()).result()
        out = []
        for call, result in zip(calls, results):
            if isinstance(result, (asyncio.TimeoutError, TimeoutError)):
                out.append(
                    _failure(call.name, f"the tool did not finish within {self.timeout:g} s")
                )
            elif isinstance(result, BaseException):
                out.append(_failure(call.name, str(result)))
            else:
                out.append(ToolResult(call.name, str(result)))
        return out

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """One event loop for every async tool, in a daemon thread, started when first needed."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True).start()
                self._loop = loop
            return self._loop
