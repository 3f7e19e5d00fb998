"""Packed completions: several completions of one prompt in one row, each token at the RoPE
position it has alone and seeing only its prompt and its own completion, give the hidden
states, loss and gradient of the padded rows, with fewer tokens."""

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_grpo.core import batches as batches_mod
from mlx_grpo.core.batches import micro_batches
from mlx_grpo.core.caches import (
    allow_token_positions,
    recompute_activations,
    takes_token_positions,
)
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.logprobs import completion_hidden, pack, prompt_groups
from mlx_grpo.core.lora import apply_lora
from mlx_grpo.core.models import left_pad, load_model
from mlx_grpo.core.objective import Normalizer
from mlx_grpo.core.rollout import Noise, rollout
from mlx_grpo.core.update import micro_loss
from mlx_grpo.tasks.toy import build_tiny_qwen3

PROMPTS = [[10, 20, 30], [5, 6, 7, 8, 9, 11, 12], [40, 41, 42, 43, 44]]
G = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_qwen3(tmp_path_factory.mktemp("packing"), init_std=0.3)


def rows_of(lengths, seed=0):
    """Left-padded prompts (G rows each), completions of `lengths` and their groups."""
    tokens, padding = left_pad([p for p in PROMPTS for _ in range(G)], 0)
    t = int(max(lengths))
    ids = np.random.default_rng(seed).integers(1, 250, (len(lengths), t)).astype(np.int32)
    return tokens, padding, ids, prompt_groups(tokens, padding)


def packing_of(tokens, padding, ids, lengths, groups):
    owner, first = (np.array(a) for a in groups)
    return pack(ids, np.array(lengths), owner, np.array(padding)[first], tokens.shape[1])


def test_pack_places_every_fed_token_once_in_rows_of_its_own_prompt():
    lengths = [9, 2, 5, 1, 6, 9, 3, 2, 7, 4, 4, 1]
    tokens, padding, ids, groups = rows_of(lengths)
    p = packing_of(tokens, padding, ids, lengths, groups)
    owner = np.array(groups[0])
    packed, index = np.array(p["tokens"]), np.array(p["index"])
    r, cap = packed.shape
    assert cap == 8 and r * cap < len(lengths) * 8  # fewer tokens than the padded pass
    u = len(PROMPTS)
    for i, n in enumerate(lengths):
        assert (index[i, 0] == owner[i]) and (index[i, n:] == owner[i]).all()
        spots = index[i, 1:n] - u  # where row i's fed tokens sit
        assert (packed.reshape(-1)[spots] == ids[i, : n - 1]).all()
        assert (np.array(p["rows"])[spots // cap] == owner[i]).all()
    fed = np.concatenate([index[i, 1:n] for i, n in enumerate(lengths)])
    assert len(set(fed.tolist())) == sum(n - 1 for n in lengths)  # no spot used twice
    # equal lengths save nothing: no packing
    assert packing_of(tokens, padding, ids, [9] * len(lengths), groups) is None


def test_packed_rows_give_the_hidden_states_of_padded_rows(model_dir):
    lm = load_model(str(model_dir))
    assert allow_token_positions(lm.model) and takes_token_positions(lm.model)
    lengths = [9, 2, 5, 1, 6, 9, 3, 2, 7, 4, 4, 1]
    tokens, padding, ids, groups = rows_of(lengths)
    p = packing_of(tokens, padding, ids, lengths, groups)
    padded = np.array(completion_hidden(lm.model, tokens, padding, mx.array(ids), groups))
    packed = np.array(completion_hidden(lm.model, tokens, padding, mx.array(ids), groups, p))
    real = np.arange(ids.shape[1])[None] < np.array(lengths)[:, None]
    np.testing.assert_allclose(packed[real], padded[real], atol=1e-5)
    # control: one position off and the states differ
    shifted = {**p, "positions": p["positions"] + 1}
    moved = np.array(completion_hidden(lm.model, tokens, padding, mx.array(ids), groups, shifted))
    assert np.abs(moved[real] - padded[real]).max() > 1e-3


def adapted(model_dir):
    lm = load_model(str(model_dir))
    apply_lora(lm.model, 4, 2.0, 0.0, ["q_proj", "v_proj", "down_proj"], range(2))
    recompute_activations(lm.model)
    allow_token_positions(lm.model)
    lm.model.update(  # nonzero B factors: gradients reach every factor
        tree_map(lambda b: mx.random.normal(b.shape) * 0.1, lm.model.trainable_parameters())
    )
    return lm


@pytest.mark.parametrize(
    "settings",
    [
        dict(loss_type="grpo", beta=0.04, num_iterations=2),
        dict(loss_type="bnpo", beta=0.1, kl_estimator="exact"),
        dict(loss_type="dr_grpo", beta=0.0, gradient_accumulation_steps=2),
    ],
)
def test_the_packed_update_gives_the_padded_updates_loss_and_gradient(
    model_dir, monkeypatch, settings
):
    lm = adapted(model_dir)
    cfg = TrainConfig(
        num_generations=G, prompts_per_step=len(PROMPTS), max_completion_length=12, **settings
    )
    eos = lm.eos_ids + list(range(0, 256, 7))  # lengths vary
    sampling = dataclasses.replace(cfg.sampling(), temperature=1.0)
    batch = rollout(lm.model, PROMPTS, G, sampling, eos, lm.pad_id, Noise(5))
    assert len(set(batch.lengths)) > 3
    adv = mx.array(np.random.default_rng(1).normal(size=len(PROMPTS) * G).astype(np.float32))
    packed = micro_batches(lm.model, batch, adv, cfg, buckets=False)
    monkeypatch.setattr(batches_mod, "takes_token_positions", lambda model: False)
    padded = micro_batches(lm.model, batch, adv, cfg, buckets=False)
    assert all(mb.packing is not None for mb in packed)
    assert all(mb.packing is None for mb in padded)
    lm.model.update(tree_map(lambda p: p * 1.01, lm.model.trainable_parameters()))  # off-policy
    lm.model.train()
    normalizer = Normalizer(cfg.gradient_accumulation_steps, float(sum(batch.lengths)))

    def loss_and_grads(mb):
        fn = nn.value_and_grad(
            lm.model, lambda m: micro_loss(m, mb, cfg, cfg.loss_settings(), normalizer)
        )
        (loss, stats), grads = fn(lm.model)
        return loss.item(), stats, dict(tree_flatten(grads))

    for a, b in zip(packed, padded):
        if cfg.kl_estimator == "k3" and cfg.beta:  # reference log-probs, scored packed
            real = np.array(b.mask) > 0
            np.testing.assert_allclose(np.array(a.ref)[real], np.array(b.ref)[real], atol=1e-5)
        fed = a.packing["tokens"].size
        assert fed < b.completion_ids.shape[0] * (b.completion_ids.shape[1] - 1)
        loss_a, stats_a, grads_a = loss_and_grads(a)
        loss_b, stats_b, grads_b = loss_and_grads(b)
        assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-6) and abs(loss_b) > 1e-4
        for k in stats_b:
            np.testing.assert_allclose(np.array(stats_a[k]), np.array(stats_b[k]), rtol=1e-4)
        for k, g in grads_b.items():
            np.testing.assert_allclose(np.array(grads_a[k]), np.array(g), rtol=1e-4, atol=1e-6)
