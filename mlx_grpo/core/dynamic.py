"""Dynamic sampling (DAPO): more rollouts until a step has B groups whose rewards differ.

A group whose G rewards are all equal has zero advantage: it moves nothing
but still costs its share of the update. With `dynamic_sampling`, a step
that drew such groups rolls out another B prompts, up to
`max_resample_rounds` more rounds, then trains on the first B informative
groups in the order they were sampled (filled up, when the rounds run out,
with the first uninformative ones, so the step keeps its shape and memory
plan). Each round draws its prompts and sampling noise from the run's
state, so a resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mlx_grpo.core.advantages import nanstd, weighted_rewards
from mlx_grpo.core.agent import AgentRollout
from mlx_grpo.core.data import PromptRow
from mlx_grpo.core.reward_calls import RewardLogs
from mlx_grpo.core.rollout import RolloutBatch, join_rollouts
from mlx_grpo.core.step_rewards import StepRewards


@dataclass
class Round:
    """One rollout of B prompts (of every process) and its rewards."""

    prompts: list[PromptRow]
    batch: RolloutBatch
    scored: StepRewards
    agent: AgentRollout | None = None  # an agent's episodes (not with dynamic sampling)


def informative(scored: StepRewards, g: int) -> np.ndarray:
    """Per group of `g` completions: whether their weighted rewards differ (TRL's test for
    `frac_reward_zero_std`: a std that is not close to 0; a group with fewer than two
    scored completions has none)."""
    rewards = weighted_rewards(scored.per_func, scored.weights).reshape(-1, g)
    std = np.nan_to_num(nanstd(rewards, axis=1), nan=0.0)
    return ~np.isclose(std, 0.0)


def sample(
    draw: Callable[[], Round], prompts: int, g: int, max_resample_rounds: int, pad_id: int
) -> tuple[Round, dict[str, float]]:
    """Rounds from `draw` until `prompts` informative groups (or 1 + max_resample_rounds
    rounds); the step's groups joined into one round, and the dynamic_sampling metrics."""
    rounds: list[Round] = []
    good: list[tuple[int, int]] = []  # (round, group)
    other: list[tuple[int, int]] = []
    while len(good) < prompts and len(rounds) <= max_resample_rounds:
        rounds.append(draw())
        for group, ok in enumerate(informative(rounds[-1].scored, g)):
            (good if ok else other).append((len(rounds) - 1, group))
    chosen = sorted(good[:prompts] + other[: max(0, prompts - len(good))])
    drawn = np.concatenate([r.scored.per_func for r in rounds])
    before = weighted_rewards(drawn, rounds[0].scored.weights)
    metrics = {
        "dynamic_sampling/rounds": float(len(rounds)),
        "dynamic_sampling/frac_reward_zero_std_before": len(other) / (len(good) + len(other)),
        "dynamic_sampling/reward_before": float(np.nanmean(before))
        if np.any(~np.isnan(before))
        else None,
    }
    return _joined(rounds, chosen, g, pad_id), metrics


def _joined(rounds: list[Round], chosen: list[tuple[int, int]], g: int, pad_id: int) -> Round:
    """The `chosen` (round, group) pairs of `rounds` as one round, in that order."""
    picks: dict[int, list[int]] = {}
    for r, group in chosen:
        picks.setdefault(r, []).extend(range(group * g, (group + 1) * g))
    parts = [(r, np.array(rows)) for r, rows in picks.items()]
    batch = join_rollouts([(rounds[r].batch, rows) for r, rows in parts], pad_id)
    scores = [(rounds[r].scored, rows) for r, rows in parts]
    scored = StepRewards(
        per_func=np.concatenate([s.per_func[rows] for s, rows in scores]),
        weights=rounds[0].scored.weights,
        lengths=np.concatenate([s.lengths[rows] for s, rows in scores]),
        truncated=np.concatenate([s.truncated[rows] for s, rows in scores]),
        texts=[s.texts[i] for s, rows in scores for i in rows],
        logged=_joined_logs([(s.logged, rows) for s, rows in scores], [r.scored for r in rounds]),
    )
    prompts = [rounds[r].prompts[group] for r, group in chosen]
    return Round(prompts, batch, scored)


def _joined_logs(
    parts: list[tuple[RewardLogs, np.ndarray]], every: list[StepRewards]
) -> RewardLogs:
    """The chosen completions' `log_extra` columns (None where a round did not log one), and
    every round's `log_metric` values (each call counts)."""
    out = RewardLogs()
    for column in dict.fromkeys(c for logs, _ in parts for c in logs.extra):
        out.extra[column] = [
            logs.extra[column][i] if column in logs.extra else None
            for logs, rows in parts
            for i in rows
        ]
    for scored in every:
        for name, values in scored.logged.metrics.items():
            out.metrics.setdefault(name, []).extend(values)
        out.owners |= scored.logged.owners
    return out
