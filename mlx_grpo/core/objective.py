"""The GRPO loss as TRL's GRPOTrainer computes it: pure math, arrays in and out.

Notation: N sequences in a micro-batch, T completion positions, mask m (N, T)
marks completion tokens up to and including the first EOS; advantages A
(N,) come from advantages.py.

1. Ratio rho = exp(logp - logp_old) per token, or per sequence for GSPO:
   exp(mean_t (logp - logp_old)). With one pass per rollout logp_old is
   stop_gradient(logp), so rho = 1 and only its gradient acts.
2. A policy term per token by loss type (LOSSES): PPO's clipped surrogate
   -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho capped at
   `delta` when set (grpo, bnpo, dr_grpo, dapo, luspo); CISPO's
   -sg(min(rho, eps_high)) A logp; SAPO's soft gate -4 sigmoid(tau (rho - 1)) /
   tau A; VESPO's -phi(w) A logp with a Gamma weight of the sequence ratio.
3. Masks on the policy term: the off-policy mask (rows with A < 0 that
   drifted from pi_old) and the entropy mask (only the top-rho entropy
   tokens), when set.
4. + beta KL_t, with KL_t Schulman's k3 estimator
   exp(ref - logp) - (ref - logp) - 1, or the exact
   sum_v pi(v) log(pi(v) / pi_ref(v)). The k3 sample is multiplied by rho
   when `use_bias_correction_kl` (TRL's default); the exact KL is already an
   expectation under pi and is not.
5. Aggregation by loss type (LOSSES), summed over the accumulation
   micro-batches of one update; minus coef x the mean token entropy when
   there is an entropy bonus.

Log-probs are taken from logits / temperature, the sampling temperature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx


def logprob_stats(
    logits: mx.array, targets: mx.array, temperature: float = 1.0, entropy_grad: bool = False
) -> tuple[mx.array, mx.array, mx.array]:
    """Log-prob of each target, the entropy and the log-normaliser lse at `temperature`,
    from one exp pass over V: logits (..., V), targets (...) -> three (...) arrays.

    The entropy carries a gradient only with `entropy_grad` (an entropy bonus).
    """
    x = logits.astype(mx.float32)
    if temperature != 1.0:
        x = x / temperature
    peak = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    e = mx.exp(x - peak)
    total = e.sum(axis=-1)
    lse = peak[..., 0] + mx.log(total)
    logp = mx.take_along_axis(x, targets[..., None], axis=-1)[..., 0] - lse
    entropy = lse - (e * x).sum(axis=-1) / total
    return logp, entropy if entropy_grad else mx.stop_gradient(entropy), lse


def entropy_threshold(entropy: mx.array, mask: mx.array, quantile: float) -> mx.array:
    """The `quantile` of the entropies where mask is 1 (torch.quantile's linear
    interpolation); inf when the mask is empty, so that no token passes it."""
    flat = mx.stop_gradient(entropy).reshape(-1)
    real = mask.reshape(-1) > 0
    values = mx.sort(mx.where(real, flat, mx.inf))  # the masked values first, ascending
    count = real.sum()
    at = quantile * mx.maximum(count - 1, 0).astype(mx.float32)
    low = mx.floor(at)
    high = mx.minimum(low + 1, mx.maximum(count - 1, 0).astype(mx.float32))
    v_low = mx.take(values, low.astype(mx.int32))
    v_high = mx.take(values, high.astype(mx.int32))
    value = v_low + (at - low) * (v_high - v_low)
    return mx.where(count > 0, value, mx.inf)


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
    delta: float | None  # two-sided clipping: rho capped at delta (clipped losses)
    off_policy_mask_threshold: float | None
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float
    top_entropy_quantile: float  # 1: every token counts in the policy term
    entropy_bonus: bool  # entropy_coef != 0 or adaptive: the loss takes - coef x mean entropy


@dataclass(frozen=True)
class Normalizer:
    """What one micro-batch's loss is divided by, beyond its own contents, and the entropy
    bonus's coefficient.

    Numbers or scalar arrays (a compiled loss takes them as arrays, so that
    new values need no new trace).
    """

    accumulation_steps: int | mx.array = 1  # micro-batches per optimizer update
    tokens_in_batch: float | mx.array = 1.0  # completion tokens in the whole update (dapo)
    # The micro-batch a chunk of rows belongs to (None: the rows given are all of it).
    rows: int | mx.array | None = None
    tokens: float | mx.array | None = None  # its completion tokens
    # Its entropy threshold (top_entropy_quantile) and the tokens at or above it, when it
    # spans several chunks (None: taken from the rows given).
    entropy_threshold: float | mx.array | None = None
    entropy_tokens: float | mx.array | None = None
    entropy_coef: float | mx.array = 0.0  # the bonus's coefficient in this update


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


def _luspo(loss: mx.array, mask: mx.array, s: LossSettings, n: Normalizer) -> mx.array:
    # each sequence's summed loss: a sequence weighs as many tokens as it has
    return (loss * mask).sum() / _rows(loss, n) / n.accumulation_steps


@dataclass(frozen=True)
class Ratios:
    """What a policy term reads: one micro-batch's log-probs and importance ratios."""

    logp: mx.array  # (N, T) with gradient
    log_ratio: mx.array  # (N, T) logp - logp_old
    coef: mx.array  # rho: (N, T) per token, or (N, 1) per sequence
    adv: mx.array  # (N, 1)
    mask: mx.array  # (N, T)


