import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_grpo.core.logprobs import (
    completion_hidden,
    completion_logprobs,
    head_logprobs,
    prompt_groups,
)
from mlx_grpo.core.lora import adapters_disabled, apply_lora
from mlx_grpo.core.models import left_pad, load_model

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20, 21, 22, 23]]
COMPLETIONS = [[40, 41, 42, 43, 44], [50, 51, 52, 53, 54], [60, 61, 62, 63, 64]]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    apply_lora(lm.model, rank=3, scale=2.0, targets=["q_proj", "v_proj", "down_proj"])
    # Non-zero B so the adapters take part in the forward and backward passes.
    for _, m in lm.model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    return lm


def padded_batch(lm):
    tokens, padding = left_pad(PROMPTS, lm.pad_id)
    return tokens, padding, mx.array(COMPLETIONS)


def alone_logprobs(model, prompt, completion, temperature):
    logits = model(mx.array([prompt + completion]))[0, len(prompt) - 1 : -1] / temperature
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(mx.take_along_axis(logp, mx.array(completion)[:, None], axis=-1)[:, 0])


def test_padded_batch_scores_equal_each_row_scored_alone(lm):
    tokens, padding, completions = padded_batch(lm)
    scores = completion_logprobs(lm.model, tokens, padding, completions, 0.8, chunk_size=2)
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        expected = alone_logprobs(lm.model, prompt, completion, 0.8)
        np.testing.assert_allclose(np.array(scores.logp[i]), expected, atol=1e-5)
    assert (np.array(scores.entropy) > 0).all()


