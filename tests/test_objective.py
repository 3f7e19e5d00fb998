"""mlx_grpo.core.objective against an independent float64 NumPy reference of TRL's GRPO formulas.

The reference functions below (prefixed `ref_`) are written from /work/shared/REFERENCE.md
section 1 and TRL's GRPOTrainer (`_compute_loss`, the advantage block of
`_generate_and_score_completions`); they call nothing from the package.
"""

import dataclasses
import itertools
import math

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.core.advantages import group_advantages, weighted_rewards
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.objective import (
    LossSettings,
    Normalizer,
    exact_kl,
    grpo_loss,
    k3_kl,
    logprob_stats,
)


def loss_settings(**changes) -> LossSettings:
    """The training defaults with `changes`."""
    return dataclasses.replace(TrainConfig().loss_settings(), **changes)


STD_EPS = 1e-4
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
LEVELS = ["token", "sequence"]


# ---------------------------------------------------------------------------
# Independent NumPy reference (float64)
# ---------------------------------------------------------------------------


def ref_bessel_std(values: list[float]) -> float | None:
    """Sample std with the N-1 correction; None when it is undefined (fewer than two values)."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def ref_advantages(per_func: np.ndarray, weights: list[float], g: int, scale: str):
    """Row-by-row loops: weighted nansum, unscorable rows excluded, A = 0 where std is undefined."""
    n, k = per_func.shape
    rewards = np.full(n, np.nan)
    for i in range(n):
        terms = [weights[j] * per_func[i, j] for j in range(k) if not np.isnan(per_func[i, j])]
        if terms:
            rewards[i] = sum(terms)
    scorable = ~np.isnan(rewards)
    batch_std = ref_bessel_std(list(rewards[scorable]))
    adv = np.zeros(n)
    for start in range(0, n, g):
        rows = [i for i in range(start, start + g) if scorable[i]]
        if not rows:
            continue
        mean = sum(rewards[i] for i in rows) / len(rows)
        std = ref_bessel_std([rewards[i] for i in rows]) if scale == "group" else batch_std
        for i in rows:
            if scale == "none":
                adv[i] = rewards[i] - mean
            elif std is not None:
                adv[i] = (rewards[i] - mean) / (std + STD_EPS)
    return rewards, adv


def ref_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def ref_token_logprobs(logits, targets, temperature):
    logq = ref_log_softmax(np.asarray(logits, np.float64) / temperature)
    logp = np.take_along_axis(logq, np.asarray(targets)[..., None], axis=-1)[..., 0]
    entropy = -(np.exp(logq) * logq).sum(-1)
    return logp, entropy


def ref_exact_kl(logits, ref_logits, temperature):
    logp = ref_log_softmax(np.asarray(logits, np.float64) / temperature)
    logq = ref_log_softmax(np.asarray(ref_logits, np.float64) / temperature)
    p = np.exp(logp)
    return (p * np.log(p / np.exp(logq))).sum(-1)


def ref_k3(logp, ref_logp):
    d = np.asarray(ref_logp, np.float64) - np.asarray(logp, np.float64)
    return np.exp(d) - d - 1


def ref_grpo_loss(
    logp,
    old_logp,
    adv,
    mask,
    *,
    loss_type,
    eps_low,
    eps_high,
    beta,
    level,
    bias_correction,
    max_len,
    ga,
    tokens_in_batch,
    kl=None,
):
    """TRL's per-token clipped surrogate + beta * KL, then the loss-type aggregation."""
    logp, old_logp, adv, mask = (np.asarray(a, np.float64) for a in (logp, old_logp, adv, mask))
    n, t = logp.shape
    lengths = np.maximum(mask.sum(1), 1.0)
    log_ratio = logp - old_logp
    if level == "token":
        rho = np.exp(log_ratio)
    else:
        rho = np.exp((log_ratio * mask).sum(1) / lengths)[:, None] * np.ones((1, t))
    a = adv[:, None] * np.ones((1, t))
    clipped = np.clip(rho, 1 - eps_low, 1 + eps_high)
    per_token = -np.minimum(rho * a, clipped * a)
    kl_used = None
    if kl is not None:
        kl_used = np.asarray(kl, np.float64) * (rho if bias_correction else 1.0)
    if beta != 0.0:
        per_token = per_token + beta * kl_used
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(1) / lengths).mean() / ga
    elif loss_type == "bnpo":
        loss = masked.sum() / max(mask.sum(), 1.0) / ga
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (n * max_len) / ga
    elif loss_type == "dapo":
        loss = masked.sum() / max(tokens_in_batch, 1.0)
    else:
        raise AssertionError(loss_type)

    low = (rho < 1 - eps_low) & (a < 0)
    high = (rho > 1 + eps_high) & (a > 0)
    # TRL counts clip events per completion token, or per sequence when the ratio is per sequence.
    if level == "token":
        weight = mask
    else:  # every column of a row holds the same sequence ratio: count one column per row
        low, high, weight = low[:, :1], high[:, :1], np.ones((n, 1))
    stats = {
        "clip_ratio/low_mean": (low * weight).sum(),
        "clip_ratio/high_mean": (high * weight).sum(),
        "clip_ratio/region_mean": ((low | high) * weight).sum(),
        "tokens": mask.sum(),
    }
    if kl_used is not None:
        stats["kl"] = (kl_used * mask).sum()
    return loss, stats


