"""The GRPO objective as TRL's GRPOTrainer computes it: pure math, arrays in and out.

Notation: N sequences in a micro-batch, T completion positions, mask m (N, T)
marks completion tokens up to and including the first EOS.

1. Rewards r_i = sum_k w_k r_ik (None -> NaN, skipped); a row where every
   function returned None is unscorable: left out of the statistics and
   given advantage 0.
2. Advantages A_i = (r_i - mean_group) / (std + 1e-4), std Bessel-corrected
   over the group ("group"), over the whole batch ("batch"), or no division
   ("none"). A group of one (or all ties) gives A = 0.
3. Ratio rho = exp(logp - logp_old) per token, or per sequence for GSPO:
   exp(mean_t (logp - logp_old)). With one pass per rollout logp_old is
   stop_gradient(logp), so rho = 1 and only its gradient acts.
4. l_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL_t, with
   KL_t Schulman's k3 estimator exp(ref - logp) - (ref - logp) - 1, or the
   exact sum_v pi(v) log(pi(v) / pi_ref(v)). The k3 sample is multiplied by
   rho when `use_bias_correction_kl` (TRL's default); the exact KL is already
   an expectation under pi and is not.
5. Aggregation by loss type (AGGREGATIONS), then summed over the G
   accumulation micro-batches of one update.

Log-probs are taken from logits / temperature, the sampling temperature.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
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
) -> Advantages:
    """Group-relative advantages; rows are grouped in consecutive blocks of G."""
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


def token_logprobs(
    logits: mx.array, targets: mx.array, temperature: float = 1.0
) -> tuple[mx.array, mx.array]:
    """Log-prob of each target and the entropy, at `temperature`.

    logits (..., V), targets (...) -> (logp (...), entropy (...)); the
    entropy is a metric and carries no gradient.
    """
    logp, entropy, _ = logprob_stats(logits, targets, temperature)
    return logp, entropy


def logprob_stats(
    logits: mx.array, targets: mx.array, temperature: float = 1.0
) -> tuple[mx.array, mx.array, mx.array]:
    """`token_logprobs` plus the log-normaliser lse (...), from one exp pass over V."""
    x = logits.astype(mx.float32)
    if temperature != 1.0:
        x = x / temperature
    peak = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    e = mx.exp(x - peak)
    total = e.sum(axis=-1)
    lse = peak[..., 0] + mx.log(total)
    logp = mx.take_along_axis(x, targets[..., None], axis=-1)[..., 0] - lse
    entropy = mx.stop_gradient(lse - (e * x).sum(axis=-1) / total)
    return logp, entropy, lse


def exact_kl(logits: mx.array, ref_logits: mx.array, temperature: float = 1.0) -> mx.array:
    """Full-vocabulary KL(pi || pi_ref) per position: (..., V) x2 -> (...)."""
    logp = _log_softmax(logits.astype(mx.float32) / temperature)
    ref = _log_softmax(ref_logits.astype(mx.float32) / temperature)
    return mx.sum(mx.exp(logp) * (logp - ref), axis=-1)


def _log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def k3_kl(logp: mx.array, ref_logp: mx.array) -> mx.array:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token (N, T)."""
    delta = ref_logp - logp
    return mx.exp(delta) - delta - 1


@dataclass(frozen=True)
class LossSettings:
    """The run's loss settings (TrainConfig.loss_settings builds them; its fields hold the
    defaults)."""

    loss_type: str
    epsilon_low: float
    epsilon_high: float
    beta: float
    importance_sampling_level: str
    use_bias_correction_kl: bool
    max_completion_length: int
    kl_estimator: str  # the ratio correction applies to k3 samples only


@dataclass(frozen=True)
class Normalizer:
    """What one micro-batch's loss is divided by, beyond its own contents.

    Numbers or scalar arrays (a compiled loss takes them as arrays, so that
    new values need no new trace).
    """

    accumulation_steps: int | mx.array = 1  # micro-batches per optimizer update
    tokens_in_batch: float | mx.array = 1.0  # completion tokens in the whole update (dapo)
    # The micro-batch a chunk of rows belongs to (None: the rows given are all of it).
    rows: int | mx.array | None = None
    tokens: float | mx.array | None = None  # its completion tokens


def _rows(loss: mx.array, n: Normalizer) -> int | mx.array:
    return loss.shape[0] if n.rows is None else n.rows