def test_chunking_the_lm_head_changes_neither_values_nor_gradients(lm):
    tokens, padding, completions = padded_batch(lm)

    def loss(model, chunk):
        return completion_logprobs(model, tokens, padding, completions, 1.0, chunk).logp.sum()

    results = [nn.value_and_grad(lm.model, lambda m, c=c: loss(m, c))(lm.model) for c in (1, 3, 64)]
    values = [float(v) for v, _ in results]
    assert values == pytest.approx([values[0]] * 3, rel=1e-6)
    grads = [dict(tree_flatten(g)) for _, g in results]
    assert grads[0]
    for other in grads[1:]:
        for k, v in grads[0].items():
            np.testing.assert_allclose(np.array(other[k]), np.array(v), atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_head_logprobs_values_and_gradient_match_numpy(chunk):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(50, 8)).astype(np.float32)  # (V, D) head
    h = rng.normal(size=(2, 3, 8)).astype(np.float32)
    y = rng.integers(0, 50, size=(2, 3))
    up = rng.normal(size=(2, 3)).astype(np.float32)  # upstream gradient of logp
    temp = 0.7
    head = lambda x: x @ mx.array(w).T  # noqa: E731

    def f(hidden):
        logp, _ = head_logprobs(head, hidden, mx.array(y), temp, chunk)
        return (logp * mx.array(up)).sum()

    logp, entropy = head_logprobs(head, mx.array(h), mx.array(y), temp, chunk)
    grad = mx.grad(f)(mx.array(h))

    z = (h.astype(np.float64) @ w.T) / temp
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(50)[y]
    np.testing.assert_allclose(np.array(logp), np.log((p * onehot).sum(-1)), atol=1e-5)
    np.testing.assert_allclose(np.array(entropy), -(p * np.log(p)).sum(-1), atol=1e-5)
    expected = ((onehot - p) * up[..., None] / temp) @ w
    np.testing.assert_allclose(np.array(grad), expected, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_head_entropy_gradient_matches_numpy_for_an_entropy_bonus(chunk):
    """d/dh of sum(a logp + b H), with dH/dz = -p (log p + H), against NumPy in float64."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(40, 8)).astype(np.float32)
    h = rng.normal(size=(2, 3, 8)).astype(np.float32)
    y = rng.integers(0, 40, size=(2, 3))
    a, b = (rng.normal(size=(2, 3)).astype(np.float32) for _ in range(2))
    temp = 0.8
    head = lambda x: x @ mx.array(w).T  # noqa: E731

    def f(hidden, entropy_grad=True):
        logp, entropy = head_logprobs(head, hidden, mx.array(y), temp, chunk, entropy_grad)
        return (logp * mx.array(a) + entropy * mx.array(b)).sum()

    grad = np.array(mx.grad(f)(mx.array(h)))
    z = (h.astype(np.float64) @ w.T) / temp
    log_p = (
        z
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - z.max(-1, keepdims=True)
    )
    p = np.exp(log_p)
    entropy = -(p * log_p).sum(-1, keepdims=True)
    dz = (np.eye(40)[y] - p) * a[..., None] - p * (log_p + entropy) * b[..., None]
    np.testing.assert_allclose(grad, (dz / temp) @ w, atol=1e-5)
    # Without entropy_grad the entropy is a metric: only the log-prob term's gradient.
    metric_only = np.array(mx.grad(lambda x: f(x, False))(mx.array(h)))
    np.testing.assert_allclose(
        metric_only, (((np.eye(40)[y] - p) * a[..., None]) / temp) @ w, atol=1e-5
    )


def test_lora_gradients_through_the_chunked_head_equal_plain_autodiff(lm):
    tokens, padding, completions = padded_batch(lm)
    weights = mx.array([[1.0, -2.0, 0.5, 3.0, -1.0]] * 3) * mx.array([[1.0], [0.3], [-0.7]])

    def chunked(model):
        logp = completion_logprobs(model, tokens, padding, completions, 0.8, chunk_size=4).logp
        return (logp * weights).sum()

    def plain(model):  # each row alone, full logits, MLX's own autodiff
        total = mx.array(0.0)
        for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            logits = model(mx.array([prompt + completion]))[0, len(prompt) - 1 : -1] / 0.8
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            picked = mx.take_along_axis(logp, mx.array(completion)[:, None], axis=-1)[:, 0]
            total = total + (picked * weights[i]).sum()
        return total

    v1, g1 = nn.value_and_grad(lm.model, chunked)(lm.model)
    v2, g2 = nn.value_and_grad(lm.model, plain)(lm.model)
    assert float(v1) == pytest.approx(float(v2), rel=1e-5)
    g2 = dict(tree_flatten(g2))
    assert g2
    for k, v in tree_flatten(g1):
        np.testing.assert_allclose(np.array(v), np.array(g2[k]), atol=2e-5, rtol=1e-4)


def test_exact_kl_is_zero_against_itself_and_positive_against_another_policy(lm):
    tokens, padding, completions = padded_batch(lm)
    own = completion_hidden(lm.model, tokens, padding, completions)
    same = completion_logprobs(lm.model, tokens, padding, completions, 1.0, ref_hidden=own)
    assert np.abs(np.array(same.kl)).max() < 1e-5
    with adapters_disabled(lm.model):
        base = completion_hidden(lm.model, tokens, padding, completions)
    other = completion_logprobs(lm.model, tokens, padding, completions, 1.0, ref_hidden=base)
    assert (np.array(other.kl) > 0).all()


def test_generation_config_eos_ids_are_stop_tokens(tiny_model_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    im_end, endoftext = config["eos_token_id"]
    config["eos_token_id"] = im_end  # as Qwen3's config.json: one id
    (model_dir / "config.json").write_text(json.dumps(config))
    lm = load_model(str(model_dir))
    assert {im_end, endoftext} <= set(lm.eos_ids)


def test_a_prompt_shared_by_its_group_gives_the_values_and_gradients_of_separate_rows(lm):
    # Two groups of G = 3 with different completions; each prompt runs once.
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    completions = COMPLETIONS + [[70, 71, 72, 73, 74], [80, 81, 82, 83, 84], [9, 8, 7, 6, 5]]
    tokens, padding = left_pad(prompts, lm.pad_id)
    ids = mx.array(completions)
    owner, first = prompt_groups(tokens, padding)
    assert owner.tolist() == [0, 0, 0, 1, 1, 1] and first.tolist() == [0, 3]

    def batched(model):
        return completion_logprobs(model, tokens, padding, ids, 0.9, chunk_size=2).logp.sum()

    def alone(model):
        total = 0.0
        for prompt, completion in zip(prompts, completions):
            logits = model(mx.array([prompt + completion]))[0, len(prompt) - 1 : -1] / 0.9
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            total = total + mx.take_along_axis(logp, mx.array(completion)[:, None], -1).sum()
        return total

    (value, grads), (expected, expected_grads) = (
        nn.value_and_grad(lm.model, f)(lm.model) for f in (batched, alone)
    )
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    got, want = dict(tree_flatten(grads)), dict(tree_flatten(expected_grads))
    assert got.keys() == want.keys() and got
    for k in want:
        np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), atol=2e-4, rtol=1e-3)


def test_no_grad_scoring_gives_the_same_log_probs_chunk_by_chunk(lm):
    tokens, padding, completions = padded_batch(lm)
    full = completion_logprobs(lm.model, tokens, padding, completions, 0.8, chunk_size=64)
    now = completion_logprobs(lm.model, tokens, padding, completions, 0.8, 4, no_grad=True)
    assert now.entropy is None
    np.testing.assert_allclose(np.array(now.logp), np.array(full.logp), atol=1e-5)