def ref_weights(loss_type, mask, max_len, ga, tokens_in_batch):
    """Per-row factor w_i such that loss = sum_i w_i sum_t m_it l_it."""
    n = mask.shape[0]
    lengths = np.maximum(mask.sum(1), 1.0)
    return {
        "grpo": 1.0 / (n * lengths * ga),
        "bnpo": np.full(n, 1.0 / (max(mask.sum(), 1.0) * ga)),
        "dr_grpo": np.full(n, 1.0 / (n * max_len * ga)),
        "dapo": np.full(n, 1.0 / max(tokens_in_batch, 1.0)),
    }[loss_type]


def to_np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


# ---------------------------------------------------------------------------
# Shared hand-made micro-batch: N = 4 sequences, T = 5 positions
# ---------------------------------------------------------------------------

N, T, V = 4, 5, 7
EPS_LOW, EPS_HIGH = 0.2, 0.28  # clip range [0.8, 1.28]: log bounds -0.223 and +0.247
MAX_LEN = 8  # != T, so dr_grpo must use max_completion_length, not the padded width
GA = 2
TOKENS_IN_BATCH = 30.0  # the whole accumulated update; this micro-batch holds only 12

MASK = np.array(
    [
        [1, 1, 1, 1, 1],  # 5 tokens
        [1, 1, 1, 0, 0],  # 3 tokens
        [1, 1, 1, 1, 0],  # 4 tokens
        [0, 0, 0, 0, 0],  # empty completion: contributes nothing
    ],
    dtype=np.float64,
)
ADV = np.array([1.3, -0.8, 0.5, -1.0])
# log(pi / pi_old). Token level: row 0 clips high at 0.5, 0.4, 0.6 (A > 0) while -0.3
# (rho 0.74 < 0.8) must stay unclipped because A > 0; row 1 clips low at -0.5, -0.6 (A < 0)
# while 0.35 (rho 1.42) must stay unclipped because A < 0; row 2 clips high at 0.6.
# Sequence level (mean over the mask): row 0 0.26 > 0.247 clips high, row 1 -0.25 < -0.223
# clips low, row 2 0.175 stays inside. Masked entries are large so leaking them shows.
LOG_RATIO = np.array(
    [
        [0.5, -0.3, 0.4, 0.6, 0.1],
        [-0.5, 0.35, -0.6, 0.9, -2.0],
        [0.15, -0.1, 0.6, 0.05, 2.0],
        [1.0, -1.0, 0.5, 0.3, 2.0],
    ]
)


def micro_batch():
    rng = np.random.default_rng(1234)
    old_logp = -rng.uniform(0.2, 3.0, size=(N, T))
    logp = old_logp + LOG_RATIO
    ref_logp = logp + rng.normal(0.0, 0.4, size=(N, T))
    logits = rng.normal(0.0, 1.5, size=(N, T, V))
    ref_logits = logits + rng.normal(0.0, 0.5, size=(N, T, V))
    return logp, old_logp, ref_logp, logits, ref_logits


def mx32(a) -> mx.array:
    return mx.array(np.asarray(a, dtype=np.float32))