def _tokens(mask: mx.array, n: Normalizer) -> mx.array:
    return mx.maximum(mask.sum() if n.tokens is None else n.tokens, 1.0)


def _grpo(loss: mx.array, mask: mx.array, s: LossSettings, n: Normalizer) -> mx.array:
    per_seq = (loss * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)
    return per_seq.sum() / _rows(loss, n) / n.accumulation_steps


def _bnpo(loss: mx.array, mask: mx.array, s: LossSettings, n: Normalizer) -> mx.array:
    return (loss * mask).sum() / _tokens(mask, n) / n.accumulation_steps


def _dr_grpo(loss: mx.array, mask: mx.array, s: LossSettings, n: Normalizer) -> mx.array:
    return (loss * mask).sum() / (_rows(loss, n) * s.max_completion_length) / n.accumulation_steps


def _dapo(loss: mx.array, mask: mx.array, s: LossSettings, n: Normalizer) -> mx.array:
    return (loss * mask).sum() / mx.maximum(n.tokens_in_batch, 1.0)


AGGREGATIONS: dict[str, Callable[[mx.array, mx.array, LossSettings, Normalizer], mx.array]] = {
    "grpo": _grpo,
    "bnpo": _bnpo,
    "dr_grpo": _dr_grpo,
    "dapo": _dapo,
}
LOSS_TYPES = tuple(AGGREGATIONS)
SCALE_REWARDS = ("group", "batch", "none")  # the std advantages are divided by
KL_ESTIMATORS = ("k3", "exact")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")  # GRPO's token ratios, GSPO's sequence ones


def log_importance_weights(
    logp: mx.array, old_logp: mx.array, mask: mx.array, level: str
) -> mx.array:
    """log rho: (N, T) per token, or (N, 1) per sequence (GSPO)."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level == "sequence":
        per_seq = (log_ratio * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)
        return per_seq[:, None]
    raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")


def grpo_loss(
    logp: mx.array,  # (N, T) policy log-probs, with gradient
    old_logp: mx.array | None,  # (N, T) pi_old, or None for stop_gradient(logp)
    advantages: mx.array,  # (N,)
    mask: mx.array,  # (N, T) float
    settings: LossSettings,
    normalizer: Normalizer,
    kl: mx.array | None = None,  # (N, T) per-token KL to pi_ref, needed when beta != 0
) -> tuple[mx.array, dict[str, mx.array]]:
    """Loss of one micro-batch and metric sums.

    Clip ratios are sums over `count` (tokens, or sequences for GSPO); kl is a
    sum over `tokens`.
    """
    s = settings
    old_logp = mx.stop_gradient(logp) if old_logp is None else old_logp
    coef_1 = mx.exp(log_importance_weights(logp, old_logp, mask, s.importance_sampling_level))
    coef_2 = mx.clip(coef_1, 1 - s.epsilon_low, 1 + s.epsilon_high)
    adv = advantages[:, None]
    per_token = -mx.minimum(coef_1 * adv, coef_2 * adv)
    if s.beta != 0.0:
        if kl is None:
            raise ValueError("beta != 0 needs the per-token KL to the reference policy")
        if s.use_bias_correction_kl and s.kl_estimator == "k3":
            kl = kl * coef_1
        per_token = per_token + s.beta * kl
    loss = AGGREGATIONS[s.loss_type](per_token, mask, s, normalizer)

    # Metrics, as TRL counts them: per token, or per sequence for GSPO ratios.
    weight = mask if s.importance_sampling_level == "token" else mx.ones_like(coef_1)
    low = ((coef_1 < 1 - s.epsilon_low) & (adv < 0)).astype(mx.float32)
    high = ((coef_1 > 1 + s.epsilon_high) & (adv > 0)).astype(mx.float32)
    tokens = mask.sum()
    stats = {
        "clip_ratio/low_mean": (low * weight).sum(),
        "clip_ratio/high_mean": (high * weight).sum(),
        "clip_ratio/region_mean": (mx.maximum(low, high) * weight).sum(),
        # one array when they are the same sum: mx.compile fails on two equal outputs
        "count": tokens if weight is mask else weight.sum(),
        "tokens": tokens,
    }
    if kl is not None:
        stats["kl"] = mx.stop_gradient((kl * mask).sum())
    return loss, {k: mx.stop_gradient(v) for k, v in stats.items()}
