"""mlx_grpo.core.rollout: shapes and masks, EOS handling, batched greedy decoding equal to
decoding alone and to mlx-lm, independent sampling of a group after one prefill, and
sampled log-probs equal to a fresh forward pass.

The model is a random tiny Qwen3 with a wide init (init_std=0.3), so its next-token
distributions are peaky and greedy choices are far from ties.
"""

import dataclasses
import os

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from mlx_grpo.core.config import SamplingSettings, TrainConfig
from mlx_grpo.core.models import load_model
from mlx_grpo.core.rollout import Noise, inverse_cdf, make_draw, rollout
from mlx_grpo.tasks.toy import build_tiny_qwen3

PROMPTS = [[10, 20, 30], [5, 6, 7, 8, 9, 11, 12], [40, 41, 42, 43, 44]]  # lengths 3, 7, 5


def settings(**changes) -> SamplingSettings:
    """The training defaults with `changes`."""
    return dataclasses.replace(TrainConfig().sampling(), **changes)


GREEDY = settings(temperature=0.0, max_completion_length=8)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(build_tiny_qwen3(tmp_path_factory.mktemp("tiny-rollout"), init_std=0.3)))


def run(lm, prompts, g, sampling, eos_ids=None):
    eos_ids = lm.eos_ids if eos_ids is None else eos_ids
    return rollout(lm.model, prompts, g, sampling, eos_ids=eos_ids, pad_id=lm.pad_id)


class RecordingModel:
    """Forwards to the model and records the shape of every token batch it is given."""

    def __init__(self, model):
        self.model = model
        self.shapes: list[tuple[int, ...]] = []

    @property
    def layers(self):
        return self.model.layers

    def __call__(self, tokens, cache=None):
        self.shapes.append(tuple(tokens.shape))
        return self.model(tokens, cache=cache)


# --------------------------------------------------------------------------- shapes and masks


def test_rollout_shapes_and_left_padded_prompts(lm):
    prompts = [PROMPTS[0], PROMPTS[1]]  # 3 and 7 tokens
    b, g, max_tokens = len(prompts), 3, 6
    batch = run(lm, prompts, g, settings(temperature=1.0, max_completion_length=max_tokens))

    n, t = batch.completion_ids.shape
    assert n == b * g and t <= max_tokens
    assert batch.completion_mask.shape == (n, t)
    assert batch.sampled_logprobs.shape == (n, t)
    assert batch.completion_mask.dtype == mx.float32
    assert set(batch.completion_mask.reshape(-1).tolist()) <= {0.0, 1.0}
    assert len(batch.truncated) == n

    assert batch.prompt_tokens.shape == (n, 7)
    assert batch.prompt_padding.tolist() == [4] * g + [0] * g
    for row, padding in zip(batch.prompt_tokens.tolist(), batch.prompt_padding.tolist()):
        prompt = prompts[0] if padding else prompts[1]
        assert row == [lm.pad_id] * padding + prompt
    assert batch.tokens.shape == (n, 7 + t)


def test_mask_is_a_prefix_and_ids_after_it_are_padding(lm):
    # Make a common byte an extra EOS so that sampled rows stop at different points.
    sampling = settings(temperature=1.0, max_completion_length=12)
    mx.random.seed(3)
    eos = lm.eos_ids + list(range(0, 256, 3))
    batch = run(lm, PROMPTS, 4, sampling, eos_ids=eos)

    lengths = batch.lengths
    assert len(set(lengths)) > 1  # the test needs rows of different lengths
    for mask, ids, length, truncated in zip(
        batch.completion_mask.tolist(), batch.completion_ids.tolist(), lengths, batch.truncated
    ):
        assert length == sum(mask)
        assert mask == [1.0] * length + [0.0] * (len(mask) - length)
        assert ids[length:] == [lm.pad_id] * (len(ids) - length)
        if truncated:
            assert length == sampling.max_completion_length
            assert not set(ids[:length]) & set(eos)
        else:
            assert ids[length - 1] in eos
            assert not set(ids[: length - 1]) & set(eos)


def test_first_eos_is_kept_and_counted_and_other_rows_run_to_the_limit(lm):
    free = run(lm, PROMPTS, 1, GREEDY)
    assert all(free.truncated), "greedy rows should not hit the model's own EOS here"
    rows = free.completion_ids.tolist()
    stop = rows[0][2]  # row 0's 3rd generated token becomes an EOS
    assert rows[0].index(stop) == 2
    assert all(stop not in r for r in rows[1:])

    batch = run(lm, PROMPTS, 1, GREEDY, eos_ids=lm.eos_ids + [stop])
    assert batch.lengths[0] == 3
    assert batch.completion_lists()[0] == rows[0][:3]
    assert batch.completion_lists()[0][-1] == stop
    assert batch.truncated[0] is False
    assert batch.truncated[1:] == [True, True]
    assert batch.lengths[1:] == [GREEDY.max_completion_length] * 2
    assert batch.completion_ids.tolist()[1:] == rows[1:]


