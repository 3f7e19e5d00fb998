"""The compiled loss: the same loss, metric sums and gradient as the plain function for every
chunk shape and loss setting, fresh dropout masks on every call, a bounded trace cache, and
nothing of a finished run kept alive by its traces."""

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import dataclasses
import gc
import weakref

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_grpo.core import update as update_mod
from mlx_grpo.core.batches import micro_batches
from mlx_grpo.core.caches import recompute_activations
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.lora import apply_lora
from mlx_grpo.core.models import load_model
from mlx_grpo.core.objective import Normalizer
from mlx_grpo.core.rollout import Noise, rollout
from mlx_grpo.core.update import LossAndGrad, micro_loss
from mlx_grpo.tasks.toy import build_tiny_qwen3

PROMPTS = [[10, 20, 30], [5, 6, 7, 8, 9, 11, 12], [40, 41, 42, 43, 44]]
G = 4


def adapted(path, dropout=0.0):
    lm = load_model(str(path))
    apply_lora(lm.model, 4, 2.0, dropout, ["q_proj", "v_proj", "down_proj"], range(2))
    recompute_activations(lm.model)
    lm.model.update(  # nonzero B factors: gradients reach every factor
        tree_map(lambda b: mx.random.normal(b.shape) * 0.1, lm.model.trainable_parameters())
    )
    return lm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_qwen3(tmp_path_factory.mktemp("compiled"), init_std=0.3)


def chunks(lm, cfg, seed=3):
    """Micro-batch chunks of several shapes: lengths vary, rows sorted into buckets."""
    eos = lm.eos_ids + list(range(0, 256, 11))
    sampling = dataclasses.replace(cfg.sampling(), temperature=1.0)
    batch = rollout(lm.model, PROMPTS, G, sampling, eos, lm.pad_id, Noise(seed))
    adv = mx.array(np.random.default_rng(seed).normal(size=len(PROMPTS) * G).astype(np.float32))
    width = batch.prompt_tokens.shape[1]
    return micro_batches(lm.model, batch, adv, cfg, 3 * (width + cfg.max_completion_length))


def plain(model, mb, cfg, normalizer):
    fn = nn.value_and_grad(model, lambda m: micro_loss(m, mb, cfg, cfg.loss_settings(), normalizer))
    return fn(model)


def shape(mb):
    """What sets a chunk's trace: its rows, prompt width, completion length, prompt count."""
    return mb.prompt_tokens.shape, mb.completion_ids.shape, mb.groups[1].shape


def flat(result):
    (loss, stats), grads = result
    return {"loss": loss, **{f"stat:{k}": v for k, v in stats.items()}, **dict(tree_flatten(grads))}


@pytest.mark.parametrize(
    "settings",
    [
        dict(loss_type="grpo", beta=0.04, num_iterations=2),
        dict(loss_type="dapo", beta=0.0, epsilon_high=0.28),
        dict(loss_type="bnpo", beta=0.1, kl_estimator="exact", gradient_accumulation_steps=2),
        dict(loss_type="dr_grpo", beta=0.0, importance_sampling_level="sequence"),
        dict(loss_type="cispo", epsilon_high=5.0, entropy_coef=0.05, top_entropy_quantile=0.5),
        dict(loss_type="vespo", beta=0.04, use_adaptive_entropy=True, entropy_coef=0.02),
        dict(loss_type="sapo", entropy_coef=-0.01, mask_truncated_completions=True),
    ],
)
def test_compiled_loss_and_gradient_equal_the_plain_function(model_dir, settings):
    lm = adapted(model_dir)
    cfg = TrainConfig(
        num_generations=G, prompts_per_step=len(PROMPTS), max_completion_length=10, **settings
    )
    micro = chunks(lm, cfg)
    assert len({shape(mb) for mb in micro}) >= 2  # several traces
    lm.model.update(tree_map(lambda p: p * 1.01, lm.model.trainable_parameters()))  # off-policy
    lm.model.train()
    compiled = LossAndGrad(lm.model, cfg)
    for tokens in (37.0, 41.0):  # a new count, no new trace: the value is an input
        normalizer = Normalizer(
            cfg.gradient_accumulation_steps, tokens, entropy_coef=cfg.entropy_coef
        )
        for mb in micro:
            want = flat(plain(lm.model, mb, cfg, normalizer))
            got = flat(compiled(mb, normalizer))
            assert got.keys() == want.keys()
            for k, v in want.items():
                np.testing.assert_allclose(np.array(got[k]), np.array(v), rtol=1e-5, atol=1e-7)
    assert len(compiled.shapes) == len({shape(mb) for mb in micro})
    # the model keeps its own arrays, not the trace's placeholders
    mx.eval(lm.model.parameters())
    # control: other advantages give another loss through the same trace
    mb = micro[0]
    other = dataclasses.replace(mb, advantages=mb.advantages + 1.0)
    assert flat(compiled(other, normalizer))["loss"].item() != pytest.approx(
        flat(compiled(mb, normalizer))["loss"].item(), abs=1e-6
    )