# A policy term: the per-token loss (N, T) or (N, 1) and its metrics' indicator
# arrays (summed into metric sums by grpo_loss; METRICS names their denominators).
Term = Callable[[Ratios, LossSettings], tuple[mx.array, dict[str, mx.array]]]


def _clipped(r: Ratios, s: LossSettings) -> tuple[mx.array, dict[str, mx.array]]:
    """PPO's clipped surrogate -min(rho A, clip(rho) A); rho capped at delta when set."""
    clipped = mx.clip(r.coef, 1 - s.epsilon_low, 1 + s.epsilon_high)
    coef = r.coef if s.delta is None else mx.minimum(r.coef, s.delta)
    per_token = -mx.minimum(coef * r.adv, clipped * r.adv)
    low = ((coef < 1 - s.epsilon_low) & (r.adv < 0)).astype(mx.float32)
    high = ((coef > 1 + s.epsilon_high) & (r.adv > 0)).astype(mx.float32)
    return per_token, {
        "clip_ratio/low_mean": low,
        "clip_ratio/high_mean": high,
        "clip_ratio/region_mean": mx.maximum(low, high),
    }


def _cispo(r: Ratios, s: LossSettings) -> tuple[mx.array, dict[str, mx.array]]:
    """CISPO (MiniMax-M1): -sg(min(rho, epsilon_high)) A logp."""
    weight = mx.stop_gradient(mx.minimum(r.coef, s.epsilon_high))
    clipped = ((r.coef > s.epsilon_high) & (r.adv > 0)).astype(mx.float32)
    return -weight * r.adv * r.logp, {"cispo_clip_ratio": clipped}


def _sapo(r: Ratios, s: LossSettings) -> tuple[mx.array, dict[str, mx.array]]:
    """SAPO: a soft gate 4 sigmoid(tau (rho - 1)) / tau in place of the clip, tau by A's sign."""
    tau = mx.where(r.adv > 0, s.sapo_temperature_pos, s.sapo_temperature_neg)
    return -mx.sigmoid(tau * (r.coef - 1)) * 4 / tau * r.adv, {}


def _vespo(r: Ratios, s: LossSettings) -> tuple[mx.array, dict[str, mx.array]]:
    """VESPO: -phi(w) A logp, phi(w) = exp(lambda + k log w - lambda w) of the sequence ratio
    w = exp(sum_t log rho_t) (no gradient), k and lambda by A's sign."""
    floor = math.log(1e-8)
    log_w = (mx.clip(r.log_ratio, -20.0, 20.0) * r.mask).sum(-1, keepdims=True)
    log_w = mx.stop_gradient(mx.clip(log_w, floor, 20.0))
    up = r.adv >= 0
    k = mx.where(up, s.vespo_k_pos, s.vespo_k_neg)
    lam = mx.maximum(mx.where(up, s.vespo_lambda_pos, s.vespo_lambda_neg), 1e-4)
    phi = mx.exp(lam + k * log_w - lam * mx.exp(log_w))
    phi = mx.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)  # (N, 1)
    return -phi * r.adv * r.logp, {"vespo/phi_seq_mean": phi}


Aggregation = Callable[[mx.array, mx.array, LossSettings, Normalizer], mx.array]

# loss_type -> (policy term, aggregation), as TRL pairs them
LOSSES: dict[str, tuple[Term, Aggregation]] = {
    "grpo": (_clipped, _grpo),
    "bnpo": (_clipped, _bnpo),
    "dr_grpo": (_clipped, _dr_grpo),
    "dapo": (_clipped, _dapo),
    "cispo": (_cispo, _dapo),
    "sapo": (_sapo, _grpo),
    "luspo": (_clipped, _luspo),
    "vespo": (_vespo, _dapo),
}
LOSS_TYPES = tuple(LOSSES)
KL_ESTIMATORS = ("k3", "exact")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")  # GRPO's token ratios, GSPO's sequence ones

# Each ratio metric's denominator: "ratios" counts what rho is taken over (tokens, or
# sequences for GSPO), "rows" counts sequences.
METRICS = {
    "clip_ratio/low_mean": "ratios",
    "clip_ratio/high_mean": "ratios",
    "clip_ratio/region_mean": "ratios",
    "cispo_clip_ratio": "ratios",
    "vespo/phi_seq_mean": "rows",
}


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