# --------------------------------------------------------------------------- greedy


def test_greedy_batched_rows_equal_each_prompt_decoded_alone(lm):
    g = 2
    batch = run(lm, PROMPTS, g, GREEDY)
    got = batch.completion_lists()
    for i, prompt in enumerate(PROMPTS):
        alone = run(lm, [prompt], 1, GREEDY).completion_lists()[0]
        assert len(alone) == GREEDY.max_completion_length
        for j in range(g):
            assert got[i * g + j] == alone, (i, j)


def test_greedy_rollout_matches_mlx_lm_generate_step(lm):
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    for prompt in (PROMPTS[0], PROMPTS[1]):
        ours = run(lm, [prompt], 1, GREEDY).completion_lists()[0]
        steps = generate_step(
            mx.array(prompt), lm.model, max_tokens=GREEDY.max_completion_length, sampler=greedy
        )
        theirs = [int(tok) for tok, _ in steps]
        assert ours == theirs


def test_top_k_1_sampling_gives_the_greedy_tokens(lm):
    greedy = run(lm, PROMPTS, 2, GREEDY)
    mx.random.seed(0)
    top1 = run(lm, PROMPTS, 2, settings(temperature=1.0, top_k=1, max_completion_length=8))
    assert top1.completion_ids.tolist() == greedy.completion_ids.tolist()


# --------------------------------------------------------------------------- sampling


def test_group_is_sampled_independently_after_a_single_prefill(lm):
    prompts = [PROMPTS[0], PROMPTS[1]]
    b, g, p = len(prompts), 4, 7
    proxy = RecordingModel(lm.model)
    mx.random.seed(0)
    batch = rollout(
        proxy, prompts, g, settings(temperature=1.0, max_completion_length=8), [], lm.pad_id
    )

    assert proxy.shapes[0] == (b, p)
    assert proxy.shapes.count((b, p)) == 1
    assert all(s == (b * g, 1) for s in proxy.shapes[1:])
    assert len(proxy.shapes) == batch.completion_ids.shape[1]  # one decode call per token

    rows = batch.completion_ids.tolist()
    for i in range(b):
        group = rows[i * g : (i + 1) * g]
        assert len({tuple(r) for r in group}) > 1, f"prompt {i}: all {g} completions identical"