# ---------------------------------------------------------------------------
# 1. Advantages
# ---------------------------------------------------------------------------


def test_group_advantages_match_hand_derivation():
    nan = np.nan
    per_func = np.array(
        [
            [0.0, 0.0],
            [0.0, 0.0],
            [0.0, 0.0],
            [1.0, 4.0],
            [1.0, nan],  # function 2 not applicable: r = 2 * 1 = 2
            [nan, 0.0],  # function 1 not applicable: r = 0.5 * 0 = 0
            [nan, nan],  # unscorable
            [2.0, nan],  # r = 4
        ]
    )
    weights = np.array([2.0, 0.5])
    # Group 1: r = [0, 0, 0, 2*1 + 0.5*4 = 4]; mean 1; deviations [-1, -1, -1, 3];
    #   Bessel std = sqrt(12 / 3) = 2 (the population std would be sqrt(3));
    #   A = dev / (2 + 1e-4) = [-0.499975..., ..., 1.499925...].
    # Group 2: r = [2, 0, (none), 4]; the unscorable row is left out, so mean 2 (not 1.5),
    #   deviations [0, -2, -, 2], Bessel std = sqrt(8 / 2) = 2; A = [0, -0.99995, 0, 0.99995].
    expected = np.array([-1, -1, -1, 3, 0, -2, 0, 2]) / 2.0001
    got = group_advantages(per_func, weights, num_generations=4, scale_rewards="group")
    np.testing.assert_allclose(got.advantages, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.rewards, [0, 0, 0, 4, 2, 0, nan, 4])
    np.testing.assert_allclose(got.std, [2.0] * 8)

    # "none" keeps the same baselines and skips the division.
    got_none = group_advantages(per_func, weights, num_generations=4, scale_rewards="none")
    np.testing.assert_allclose(got_none.advantages, [-1, -1, -1, 3, 0, -2, 0, 2], atol=1e-7)


def advantage_batch():
    """16 rows in 4 groups of G = 4, K = 2 functions, each group a different edge case."""
    rng = np.random.default_rng(7)
    nan = np.nan
    per_func = rng.normal(size=(16, 2))
    per_func[1, 1] = nan  # group 0: one function None on some rows -> nansum of the other
    per_func[2, 0] = nan
    per_func[4:8] = [1.5, -0.5]  # group 1: all ties -> std 0 -> A = 0
    per_func[9] = [nan, nan]  # group 2: one unscorable row among scorable ones
    per_func[10, 0] = nan
    per_func[12] = [nan, nan]  # group 3: only row 13 is scorable
    per_func[13, 1] = nan
    per_func[14] = [nan, nan]
    per_func[15] = [nan, nan]
    return per_func, np.array([1.0, 0.3])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_reference_for_every_scale(scale):
    per_func, weights = advantage_batch()
    ref_rewards, ref_adv = ref_advantages(per_func, list(weights), 4, scale)
    got = group_advantages(per_func, weights, num_generations=4, scale_rewards=scale)
    assert np.all(np.isfinite(got.advantages))
    np.testing.assert_allclose(got.advantages, ref_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.rewards, ref_rewards, rtol=1e-6)
    # The edge cases themselves, independent of the reference.
    np.testing.assert_array_equal(got.advantages[4:8], 0.0)  # ties
    assert got.advantages[9] == 0.0 and got.advantages[12:].tolist() == [0.0] * 4
    assert np.isnan(got.rewards[[9, 12, 14, 15]]).all()
    assert got.rewards[1] == pytest.approx(per_func[1, 0])  # None skipped, not NaN
    assert got.rewards[10] == pytest.approx(0.3 * per_func[10, 1])  # weight applied


def test_batch_scale_uses_one_std_over_the_batch_but_group_means():
    per_func, weights = advantage_batch()
    got = group_advantages(per_func, weights, num_generations=4, scale_rewards="batch")
    r = got.rewards.astype(np.float64)
    std = np.nanstd(r, ddof=1)
    np.testing.assert_allclose(got.std, std, rtol=1e-6)
    group0 = r[:4] - r[:4].mean()
    np.testing.assert_allclose(got.advantages[:4], group0 / (std + STD_EPS), rtol=1e-5)


def test_group_advantages_rejects_unknown_scale():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(np.ones((4, 1)), np.ones(1), num_generations=2, scale_rewards="max")


