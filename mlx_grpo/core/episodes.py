"""Agent episodes: B x G conversations in which the model calls tools, decoded in one batch.

Every episode starts as a rollout row (prompts prefilled once, caches
repeated G times) and the batch decodes. A row whose turn ends (EOS) with
tool calls (agent_tools.py) leaves the batch and its tools start at once
(`ToolRunner`: the calls of rows that end together run concurrently, and
while the others decode). Its results, rendered by the chat template as TRL
renders them (`tool_suffix`), are prefilled into that row's own KV cache
after its turn's EOS token, so the prompt and the earlier turns never run
again, and the row rejoins the batch at the next decode step: no row waits
for the others' turns to end. (The "pause" schedule, kept for comparison,
lets the rows go on together once no row is in its turn; with turns of
unequal lengths it makes more decode steps: see scripts/bench_agent.py.)
The rejoin point depends only on the tokens, so a rollout is reproducible.

An episode ends with a turn without tool calls, after
`max_tool_calling_iterations` rounds of tools, or at
`max_completion_length` tokens, which count the whole episode with its
tool results; a result that would not fit is rolled back and the episode
ends after the turn that asked for it, as in TRL. Tool-result tokens are
part of the sequence the update reads but not of its loss: `loss_mask` is 0
on them, and so is their sampled log-prob.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_grpo.core.agent_tools import ToolCall, ToolRunner, parse_tool_calls
from mlx_grpo.core.caches import RolloutCache
from mlx_grpo.core.config import SamplingSettings
from mlx_grpo.core.models import left_pad
from mlx_grpo.core.rollout import Noise, RolloutBatch, decode_step, make_draw, prefill


@dataclass
class Episode:
    """One conversation's completion as it grows: tokens, which are the model's, messages."""

    tools: dict[str, Callable]  # what this episode may call, by name
    ids: list[int] = field(default_factory=list)  # every completion token, tool results too
    trained: list[int] = field(default_factory=list)  # 1: the model's token, 0: a tool result's
    logp: list[float] = field(default_factory=list)  # sampled log-probs (0 for tool results)
    turn: int = 0  # where the current turn starts in ids
    messages: list[dict[str, Any]] = field(default_factory=list)  # assistant and tool turns
    rounds: int = 0  # rounds of tool calls made
    calls: int = 0
    failures: int = 0
    truncated: bool = False  # stopped by max_completion_length mid-turn
    failure: BaseException | None = None  # its environment's reset raised (on_reward_error)


Pick = Callable[[mx.array, mx.array, np.ndarray], tuple[mx.array, mx.array]]


def run_episodes(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    episodes: list[Episode],
    sampling: SamplingSettings,
    eos_ids: list[int],
    pad_id: int,
    runner: ToolRunner,
    suffix: Callable[[list[dict[str, Any]]], list[int]],
    max_rounds: int,
    noise: Noise | None = None,
    pick: Pick | None = None,
    schedule: str = "rejoin",
) -> RolloutBatch:
    """Decode the episodes (G = len(episodes) / len(prompts) per prompt) to their ends, in
    place; the rollout they make, with the loss mask that leaves tool results out.

    `suffix(tool messages)` gives the tokens that follow a turn's EOS: the
    tool results and the next assistant header. `pick(logits, u, rows)`
    replaces sampling (tests force tokens with it). A row's tools start the
    moment its turn ends; with `schedule` "rejoin" the row goes on at the
    next decode step, with "pause" the rows that called tools go on together
    once no row is still in its turn.
    """
    g = len(episodes) // len(prompts)
    tokens, padding = left_pad(prompts, pad_id)
    logits, cache = prefill(model, tokens, padding, g, sampling.max_completion_length)
    draw = make_draw(sampling)
    pick = pick or (lambda logits, u, rows: draw(logits, u))
    decoder = _Decoder(model, tokenizer, episodes, sampling, eos_ids, noise or Noise.fresh())
    turns = _Turns(model, episodes, runner, suffix, max_rounds, sampling.max_completion_length)
    live, waiting = np.arange(len(episodes)), []
    while live.size or waiting:
        if live.size:
            live, logits, cache, started = decoder.step(logits, cache, live, pick, turns)
            waiting += started
        if waiting and (schedule == "rejoin" or not live.size):
            rows, more, caches = turns.join(waiting)
            waiting = []
            if rows.size and live.size:  # the rows that go on join the batch at its end
                for c, extra in zip(cache, caches):
                    c.extend(extra)
                live, logits = np.concatenate([live, rows]), mx.concatenate([logits, more])
            elif rows.size:
                live, logits, cache = rows, more, caches
    return _as_rollout(tokens, padding, g, episodes, pad_id)


class _Decoder:
    """Samples the live rows token by token; the random stream goes on across turns."""

    def __init__(self, model, tokenizer, episodes, sampling, eos_ids, noise):
        self.tokenizer, self.episodes = tokenizer, episodes
        self.budget, self.eos = sampling.max_completion_length, set(eos_ids)
        self.key, self.noise = mx.random.key(noise.seed), noise
        self.rows = noise.total_rows or len(episodes)
        self.decode = decode_step(model, None)

    def step(self, logits, cache, live, pick, turns: _Turns):
        """One token for each live row. The rows that end their turn leave the batch (those
        that called tools start them): (live rows, their next logits, the cache, the rows
        now waiting for their tools)."""
        self.key, sub = mx.random.split(self.key)
        u = mx.random.uniform(shape=(self.rows, 1), key=sub)
        token, logp = pick(logits, u[mx.array(live + self.noise.first_row)], live)
        mx.eval(token, logp)
        tokens, logps = np.array(token).tolist(), np.array(logp).tolist()
        done, started = [], []
        for i, row in enumerate(live):
            ep = self.episodes[row]
            ep.ids.append(tokens[i])
            ep.trained.append(1)
            ep.logp.append(logps[i])
            ended, full = tokens[i] in self.eos, len(ep.ids) >= self.budget
            if ended or full:
                done.append(i)
                calls = self._end_turn(ep, ended)
                if calls and not full and ep.rounds < turns.max_rounds:
                    own = [c.extract(i) for c in cache]
                    started.append(turns.start(row, own, tokens[i], calls))
        if done:
            keep = np.setdiff1d(np.arange(live.size), done)
            if keep.size:
                for c in cache:
                    c.filter(mx.array(keep))
            live, token = live[keep], token[mx.array(keep)] if keep.size else token
        if live.size:
            logits = self.decode(token[:, None], cache)
            mx.async_eval(logits)  # while the tools just started run
        return live, logits, cache, started

    def _end_turn(self, ep: Episode, ended: bool) -> list[ToolCall]:
        """Record the turn as an assistant message; its tool calls (none: the episode ends)."""
        text = self.tokenizer.decode(ep.ids[ep.turn :], skip_special_tokens=True)
        ep.truncated = not ended
        calls = parse_tool_calls(text) if ended else []
        message: dict[str, Any] = {"role": "assistant", "content": text.split("<tool_call>")[0]}
        if calls:
            message["content"] = message["content"].strip()
            message["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ]
        ep.messages.append(message)
        return calls


@dataclass
class _Turns:
    """The tools' side of the episodes: starts a row's calls, appends their results."""

    model: nn.Module
    episodes: list[Episode]
    runner: ToolRunner
    suffix: Callable[[list[dict[str, Any]]], list[int]]
    max_rounds: int
    budget: int

    def start(self, row: int, cache: list, last: int, calls: list[ToolCall]) -> tuple:
        """A row waiting for its tools: (row, its cache, its last token, its results)."""
        return row, cache, last, self.runner.start([(calls, self.episodes[row].tools)])

    def join(self, waiting: list[tuple]):
        """Wait for the rows' tools, prefill each result into its row's cache, and merge the
        rows that go on into one batch: (rows, their next-token logits, the batch's cache)."""
        rows, caches, logits = [], [], []
        for row, cache, last, results in waiting:
            ep, done = self.episodes[row], results()[0]
            messages = [{"role": "tool", "name": r.name, "content": r.content} for r in done]
            ep.calls += len(done)
            ep.failures += sum(r.failed for r in done)
            ep.rounds += 1
            ids = self.suffix(messages)
            if len(ep.ids) + len(ids) > self.budget:
                continue  # the results do not fit: rolled back, the episode ends here
            ep.messages += messages
            ep.ids += ids
            ep.trained += [0] * len(ids)
            ep.logp += [0.0] * len(ids)
            ep.turn = len(ep.ids)
            out = self.model(mx.array([[last, *ids]]), cache=cache)
            rows.append(row)
            caches.append(cache)
            logits.append(out[:, -1, :])
        if not rows:
            return np.array([], dtype=int), None, None
        layers = range(len(caches[0]))
        merged = [RolloutCache.merge([c[layer] for c in caches]) for layer in layers]
        return np.array(rows), mx.concatenate(logits), merged


def _as_rollout(tokens, padding, g, episodes, pad_id) -> RolloutBatch:
    """The episodes as a RolloutBatch: completions right-padded, `loss_mask` 0 on tool
    results."""
    length = max(1, max(len(ep.ids) for ep in episodes))
    n = len(episodes)
    ids = np.full((n, length), pad_id, dtype=np.int32)
    mask, trained, logp = (np.zeros((n, length), dtype=np.float32) for _ in range(3))
    for i, ep in enumerate(episodes):
        k = len(ep.ids)
        ids[i, :k], mask[i, :k], trained[i, :k], logp[i, :k] = ep.ids, 1, ep.trained, ep.logp
    truncated = [ep.truncated for ep in episodes]
    return RolloutBatch.of(tokens, padding, g, ids, mask, logp, truncated, loss_mask=trained)


class FirstTurn:
    """A `pick` that makes every episode's first turn `text` (then EOS), with the model's
    own log-probs of those tokens, and samples the turns after it as usual. It shows the
    mechanics on a model that does not call tools by itself (tests, the agent benchmark).
    `text` may also be a list: episode i's first turn is text[i]."""

    def __init__(
        self, tokenizer: Any, text: str | list[str], sampling: SamplingSettings, episodes: int
    ):
        texts = [text] * episodes if isinstance(text, str) else text
        eos = tokenizer.eos_token_id
        self.scripts = [list(tokenizer.encode(t)) + [eos] for t in texts]
        self.draw, self.done = make_draw(sampling), [0] * episodes

    def __call__(self, logits: mx.array, u: mx.array, rows: np.ndarray):
        token, logp = self.draw(logits, u)
        forced = [i for i, r in enumerate(rows) if self.done[r] < len(self.scripts[r])]
        if forced:
            tokens = np.array(token)
            for i in forced:
                tokens[i] = self.scripts[rows[i]][self.done[rows[i]]]
            token = mx.array(tokens)
            full = logits.astype(mx.float32)
            full = full - mx.logsumexp(full, axis=-1, keepdims=True)
            logp = mx.take_along_axis(full, token[:, None], axis=-1)[:, 0]
        for r in rows:
            self.done[r] += 1
        return token, logp


def tool_suffix(tokenizer: Any, template_kwargs: dict[str, Any] | None = None):
    """`suffix(tool messages)`: the tokens a chat template puts after an assistant turn's EOS
    for these tool results, up to and with the next assistant header (TRL's way: a dummy
    conversation rendered with and without them)."""
    kwargs = template_kwargs or {}
    eos = tokenizer.eos_token_id

    def suffix(messages: list[dict[str, Any]]) -> list[int]:
        call = {"type": "function", "function": {"name": messages[0]["name"], "arguments": {}}}
        head = [
            {"role": "user", "content": "dummy"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
        ]
        prefix = _ids(tokenizer.apply_chat_template(head, tokenize=True, **kwargs))
        full = _ids(
            tokenizer.apply_chat_template(
                head + messages, tokenize=True, add_generation_prompt=True, **kwargs
            )
        )
        ends = [i for i, t in enumerate(prefix) if t == eos]
        if ends:
            prefix = prefix[: ends[-1] + 1]
        if full[: len(prefix)] != prefix:
            raise ValueError(
                "the chat template renders an assistant turn differently once tool results "
                "follow it, so tool results cannot be appended to an episode; use a template "
                "that keeps earlier turns as they are."
            )
        return full[len(prefix) :]

    return suffix


def _ids(rendered: Any) -> list[int]:
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    return list(rendered)