def test_rows_that_end_leave_the_batch_and_the_rest_sample_what_they_would_alone(lm):
    # A third of the byte ids end a sequence, so rows stop at scattered points.
    eos = lm.eos_ids + list(range(0, 256, 3))
    g, sampling = 4, settings(temperature=1.0, max_completion_length=12)
    proxy = RecordingModel(lm.model)
    batch = rollout(proxy, PROMPTS, g, sampling, eos, lm.pad_id, Noise(seed=5))
    n, lengths = len(PROMPTS) * g, batch.lengths
    assert len(set(lengths)) > 2 and min(lengths) < 6  # the test needs scattered ends

    decoded = [rows for rows, _ in proxy.shapes[1:]]  # rows of each decode call
    assert decoded == sorted(decoded, reverse=True) and decoded[-1] < n
    # Decode call t (after token t) runs exactly the rows still going.
    assert decoded == [sum(length > t + 1 for length in lengths) for t in range(len(decoded))]

    for i in range(n):  # each row alone, with its place's noise: nothing ever leaves
        alone = rollout(lm.model, [PROMPTS[i // g]], 1, sampling, eos, lm.pad_id, Noise(5, i, n))
        assert alone.completion_lists()[0] == batch.completion_lists()[i]
        assert alone.truncated[0] == batch.truncated[i]
        length = lengths[i]
        np.testing.assert_allclose(
            np.array(alone.sampled_logprobs)[0, :length],
            np.array(batch.sampled_logprobs)[i, :length],
            atol=1e-5,
        )
        assert np.array(batch.sampled_logprobs)[i, length:].tolist() == [0.0] * (
            batch.completion_ids.shape[1] - length
        )


def test_sampled_logprobs_equal_a_full_forward_pass_at_temperature(lm):
    temperature = 0.7
    mx.random.seed(1)
    batch = run(lm, PROMPTS, 2, settings(temperature=temperature, max_completion_length=8))
    completions = batch.completion_lists()
    logprobs = batch.sampled_logprobs.tolist()
    checked = 0
    for row, completion in enumerate(completions):
        prompt = PROMPTS[row // 2]
        # Each sequence alone, unpadded: independent of the rollout's cache and masks.
        logits = lm.model(mx.array([prompt + completion]))[0].astype(mx.float32)
        scaled = logits / temperature
        ref = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
        positions = mx.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
        expected = ref[positions, mx.array(completion)].tolist()
        got = logprobs[row][: len(completion)]
        assert max(abs(a - e) for a, e in zip(got, expected)) <= 1e-4, row
        assert all(x == 0.0 for x in logprobs[row][len(completion) :])
        checked += len(completion)
    assert checked > 0


# --------------------------------------------------------------------------- the sampler

LOGITS = [2.0, 1.0, 0.5, -1.0, 0.0, 1.5]


def frequencies(sampling: SamplingSettings, draws: int = 20000) -> tuple[list[float], list]:
    mx.random.seed(3)
    logits = mx.broadcast_to(mx.array(LOGITS), (draws, len(LOGITS)))
    tokens, logp = make_draw(sampling)(logits)
    counts = np.bincount(np.array(tokens), minlength=len(LOGITS))
    return list(counts / draws), [np.array(tokens), np.array(logp)]


def softmax(x, t=1.0):
    e = np.exp(np.array(x) / t - max(x) / t)
    return e / e.sum()


def test_sampling_follows_the_tempered_distribution_and_reports_its_log_probs():
    freq, (tokens, logp) = frequencies(settings(temperature=0.7))
    p = softmax(LOGITS, 0.7)
    # 20,000 draws: a frequency's standard error is at most 0.0035.
    np.testing.assert_allclose(freq, p, atol=0.015)
    np.testing.assert_allclose(logp, np.log(p)[tokens], atol=1e-5)


@pytest.mark.parametrize(
    "sampling, kept",
    [
        (settings(top_k=2), [0, 5]),
        (settings(top_p=0.6), [0, 5]),  # p = .42, .25, .15, ...: the top two pass 0.6
        (settings(min_p=0.3), [0, 1, 5]),  # p >= 0.3 * p_max
    ],
)
def test_filters_keep_only_their_tokens_renormalised_and_log_probs_stay_unfiltered(sampling, kept):
    freq, (tokens, logp) = frequencies(sampling)
    p = softmax(LOGITS)
    expected = np.zeros(len(LOGITS))
    expected[kept] = p[kept] / p[kept].sum()
    np.testing.assert_allclose(freq, expected, atol=0.015)
    np.testing.assert_allclose(logp, np.log(p)[tokens], atol=1e-5)


def test_inverse_cdf_never_draws_a_zero_weight_entry():
    mx.random.seed(0)
    cdf = mx.cumsum(mx.broadcast_to(mx.array([0.0, 1.0, 0.0, 0.0, 2.0, 0.0]), (5000, 6)), axis=-1)
    assert set(np.array(inverse_cdf(cdf)).tolist()) == {1, 4}


def test_split_matmul_equals_one_matmul_and_small_decodes_use_it(lm):
    from mlx_grpo.core.lora import split_matmul
    from mlx_grpo.core.rollout import decode_streams

    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 16)), rng.normal(size=(10, 16))
    streams = [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    got = split_matmul(mx.array(x, dtype=mx.float32), mx.array(w, dtype=mx.float32), streams)
    np.testing.assert_allclose(np.array(got), x @ w.T, rtol=1e-5, atol=1e-5)
    if mx.default_device() == mx.cpu and (os.cpu_count() or 1) > 1:
        assert decode_streams(4) is not None and decode_streams(64) is None


def test_greedy_decoding_is_the_same_with_and_without_split_matmuls(lm, monkeypatch):
    import mlx_grpo.core.rollout as rollout_mod

    split = run(lm, PROMPTS, 2, GREEDY)
    monkeypatch.setattr(rollout_mod, "decode_streams", lambda rows: None)
    plain = run(lm, PROMPTS, 2, GREEDY)
    assert split.completion_ids.tolist() == plain.completion_ids.tolist()
    np.testing.assert_allclose(
        np.array(split.sampled_logprobs), np.array(plain.sampled_logprobs), atol=1e-5
    )


def test_a_split_batch_samples_what_the_whole_batch_samples(lm):
    # What a data-parallel run relies on: each process rolls out its share of the
    # step's prompts and must draw the completions one process would draw.
    g, sampling = 3, settings(temperature=1.0, max_completion_length=8)
    whole = rollout(lm.model, PROMPTS, g, sampling, lm.eos_ids, lm.pad_id, Noise(seed=11))
    total = len(PROMPTS) * g
    for b, prompt in enumerate(PROMPTS):
        part = rollout(
            lm.model, [prompt], g, sampling, lm.eos_ids, lm.pad_id, Noise(11, b * g, total)
        )
        rows = slice(b * g, (b + 1) * g)
        assert part.completion_lists() == whole.completion_lists()[rows]
        t = part.completion_ids.shape[1]  # the whole batch may decode longer
        np.testing.assert_allclose(
            np.array(part.sampled_logprobs * part.completion_mask),
            np.array(whole.sampled_logprobs * whole.completion_mask)[rows, :t],
            atol=1e-5,
        )
    other = rollout(lm.model, PROMPTS, g, sampling, lm.eos_ids, lm.pad_id, Noise(seed=12))
    assert other.completion_lists() != whole.completion_lists()  # another seed, other samples