def test_lora_dropout_draws_fresh_masks_on_every_compiled_call(model_dir):
    lm = adapted(model_dir, dropout=0.5)
    cfg = TrainConfig(num_generations=G, prompts_per_step=len(PROMPTS), max_completion_length=10)
    mb = chunks(lm, cfg)[0]
    lm.model.train()
    normalizer = Normalizer(1, 30.0)
    compiled = LossAndGrad(lm.model, cfg)

    # on-policy the loss's value is the same whatever the mask: compare gradients
    def first_grad(result):
        return np.array(tree_flatten(result[1])[0][1])

    mx.random.seed(7)
    plain_grads = [first_grad(plain(lm.model, mb, cfg, normalizer)) for _ in range(3)]
    mx.random.seed(7)
    compiled_grads = [first_grad(compiled(mb, normalizer)) for _ in range(3)]
    for got, want in zip(compiled_grads, plain_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # not one mask baked into the trace
    assert not np.allclose(compiled_grads[0], compiled_grads[1], rtol=1e-3)
    assert not np.allclose(compiled_grads[1], compiled_grads[2], rtol=1e-3)


def test_the_trace_cache_is_bounded(model_dir, monkeypatch):
    monkeypatch.setattr(update_mod, "MAX_TRACES", 2)
    lm = adapted(model_dir)
    cfg = TrainConfig(num_generations=G, prompts_per_step=len(PROMPTS), max_completion_length=10)
    micro = chunks(lm, cfg)
    assert len({shape(mb) for mb in micro}) >= 3
    lm.model.train()
    compiled, normalizer = LossAndGrad(lm.model, cfg), Normalizer(1, 30.0)
    fns = []
    for mb in micro:
        got = flat(compiled(mb, normalizer))
        fns.append(compiled.fn)
        assert len(compiled.shapes) <= 2
        want = flat(plain(lm.model, mb, cfg, normalizer))
        np.testing.assert_allclose(np.array(got["loss"]), np.array(want["loss"]), rtol=1e-5)
    assert len({id(f) for f in fns}) >= 2  # rebuilt once the cache was full


def test_a_finished_run_leaves_nothing_behind_in_its_traces(model_dir):
    mx.eval(mx.zeros(1))
    gc.collect()
    before = mx.get_active_memory()

    def one_run():
        lm = adapted(model_dir)
        cfg = TrainConfig(
            num_generations=G, prompts_per_step=len(PROMPTS), max_completion_length=10
        )
        micro = chunks(lm, cfg)
        lm.model.train()
        compiled = LossAndGrad(lm.model, cfg)
        for mb in micro:
            mx.eval(compiled(mb, Normalizer(1, 30.0)))
        return weakref.ref(lm.model.layers[0])

    layer = one_run()
    gc.collect()
    assert layer() is None
    assert mx.get_active_memory() - before < 64 * 1024  # the weights (about 1 MB) are gone