# ---------------------------------------------------------------------------
# 4. Token log-probs, entropy and KL
# ---------------------------------------------------------------------------


def token_logprobs(logits, targets, temperature):
    """(logp, entropy) of `logprob_stats`."""
    return logprob_stats(logits, targets, temperature)[:2]


def test_token_logprobs_and_entropy_match_numpy_at_temperature():
    _, _, _, logits, _ = micro_batch()
    targets = np.random.default_rng(3).integers(0, V, size=(N, T))
    logp, entropy = token_logprobs(mx32(logits), mx.array(targets), temperature=0.7)
    ref_logp, ref_entropy = ref_token_logprobs(logits, targets, 0.7)
    np.testing.assert_allclose(to_np(logp), ref_logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(entropy), ref_entropy, rtol=1e-5, atol=1e-6)
    # At temperature 1 the numbers differ, so the temperature is really applied.
    assert not np.allclose(ref_token_logprobs(logits, targets, 1.0)[0], ref_logp, atol=1e-3)


def test_entropy_carries_no_gradient_but_logprob_does():
    _, _, _, logits, _ = micro_batch()
    targets = np.random.default_rng(3).integers(0, V, size=(N, T))
    x, tgt = mx32(logits), mx.array(targets)
    g_entropy = mx.grad(lambda z: token_logprobs(z, tgt, 0.7)[1].sum())(x)
    np.testing.assert_array_equal(to_np(g_entropy), 0.0)
    # d logp / d logits = (onehot(target) - softmax(logits / tau)) / tau
    g_logp = mx.grad(lambda z: token_logprobs(z, tgt, 0.7)[0].sum())(x)
    probs = np.exp(ref_log_softmax(logits / 0.7))
    onehot = np.eye(V)[targets]
    np.testing.assert_allclose(to_np(g_logp), (onehot - probs) / 0.7, atol=1e-5)


def test_exact_kl_matches_full_vocabulary_sum_at_temperature():
    _, _, _, logits, ref_logits = micro_batch()
    got = to_np(exact_kl(mx32(logits), mx32(ref_logits), temperature=0.6))
    expected = ref_exact_kl(logits, ref_logits, 0.6)
    assert got.shape == (N, T)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.all(expected > 0)
    assert not np.allclose(expected, ref_exact_kl(logits, ref_logits, 1.0), rtol=1e-2)
    np.testing.assert_allclose(to_np(exact_kl(mx32(logits), mx32(logits), 0.6)), 0.0, atol=1e-6)


