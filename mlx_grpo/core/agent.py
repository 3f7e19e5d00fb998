"""Agent runs: tools and environments in the training step (episodes.py decodes them).

The tools of --tools and the Python API's `tools`, and the factory of
--environment or `environment_factory` (one, or a dict that an
`environment` column selects per row), are TRL's arguments and mean what
they mean there. Each step makes a fresh environment instance per episode
and resets it with its row (a text it returns is appended to the last user
message); each episode's prompt shows the model its tools' schema; the
episodes run together; the reward functions get the whole conversation as
the completion and the episodes' `environments`. An environment class with
`get_reward` adds a reward of weight 1 named after the class.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.nn as nn
import numpy as np

from mlx_grpo.core.agent_tools import (
    ToolRunner,
    ToolSpecError,
    environment_tools,
    load_callable,
    schemas,
)
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.data import PromptRow, encode_prompt, per_completion
from mlx_grpo.core.episodes import Episode, run_episodes, tool_suffix
from mlx_grpo.core.python_tool import python
from mlx_grpo.core.rewards import (
    NOT_CAUGHT,
    Reward,
    RewardError,
    describe_failure,
    source_file,
)
from mlx_grpo.core.rollout import Noise, RolloutBatch, decode_chunks, join_rollouts

Factory = Callable[[], Any]
BUILTIN_TOOLS = {"python": python}  # --tools python


@dataclass
class AgentRollout:
    """A step's episodes: the rollout the update trains on, and what rewards and logs read."""

    batch: RolloutBatch
    episodes: list[Episode]
    environments: list[Any] | None  # one per episode, with an environment factory
    prompts: list[Any]  # each episode's prompt as its reward functions get it (reset's text in)


@dataclass
class AgentCode:
    """The Python API's agent objects, which settings cannot hold (TRL's arguments)."""

    tools: list[Callable] = field(default_factory=list)
    environment_factory: Factory | dict[str, Factory] | None = None

    def given(self) -> bool:
        return bool(self.tools) or self.environment_factory is not None


def refuse_unsupported(cfg: TrainConfig, processes: int, code: AgentCode | None) -> None:
    """Refuse an agent run (tools or an environment, given either way) with what it cannot
    work with yet."""
    if not (code is not None and code.given() or cfg.tools or cfg.environment):
        return
    if processes > 1:
        raise ValueError(
            "tools and environments are not available in distributed runs yet; train the agent "
            "on one machine."
        )
    if cfg.dynamic_sampling:
        raise ValueError(
            "dynamic_sampling is not available with tools or environments yet; train the agent "
            "without --dynamic-sampling."
        )
    if cfg.eval_data is not None:
        raise ValueError(
            "eval_data is not available with tools or environments yet (the held-out prompts "
            "would be decoded without them); train the agent without --eval-data."
        )