def off_policy_mask(r: Ratios, old_logp: mx.array, threshold: float) -> mx.array:
    """DeepSeek-V3.2's off-policy sequence mask (N, 1): a row with A < 0 whose mean
    log(pi_old / pi) over its tokens exceeds `threshold` leaves the policy term."""
    drift = mx.nan_to_num(old_logp - mx.stop_gradient(r.logp), nan=0.0)
    mean = (drift * r.mask).sum(-1, keepdims=True) / mx.maximum(r.mask.sum(-1, keepdims=True), 1.0)
    return ((r.adv >= 0) | (mean <= threshold)).astype(r.mask.dtype)


def grpo_loss(
    logp: mx.array,  # (N, T) policy log-probs, with gradient
    old_logp: mx.array | None,  # (N, T) pi_old, or None for stop_gradient(logp)
    advantages: mx.array,  # (N,)
    mask: mx.array,  # (N, T) float
    settings: LossSettings,
    normalizer: Normalizer,
    kl: mx.array | None = None,  # (N, T) per-token KL to pi_ref, needed when beta != 0
    entropy: mx.array | None = None,  # (N, T) policy entropy: entropy mask or bonus
) -> tuple[mx.array, dict[str, mx.array]]:
    """Loss of one micro-batch and metric sums.

    The ratio metrics (METRICS) are sums over tokens, or over sequences where
    their arrays are per sequence; `tokens` counts the mask and kl is a sum
    over it. With an entropy mask, `entropy_kept` sums the kept tokens'
    entropy and `tokens_kept` counts them; with an entropy bonus,
    `policy_loss` is the loss before it.
    """
    s, n = settings, normalizer
    old_logp = mx.stop_gradient(logp) if old_logp is None else old_logp
    log_ratio = logp - old_logp
    log_rho = log_importance_weights(logp, old_logp, mask, s.importance_sampling_level)
    r = Ratios(logp, log_ratio, mx.exp(log_rho), advantages[:, None], mask)
    term, aggregate = LOSSES[s.loss_type]
    per_token, indicators = term(r, s)
    if s.off_policy_mask_threshold is not None:
        per_token = per_token * off_policy_mask(r, old_logp, s.off_policy_mask_threshold)
    kept = None
    if s.top_entropy_quantile < 1.0:
        kept = high_entropy_mask(entropy, mask, s.top_entropy_quantile, n.entropy_threshold)
        per_token = per_token * kept
    if s.beta != 0.0:
        if kl is None:
            raise ValueError("beta != 0 needs the per-token KL to the reference policy")
        if s.use_bias_correction_kl and s.kl_estimator == "k3":
            kl = kl * r.coef
        per_token = per_token + s.beta * kl
    loss = aggregate(per_token, mask, s, n)
    stats = _stats(indicators, mask, s, kl, entropy, kept)
    if s.entropy_bonus:
        # Summed row by row, so that no array of the loss is also a metric output: mx.compile
        # fails on an output that is a node of the differentiated graph too.
        counted = mask if kept is None else kept
        tokens = counted.sum(-1).sum() if n.entropy_tokens is None else n.entropy_tokens
        bonus = (entropy * counted).sum(-1).sum() / mx.maximum(tokens, 1.0)
        stats["policy_loss"] = loss
        loss = loss - n.entropy_coef * bonus / n.accumulation_steps
    return loss, {k: mx.stop_gradient(v) for k, v in stats.items()}


def high_entropy_mask(
    entropy: mx.array, mask: mx.array, quantile: float, threshold: mx.array | None
) -> mx.array:
    """1 where a completion token's entropy is in the top `quantile` of the micro-batch's
    (at or above `threshold`, else the (1 - quantile) quantile of these rows')."""
    if entropy is None:
        raise ValueError("top_entropy_quantile < 1 needs the policy's entropy per token")
    if threshold is None:
        threshold = entropy_threshold(entropy, mask, 1.0 - quantile)
    return ((mx.stop_gradient(entropy) * mask >= threshold) & (mask > 0)).astype(mask.dtype)


def _stats(indicators, mask, s: LossSettings, kl, entropy, kept) -> dict[str, mx.array]:
    """Metric sums, as TRL counts them: over tokens, or over sequences for per-sequence
    arrays. Each is a different sum (mx.compile fails on two equal outputs)."""
    per_token_metrics = s.importance_sampling_level == "token"
    stats = {
        k: (v * mask if per_token_metrics and METRICS[k] == "ratios" else v).sum()
        for k, v in indicators.items()
    }
    stats["tokens"] = mask.sum()
    if kl is not None:
        stats["kl"] = (kl * mask).sum()
    if entropy is not None:
        stats["entropy"] = (entropy * mask).sum()
    if kept is not None:
        stats["entropy_kept"] = (entropy * kept).sum()
        stats["tokens_kept"] = kept.sum()
    return stats