def test_k3_kl_matches_schulman_estimator():
    logp, _, ref_logp, _, _ = micro_batch()
    got = to_np(k3_kl(mx32(logp), mx32(ref_logp)))
    np.testing.assert_allclose(got, ref_k3(logp, ref_logp), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# 2. Loss value and metrics
# ---------------------------------------------------------------------------


def kl_input(kind: str, logp, ref_logp, logits, ref_logits):
    """(mx KL fed to grpo_loss, float64 reference of the same KL)."""
    if kind == "k3":
        return k3_kl(mx32(logp), mx32(ref_logp)), ref_k3(logp, ref_logp)
    if kind == "exact":
        return exact_kl(mx32(logits), mx32(ref_logits), 0.6), ref_exact_kl(logits, ref_logits, 0.6)
    return None, None


LOSS_CASES = [
    (loss_type, level, beta, kind, bias)
    for loss_type, level, (beta, kind), bias in itertools.product(
        LOSS_TYPES, LEVELS, [(0.0, "none"), (0.04, "k3"), (0.3, "exact")], [True, False]
    )
    if not (beta == 0.0 and not bias)  # bias correction only matters when there is a KL term
]


@pytest.mark.parametrize("loss_type,level,beta,kl_kind,bias", LOSS_CASES)
def test_grpo_loss_and_metrics_match_reference(loss_type, level, beta, kl_kind, bias):
    logp, old_logp, ref_logp, logits, ref_logits = micro_batch()
    kl_mx, kl_np = kl_input(kl_kind, logp, ref_logp, logits, ref_logits)
    settings = loss_settings(
        loss_type=loss_type,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        beta=beta,
        importance_sampling_level=level,
        use_bias_correction_kl=bias,
        max_completion_length=MAX_LEN,
        kl_estimator="exact" if kl_kind == "exact" else "k3",
    )
    normalizer = Normalizer(accumulation_steps=GA, tokens_in_batch=TOKENS_IN_BATCH)
    loss, stats = grpo_loss(
        mx32(logp), mx32(old_logp), mx32(ADV), mx32(MASK), settings, normalizer, kl=kl_mx
    )
    ref_loss, ref_stats = ref_grpo_loss(
        logp,
        old_logp,
        ADV,
        MASK,
        loss_type=loss_type,
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        beta=beta,
        level=level,
        # The exact KL is already an expectation under pi: no ratio correction.
        bias_correction=bias and kl_kind == "k3",
        max_len=MAX_LEN,
        ga=GA,
        tokens_in_batch=TOKENS_IN_BATCH,
        kl=kl_np,
    )
    assert loss.shape == ()
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    # The data really exercises both clip sides (guards the test itself).
    assert ref_stats["clip_ratio/low_mean"] >= 1 and ref_stats["clip_ratio/high_mean"] >= 1
    expected_keys = set(ref_stats)
    assert set(stats) == expected_keys
    for key, value in ref_stats.items():
        assert float(stats[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_clip_metric_counts_are_the_hand_counted_ones():
    logp, old_logp, *_ = micro_batch()
    normalizer = Normalizer(accumulation_steps=GA, tokens_in_batch=TOKENS_IN_BATCH)
    args = (mx32(logp), mx32(old_logp), mx32(ADV), mx32(MASK))
    # Token level, counted from the LOG_RATIO comment: low {row1: -0.5, -0.6},
    # high {row0: 0.5, 0.4, 0.6; row2: 0.6}; the empty row and padding count for nothing.
    s = loss_settings(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    _, stats = grpo_loss(*args, s, normalizer)
    assert [float(stats[k]) for k in ("clip_ratio/low_mean", "clip_ratio/high_mean")] == [2, 4]
    assert float(stats["clip_ratio/region_mean"]) == 6 and float(stats["tokens"]) == 12
    # Sequence level: row 1 low, row 0 high, out of 4 sequences.
    s = loss_settings(
        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, importance_sampling_level="sequence"
    )
    _, stats = grpo_loss(*args, s, normalizer)
    assert [float(stats[k]) for k in ("clip_ratio/low_mean", "clip_ratio/high_mean")] == [1, 1]
    assert float(stats["clip_ratio/region_mean"]) == 2 and float(stats["tokens"]) == 12


def test_grpo_loss_without_kl_when_beta_is_set_is_an_error():
    logp, old_logp, *_ = micro_batch()
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(
            mx32(logp),
            mx32(old_logp),
            mx32(ADV),
            mx32(MASK),
            loss_settings(beta=0.1),
            Normalizer(),
        )


# ---------------------------------------------------------------------------
# 3. Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_type,level,bias", list(itertools.product(LOSS_TYPES, LEVELS, [True, False]))
)
def test_on_policy_gradient_matches_analytic(loss_type, level, bias):
    """old_logp=None: rho = 1 in value, but d rho / d logp = rho (token) or m_t / L (sequence)."""
    logp, _, ref_logp, _, _ = micro_batch()
    beta = 0.1
    settings = loss_settings(
        loss_type=loss_type,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        beta=beta,
        importance_sampling_level=level,
        use_bias_correction_kl=bias,
        max_completion_length=MAX_LEN,
    )
    normalizer = Normalizer(accumulation_steps=GA, tokens_in_batch=TOKENS_IN_BATCH)
    adv, mask, ref = mx32(ADV), mx32(MASK), mx32(ref_logp)

    def loss_fn(lp):
        return grpo_loss(lp, None, adv, mask, settings, normalizer, kl=k3_kl(lp, ref))[0]

    value, grad = mx.value_and_grad(loss_fn)(mx32(logp))

    k3 = ref_k3(logp, ref_logp)
    ref_value, _ = ref_grpo_loss(
        logp,
        logp,
        ADV,
        MASK,
        loss_type=loss_type,
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        beta=beta,
        level=level,
        bias_correction=bias,
        max_len=MAX_LEN,
        ga=GA,
        tokens_in_batch=TOKENS_IN_BATCH,
        kl=k3,
    )
    assert float(value) == pytest.approx(ref_value, rel=1e-5, abs=1e-7)

    # loss = sum_i w_i sum_t m_it l_it, l_it = -rho A_i + beta k3_it rho^bias.
    w = ref_weights(loss_type, MASK, MAX_LEN, GA, TOKENS_IN_BATCH)[:, None]
    dk3 = 1.0 - np.exp(ref_logp - logp)  # d k3 / d logp
    if level == "token":
        expected = w * MASK * (-ADV[:, None] + beta * (dk3 + bias * k3))
    else:
        lengths = np.maximum(MASK.sum(1), 1.0)[:, None]
        through_rho = (MASK * (-ADV[:, None] + beta * bias * k3)).sum(1, keepdims=True)
        expected = w * (through_rho * MASK / lengths + beta * MASK * dk3)
    np.testing.assert_allclose(to_np(grad), expected, rtol=1e-4, atol=1e-6)


def ref_pipeline_loss(w_param, x, w_ref, targets, old_logp, loss_type, level):
    logp, _ = ref_token_logprobs(x @ w_param, targets, FD_TEMPERATURE)
    ref_logp, _ = ref_token_logprobs(x @ w_ref, targets, FD_TEMPERATURE)
    loss, _ = ref_grpo_loss(
        logp,
        old_logp,
        ADV,
        MASK,
        loss_type=loss_type,
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        beta=FD_BETA,
        level=level,
        bias_correction=True,
        max_len=MAX_LEN,
        ga=GA,
        tokens_in_batch=TOKENS_IN_BATCH,
        kl=ref_k3(logp, ref_logp),
    )
    return loss


FD_TEMPERATURE, FD_BETA, D = 0.8, 0.05, 3


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence")])
def test_full_pipeline_gradient_matches_finite_differences(loss_type, level):
    rng = np.random.default_rng(99)
    x = rng.normal(size=(N, T, D))
    w0 = rng.normal(size=(D, V))
    w_ref = w0 + rng.normal(0.0, 0.3, size=(D, V))
    targets = rng.integers(0, V, size=(N, T))
    logp0, _ = ref_token_logprobs(x @ w0, targets, FD_TEMPERATURE)
    # pi_old: a fixed (stop-gradient) copy of the current log-probs, shifted so that ratios
    # leave the trust region on both sides.
    old_logp = logp0 - LOG_RATIO
    settings = loss_settings(
        loss_type=loss_type,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        beta=FD_BETA,
        importance_sampling_level=level,
        max_completion_length=MAX_LEN,
    )
    normalizer = Normalizer(accumulation_steps=GA, tokens_in_batch=TOKENS_IN_BATCH)
    x_mx, tgt, adv, mask, old = mx32(x), mx.array(targets), mx32(ADV), mx32(MASK), mx32(old_logp)
    ref_logp = token_logprobs(x_mx @ mx32(w_ref), tgt, FD_TEMPERATURE)[0]

    def loss_fn(w):
        logp, _ = token_logprobs(x_mx @ w, tgt, FD_TEMPERATURE)
        return grpo_loss(logp, old, adv, mask, settings, normalizer, kl=k3_kl(logp, ref_logp))[0]

    value, grad = mx.value_and_grad(loss_fn)(mx32(w0))
    ref_args = (x, w_ref, targets, old_logp, loss_type, level)
    assert float(value) == pytest.approx(ref_pipeline_loss(w0, *ref_args), rel=1e-5)

    h = 1e-6
    fd = np.zeros_like(w0)
    for idx in np.ndindex(*w0.shape):
        step = np.zeros_like(w0)
        step[idx] = h
        up = ref_pipeline_loss(w0 + step, *ref_args)
        down = ref_pipeline_loss(w0 - step, *ref_args)
        fd[idx] = (up - down) / (2 * h)
    got = to_np(grad)
    assert np.linalg.norm(fd) > 1e-3  # a gradient worth comparing
    assert np.linalg.norm(got - fd) / np.linalg.norm(fd) < 1e-3


def test_clipped_tokens_get_no_policy_gradient():
    """beta = 0: only unclipped tokens move; wrong-side tokens (rho 0.74, A > 0) still do."""
    logp, old_logp, *_ = micro_batch()
    s = loss_settings(loss_type="dapo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    n = Normalizer(tokens_in_batch=12.0)
    old, adv, mask = mx32(old_logp), mx32(ADV), mx32(MASK)
    grad = to_np(mx.grad(lambda lp: grpo_loss(lp, old, adv, mask, s, n)[0])(mx32(logp)))
    rho = np.exp(LOG_RATIO)
    active = ~(
        ((rho < 1 - EPS_LOW) & (ADV[:, None] < 0)) | ((rho > 1 + EPS_HIGH) & (ADV[:, None] > 0))
    )
    expected = np.where(active, -ADV[:, None] * rho * MASK / 12.0, 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    assert grad[0, 1] != 0.0 and grad[1, 1] != 0.0  # outside the range but on the unclipped side
    assert grad[0, 0] == 0.0 and grad[1, 0] == 0.0  # clipped high / clipped low


# ---------------------------------------------------------------------------
# 5. Aggregation across gradient-accumulation micro-batches
# ---------------------------------------------------------------------------


def two_micro_batches():
    rng = np.random.default_rng(5)
    mask_b = np.array(
        [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=np.float64
    )
    masks = [MASK, mask_b]
    logps = [-rng.uniform(0.2, 3.0, size=(N, T)) for _ in masks]
    olds = [lp - rng.normal(0.0, 0.3, size=(N, T)) for lp in logps]
    advs = [ADV, np.array([0.9, -0.2, -1.4, 0.6])]
    return masks, logps, olds, advs


def test_dapo_over_micro_batches_is_one_token_mean_over_the_update():
    masks, logps, olds, advs = two_micro_batches()
    total = float(sum(m.sum() for m in masks))  # 12 + 17 tokens
    s = loss_settings(loss_type="dapo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    split = sum(
        float(
            grpo_loss(
                mx32(lp), mx32(old), mx32(a), mx32(m), s, Normalizer(2, tokens_in_batch=total)
            )[0]
        )
        for lp, old, a, m in zip(logps, olds, advs, masks, strict=True)
    )
    whole = float(
        grpo_loss(
            mx32(np.concatenate(logps)),
            mx32(np.concatenate(olds)),
            mx32(np.concatenate(advs)),
            mx32(np.concatenate(masks)),
            s,
            Normalizer(1, tokens_in_batch=total),
        )[0]
    )
    assert split == pytest.approx(whole, rel=1e-5)
    # ...and that is the plain mean over all 29 completion tokens.
    rho = np.exp(np.concatenate(logps) - np.concatenate(olds))
    a = np.concatenate(advs)[:, None]
    per_token = -np.minimum(rho * a, np.clip(rho, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
    m = np.concatenate(masks)
    assert whole == pytest.approx((per_token * m).sum() / m.sum(), rel=1e-5)


def test_grpo_with_two_accumulation_steps_equals_full_batch_mean():
    masks, logps, olds, advs = two_micro_batches()
    s = loss_settings(loss_type="grpo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    halves = sum(
        float(grpo_loss(mx32(lp), mx32(old), mx32(a), mx32(m), s, Normalizer(2))[0])
        for lp, old, a, m in zip(logps, olds, advs, masks, strict=True)
    )
    full = float(
        grpo_loss(
            mx32(np.concatenate(logps)),
            mx32(np.concatenate(olds)),
            mx32(np.concatenate(advs)),
            mx32(np.concatenate(masks)),
            s,
            Normalizer(1),
        )[0]
    )
    assert halves == pytest.approx(full, rel=1e-5)
    # Without the division by accumulation_steps the sum would be twice the mean.
    assert abs(full) > 1e-3


def test_weighted_rewards_skip_none_and_leave_unscored_completions_without_a_reward():
    per_func = np.array([[1.0, np.nan], [np.nan, np.nan], [0.5, 2.0]])
    got = weighted_rewards(per_func, np.array([1.0, 0.5]))
    assert got[0] == 1.0 and np.isnan(got[1]) and got[2] == 0.5 + 0.5 * 2.0
    adv = group_advantages(per_func, np.array([1.0, 0.5]), 3)
    assert np.array_equal(np.isnan(adv.rewards), np.isnan(got)) and adv.advantages[1] == 0.0