class Agent:
    """A run's tools and environment factories, checked once, used every step."""

    def __init__(
        self,
        tools: list[Callable],
        factories: dict[str | None, Factory] | None,
        cfg: TrainConfig,
        tokenizer: Any,
    ):
        self.tools, self.factories, self.cfg, self.tokenizer = tools, factories, cfg, tokenizer
        self.runner = ToolRunner(cfg.tool_timeout)
        thinking = cfg.enable_thinking
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        self.suffix = tool_suffix(tokenizer, kwargs)
        limit = cfg.max_tool_calling_iterations
        self.max_rounds = sys.maxsize if limit is None else limit
        self._schemas: dict[Any, dict] = {}
        self.failed: set[int] = set()  # ids of this step's environments whose reset raised
        self.reward_classes = self._check()

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        tools: list[Callable] | None,
        environment_factory: Factory | dict[str, Factory] | None,
        tokenizer: Any,
    ) -> Agent | None:
        """The run's agent, or None when it has no tools and no environment."""
        found = [BUILTIN_TOOLS.get(spec) or load_callable(spec, "tool") for spec in cfg.tools]
        found += list(tools or [])
        factory = environment_factory
        if factory is None and cfg.environment is not None:
            factory = load_callable(cfg.environment, "environment")
        if not found and factory is None:
            return None
        factories = None
        if factory is not None:
            factories = dict(factory) if isinstance(factory, dict) else {None: factory}
        return cls(found, factories, cfg, tokenizer)

    def _check(self) -> list[type]:
        """Refuse what cannot work before the run starts; the environment classes that
        score their episodes (`get_reward`)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ToolSpecError(
                "tools need a chat template to show the model their schema, and the model's "
                "tokenizer has none; use a chat model (e.g. Qwen3)."
            )
        shown = self.schemas(self.tools)
        scored = []
        self.tool_sets = [self.tools]  # what an episode may be shown: one set per factory
        for name, factory in (self.factories or {}).items():
            env = factory()
            if not callable(getattr(env, "reset", None)):
                label = "the environment" if name is None else f"environment {name!r}"
                raise ToolSpecError(f"{label} ({type(env).__name__}) has no reset method.")
            self.tool_sets.append(self.tools + environment_tools(env))
            shown += self.schemas(environment_tools(env))
            if callable(getattr(env, "get_reward", None)) and type(env) not in scored:
                scored.append(type(env))
        if shown:
            self._check_template(shown[0])
        try:
            self.suffix([{"role": "tool", "name": "check", "content": "ok"}])
        except ValueError as exc:
            raise ToolSpecError(str(exc)) from None
        return scored

    def _check_template(self, schema: dict) -> None:
        """Refuse a chat template that would not show the model its tools."""
        chat = [{"role": "user", "content": "?"}]
        render = self.tokenizer.apply_chat_template
        if render(chat, tokenize=False) == render(chat, tools=[schema], tokenize=False):
            raise ToolSpecError(
                "the model's chat template does not show tools to the model, so it could not "
                "learn to call them; use a model whose template renders tools (e.g. Qwen3)."
            )

    def schema_tokens(self) -> int:
        """The most tokens that showing an episode its tools adds to a prompt (the memory
        plan counts them; the text reset returns is not known before the run)."""
        cfg = self.cfg
        chat = [{"role": "user", "content": "?"}]

        def length(tools: list[Callable]) -> int:
            shown = self.schemas(tools) if tools else None
            return len(
                encode_prompt(chat, self.tokenizer, cfg.system_prompt, cfg.enable_thinking, shown)
            )

        return max(length(tools) for tools in self.tool_sets) - length([])

    def rewards(self) -> list[Reward]:
        """The environments' own rewards: weight 1, named after the class, as TRL adds them."""
        return [
            Reward(k.__name__, _environment_reward(k, self.failed), 1.0)
            for k in self.reward_classes
        ]

    def schemas(self, tools: list[Callable]) -> list[dict]:
        """The tools' schemas (each worked out once)."""
        out = []
        for tool in tools:
            key = getattr(tool, "__func__", tool)  # an environment's method: one per class
            if key not in self._schemas:
                self._schemas[key] = schemas([tool])[0]
            out.append(self._schemas[key])
        return out

    def rollout(
        self,
        model: nn.Module,
        rows: list[PromptRow],
        sampling: Any,
        eos_ids: list[int],
        pad_id: int,
        noise: Noise,
        max_rows: int | None = None,
    ) -> AgentRollout:
        """G episodes of each row, each with its own environment instance (reset with its
        row) and its tools, decoded together (`max_rows`, the memory plan's, at a time)."""
        g = self.cfg.num_generations
        episodes, environments, prompts, shown = [], [], [], []
        self.failed.clear()
        for row in per_completion(rows, g):
            tools, env, observation, failure = list(self.tools), None, None, None
            if self.factories is not None:
                env = self._factory(row)()
                observation, failure = self._reset(env, row)
                if failure is not None:
                    self.failed.add(id(env))
                tools += environment_tools(env)
            shown.append(_with_observation(row.prompt, observation))
            prompts.append(self._encode(shown[-1], tools))
            episodes.append(Episode({t.__name__: t for t in tools}, failure=failure))
            environments.append(env)
        shared = all(p == prompts[i - i % g] for i, p in enumerate(prompts))
        firsts = prompts[::g] if shared else prompts  # a group shares its prompt's prefill
        total, parts = noise.total_rows or len(episodes), []
        chunks = decode_chunks(len(firsts), g if shared else 1, max_rows or len(episodes))
        for first, count, row, copies in chunks:
            # a row's random numbers are its own (Noise), whatever chunk it decodes in
            own = replace(noise, first_row=noise.first_row + row, total_rows=total)
            part = run_episodes(
                model, self.tokenizer, firsts[first : first + count],
                episodes[row : row + count * copies], sampling, eos_ids, pad_id,
                self.runner, self.suffix, self.max_rounds, own,
            )  # fmt: skip
            parts.append((part, np.arange(count * copies)))
        batch = parts[0][0] if len(parts) == 1 else join_rollouts(parts, pad_id)
        kept = environments if self.factories else None
        return AgentRollout(batch, episodes, kept, shown)

    def _reset(self, env: Any, row: PromptRow) -> tuple[Any, BaseException | None]:
        """reset's text, or (on_reward_error zero or skip) what it raised: that episode is
        then scored 0 or left unscored."""
        columns = dict(row.columns)
        if self.factories and None not in self.factories:  # a dict of factories
            columns.pop("environment", None)  # it picked the factory; not the environment's
        try:
            return env.reset(**{self.cfg.prompt_column: row.prompt, **columns}), None
        except NOT_CAUGHT:
            raise
        except Exception as exc:
            if self.cfg.on_reward_error != "raise":
                return None, exc
            where = source_file(type(env).reset)
            raise RewardError(
                f"{row.source}: {type(env).__name__}.reset raised "
                f"{describe_failure(exc, where)}. Fix the environment, or pass "
                "--on-reward-error zero (score such episodes 0) or skip (leave them unscored)."
            ) from exc

    def check_rows(self, rows: list[PromptRow]) -> None:
        """Refuse rows whose `environment` names no factory (a dict of factories)."""
        if self.factories is None or None in self.factories:
            return
        for row in rows:
            self._factory(row)

    def _factory(self, row: PromptRow) -> Factory:
        assert self.factories is not None
        if None in self.factories:
            return self.factories[None]
        name = row.columns.get("environment")
        if name not in self.factories:
            raise ToolSpecError(
                f"{row.source}: environment {name!r} is not one of the environments given "
                f"({', '.join(map(str, self.factories))}); set its `environment` column to one."
            )
        return self.factories[name]

    def _encode(self, prompt: Any, tools: list[Callable]) -> list[int]:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        cfg = self.cfg
        return encode_prompt(
            messages, self.tokenizer, cfg.system_prompt, cfg.enable_thinking, self.schemas(tools)
        )


def _with_observation(prompt: Any, observation: Any) -> Any:
    """The prompt with reset's text after the last message's (a text prompt: after it)."""
    if observation is None:
        return prompt
    if not isinstance(prompt, list):
        return prompt + str(observation)
    return [*prompt[:-1], {**prompt[-1], "content": prompt[-1]["content"] + str(observation)}]


def _environment_reward(kind: type, failed: set[int]) -> Callable:
    """An environment class's `get_reward` as a reward function (None for other classes'
    episodes, and for those whose reset raised: already scored)."""

    def get_reward(environments: list[Any], **kwargs: Any) -> list[float | None]:
        return [
            e.get_reward() if type(e) is kind and id(e) not in failed else None
            for e in environments
        ]

    get_reward.__name__ = kind.__name__
    return get_reward


def tool_metrics(episodes: list[Episode]) -> dict[str, float]:
    """TRL's tool metrics: calls per episode, and the share of calls that failed."""
    calls = sum(ep.calls for ep in episodes)
    failures = sum(ep.failures for ep in episodes)
    return {
        "tools/call_frequency": calls / max(len(episodes), 1),
        "tools/failure_frequency": failures / calls if calls else 0.0,
    }
