"""Loss options that act outside the per-token math: which tokens the update counts, and
the entropy mask and bonus over a micro-batch cut into chunks."""

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_grpo.core.batches import micro_batches
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.lora import apply_lora
from mlx_grpo.core.models import load_model
from mlx_grpo.core.objective import Normalizer
from mlx_grpo.core.rollout import Noise, rollout
from mlx_grpo.core.update import entropy_thresholds, micro_loss
from mlx_grpo.tasks.toy import build_tiny_qwen3

PROMPTS = [[10, 20, 30], [5, 6, 7, 8, 9]]
G = 4


@pytest.fixture(scope="module")
def rolled(tmp_path_factory):
    """A tiny adapted model and a rollout where some completions end early, some are cut."""
    lm = load_model(str(build_tiny_qwen3(tmp_path_factory.mktemp("options"), init_std=0.3)))
    apply_lora(lm.model, 4, 2.0, 0.0, ["q_proj", "v_proj"], range(2))
    cfg = TrainConfig(num_generations=G, prompts_per_step=len(PROMPTS), max_completion_length=10)
    eos = list(range(0, 256, 9))
    sampling = dataclasses.replace(cfg.sampling(), temperature=1.0)
    batch = rollout(lm.model, PROMPTS, G, sampling, eos, lm.pad_id, Noise(3))
    assert 0 < sum(batch.truncated) < len(batch.truncated)  # guards the cases below
    adv = mx.array(np.linspace(-1.5, 1.5, len(PROMPTS) * G).astype(np.float32))
    return lm, batch, adv


def rows_of(micro, adv) -> np.ndarray:
    """The rollout row of each micro-batch row (the advantages are distinct)."""
    values = np.concatenate([np.array(mb.advantages) for mb in micro])
    return np.array([int(np.argmin(np.abs(np.array(adv) - v))) for v in values])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_masked_truncated_completions_leave_the_loss_and_the_token_count(rolled, accumulation):
    lm, batch, adv = rolled
    base = dict(num_generations=G, prompts_per_step=len(PROMPTS), max_completion_length=10)
    cfg = TrainConfig(**base, gradient_accumulation_steps=accumulation)
    masked_cfg = dataclasses.replace(cfg, mask_truncated_completions=True)
    plain = micro_batches(lm.model, batch, adv, cfg)
    masked = micro_batches(lm.model, batch, adv, masked_cfg)
    truncated, lengths = np.array(batch.truncated), np.array(batch.lengths)
    counted = np.where(truncated, 0, lengths)

    # Every row, its advantage kept (the cut rows' rewards have counted); nothing of a cut
    # row is fed or counted.
    rows = rows_of(masked, adv)
    assert sorted(rows) == list(range(len(lengths)))
    mask_rows = np.concatenate([np.array(mb.mask).sum(1) for mb in masked])
    np.testing.assert_array_equal(mask_rows, counted[rows])
    fed = sum(mb.completion_ids.shape[0] * mb.completion_ids.shape[1] for mb in masked)
    assert fed < sum(mb.completion_ids.shape[0] * mb.completion_ids.shape[1] for mb in plain)
    size = len(lengths) // accumulation
    for mb in masked:  # each micro-batch's token count leaves its cut rows out
        block = rows_of([mb], adv)[0] // size * size
        assert mb.group_tokens == float(counted[block : block + size].sum())
        assert mb.group_rows == size

    # On policy with beta = 0, dapo's loss is -sum_i A_i L_i / (tokens counted): NumPy by hand.
    lm.model.train()
    a = np.array(adv)
    for config, micro, lens in [(cfg, plain, lengths), (masked_cfg, masked, counted)]:
        normalizer = Normalizer(accumulation, float(lens.sum()))
        settings = config.loss_settings()
        loss = sum(float(micro_loss(lm.model, mb, config, settings, normalizer)[0]) for mb in micro)
        assert loss == pytest.approx(-(a * lens).sum() / lens.sum(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("quantile,coef", [(0.4, 0.0), (0.4, 0.1), (1.0, 0.1)])
def test_entropy_mask_and_bonus_do_not_depend_on_how_a_micro_batch_is_cut(rolled, quantile, coef):
    """A micro-batch cut into chunks (a tight memory plan) takes the entropy threshold and
    the bonus's token count of the whole micro-batch: loss and gradient equal one chunk's."""
    lm, batch, adv = rolled
    cfg = TrainConfig(
        num_generations=G,
        prompts_per_step=len(PROMPTS),
        max_completion_length=10,
        top_entropy_quantile=quantile,
        entropy_coef=coef,
    )
    whole = micro_batches(lm.model, batch, adv, cfg)
    width = batch.prompt_tokens.shape[1]
    cut = micro_batches(lm.model, batch, adv, cfg, max_tokens=3 * (width + 10))
    assert len(whole) == 1 and len(cut) >= 3
    lm.model.train()
    normalizer = Normalizer(1, float(np.sum(batch.lengths)), entropy_coef=coef)
    settings = cfg.loss_settings()

    def loss_and_grads(micro):
        entropy_thresholds(lm.model, micro, cfg)
        total, grads = 0.0, {}
        for mb in micro:
            fn = nn.value_and_grad(
                lm.model, lambda m, mb=mb: micro_loss(m, mb, cfg, settings, normalizer)
            )
            (loss, stats), g = fn(lm.model)
            total += loss.item()
            for k, v in tree_flatten(g):
                grads[k] = grads.get(k, 0.0) + np.array(v)
        return total, grads, stats

    loss_whole, grads_whole, stats = loss_and_grads(whole)
    loss_cut, grads_cut, _ = loss_and_grads(cut)
    assert loss_cut == pytest.approx(loss_whole, rel=1e-5, abs=1e-7)
    for k, g in grads_whole.items():
        np.testing.assert_allclose(grads_cut[k], g, rtol=1e-4, atol=1e-6)
    if quantile < 1.0:  # guards the case: the mask keeps some tokens and drops others
        assert 0 < float(stats["tokens_kept"]) < float(stats["tokens"])
    # The control: chunks that each took their own threshold would not add up the same.
    if quantile < 1.0:
        for mb in cut:
            mb.entropy_threshold = mb.entropy_tokens = None
        own = sum(micro_loss(lm.model, mb, cfg, settings, normalizer)[0].item() for mb in cut)
        assert own != pytest.approx(loss_whole, rel=1e-4)
