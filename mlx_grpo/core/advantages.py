"""Rewards to group-relative advantages, as TRL's GRPOTrainer computes them: pure NumPy.

1. Rewards r_i = sum_k w_k r_ik (None -> NaN, skipped); a row where every
   function returned None is unscorable: left out of the statistics and
   given advantage 0.
2. Advantages A_i = (r_i - mean_group) / (std + 1e-4), std Bessel-corrected
   over the group ("group"), over the whole batch ("batch"), or no division
   ("none"). A group of one (or all ties) gives A = 0. With several reward
   functions, "normalize_then_sum" (GDPO) normalises each within its group
   before the weighted sum, which is then normalised over the batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

STD_EPS = 1e-4


@dataclass(frozen=True)
class Advantages:
    advantages: np.ndarray  # (N,) float32, 0 for unscorable rows
    rewards: np.ndarray  # (N,) weighted sum, NaN for unscorable rows
    std: np.ndarray  # (N,) the std each row was scaled by (NaN when undefined)


def nanstd(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Bessel-corrected std ignoring NaNs; NaN where fewer than two values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices are expected
        count = np.sum(~np.isnan(x), axis=axis)
        mean = np.nanmean(x, axis=axis, keepdims=True)
        var = np.nansum((x - mean) ** 2, axis=axis) / np.maximum(count - 1, 1)
    return np.where(count > 1, np.sqrt(var), np.nan)


def weighted_rewards(
    rewards_per_func: np.ndarray,  # (N, K), NaN where a function returned None
    weights: np.ndarray,  # (K,)
) -> np.ndarray:
    """Each completion's weighted sum of rewards (N,), float64, skipping None (NaN).

    A completion that no function scored stays NaN: it has no reward, not a
    reward of 0 (training gives it advantage 0, evaluation leaves it out of
    the mean).
    """
    per_func = np.asarray(rewards_per_func, dtype=np.float64)
    rewards = np.nansum(per_func * np.asarray(weights, dtype=np.float64)[None], axis=1)
    rewards[np.isnan(per_func).all(axis=1)] = np.nan
    return rewards


def group_advantages(
    rewards_per_func: np.ndarray,  # (N, K), NaN where a function returned None
    weights: np.ndarray,  # (K,)
    num_generations: int,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
) -> Advantages:
    """Group-relative advantages; rows are grouped in consecutive blocks of G.

    "sum_then_normalize" normalises the weighted sum of the rewards as
    `scale_rewards` says; "normalize_then_sum" (GDPO) normalises each
    function's rewards within its group first, sums them with the weights,
    and normalises that sum over the batch (`scale_rewards` does not apply).
    """
    if aggregation == "normalize_then_sum":
        return _normalized_then_summed(rewards_per_func, weights, num_generations)
    if aggregation != "sum_then_normalize":
        raise ValueError(
            f"multi_objective_aggregation must be one of {', '.join(MULTI_OBJECTIVE)}, "
            f"got {aggregation!r}"
        )
    rewards = weighted_rewards(rewards_per_func, weights)
    n, g = len(rewards), num_generations
    grouped = rewards.reshape(n // g, g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a group with no scorable row
        mean = np.repeat(np.nanmean(grouped, axis=1), g)
    if scale_rewards in ("group", "none"):
        std = np.repeat(nanstd(grouped, axis=1), g) if g > 1 else np.zeros(n)
    elif scale_rewards == "batch":
        std = np.full(n, nanstd(rewards)) if n > 1 else np.zeros(n)
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    advantages = np.nan_to_num(advantages, nan=0.0).astype(np.float32)
    return Advantages(advantages, rewards.astype(np.float32), std.astype(np.float32))


def _normalized_then_summed(
    rewards_per_func: np.ndarray, weights: np.ndarray, num_generations: int
) -> Advantages:
    per_func = np.asarray(rewards_per_func, dtype=np.float64)
    n, k = per_func.shape
    grouped = per_func.reshape(n // num_generations, num_generations, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a function that scored no row
        mean = np.nanmean(grouped, axis=1, keepdims=True)
        std = nanstd(grouped, axis=1)[:, None] if num_generations > 1 else np.zeros_like(mean)
        normalized = ((grouped - mean) / (std + STD_EPS)).reshape(n, k)
        # NaN (skipped) where a function gave None or has no std; the row is unscorable
        # only where every function gave None
        summed = np.nansum(normalized * np.asarray(weights, dtype=np.float64)[None], axis=1)
        summed[np.isnan(per_func).all(axis=1)] = np.nan
        batch_std = np.full(n, nanstd(summed)) if n > 1 else np.zeros(n)
        advantages = (summed - np.nanmean(summed)) / (batch_std + STD_EPS)
    advantages = np.nan_to_num(advantages, nan=0.0).astype(np.float32)
    rewards = weighted_rewards(per_func, weights).astype(np.float32)
    return Advantages(advantages, rewards, batch_std.astype(np.float32))


MULTI_OBJECTIVE = ("sum_then_normalize", "normalize_then_sum")  # multi_objective_aggregation


SCALE_REWARDS = ("group", "batch", "none")  # the std advantages are divided by
