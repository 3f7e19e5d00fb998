"""The memory plan: decode chunks sample what one batch samples, update chunks give the
whole micro-batches' loss and gradient, the estimate bounds the measured peak, a small
budget picks a smaller plan and trains, and a budget no plan fits is refused before
anything is written."""

import json

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import assert_refused, cli_flags, run_cli
from mlx.utils import tree_flatten, tree_map

from mlx_grpo.core import memory
from mlx_grpo.core.batches import micro_batches
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.models import load_model
from mlx_grpo.core.objective import Normalizer
from mlx_grpo.core.rollout import Noise, decode_chunks, rollout
from mlx_grpo.core.settings import resolve
from mlx_grpo.core.setup import memory_shapes, memory_work, setup
from mlx_grpo.core.trainer import train, train_step
from mlx_grpo.core.update import micro_loss
from mlx_grpo.tasks.toy import QWEN3_0_6B, build_tiny_qwen3

PROMPTS = [[10, 20, 30], [5, 6, 7, 8, 9, 11, 12], [40, 41, 42, 43, 44]]
G = 4


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(build_tiny_qwen3(tmp_path_factory.mktemp("tiny-memory"), init_std=0.3)))


def sampled(lm, max_rows, seed=3, length=10):
    # Every 11th byte id ends a sequence: lengths vary, some rows run to the limit.
    eos = lm.eos_ids + list(range(0, 256, 11))
    sampling = dataclasses.replace(
        TrainConfig().sampling(), temperature=1.0, max_completion_length=length
    )
    return rollout(lm.model, PROMPTS, G, sampling, eos, lm.pad_id, Noise(seed), max_rows)


def test_decode_chunks_cover_every_row_once_in_order():
    for max_rows in range(1, 14):
        chunks = decode_chunks(3, G, max_rows)
        rows = [r for first, count, row, copies in chunks for r in range(row, row + count * copies)]
        assert rows == list(range(12))
        assert all(count * copies <= max(max_rows, 1) for _, count, _, copies in chunks)
        # rows of a chunk come from its own prompts
        assert all(row == first * G + (row % G) for first, _, row, _ in chunks)
    assert decode_chunks(3, G, 12) == [(0, 3, 0, 4)]
    assert decode_chunks(3, G, 9) == [(0, 2, 0, 4), (2, 1, 8, 4)]
    assert decode_chunks(3, G, 3) == [(b, 1, b * G + j, 2) for b in range(3) for j in (0, 2)]


@pytest.mark.parametrize("max_rows", [8, 4, 2, 1])
def test_rollout_in_decode_chunks_samples_what_one_batch_samples(lm, max_rows):
    whole, part = sampled(lm, None), sampled(lm, max_rows)
    lengths = whole.lengths
    assert len(set(lengths)) > 2 and max(lengths) == 10  # scattered ends, some truncated
    assert part.completion_lists() == whole.completion_lists()
    assert part.truncated == whole.truncated
    assert part.completion_ids.shape == whole.completion_ids.shape
    np.testing.assert_allclose(
        np.array(part.sampled_logprobs), np.array(whole.sampled_logprobs), atol=1e-5
    )
    np.testing.assert_array_equal(np.array(part.prompt_tokens), np.array(whole.prompt_tokens))
    other = sampled(lm, max_rows, seed=4)
    assert other.completion_lists() != whole.completion_lists()  # another seed, other draws


def summed_loss_and_grads(model, micro, cfg):
    """What `optimise` accumulates over its micro-batches in one pass."""
    normalizer = Normalizer(
        accumulation_steps=cfg.gradient_accumulation_steps,
        tokens_in_batch=sum(mb.mask.sum().item() for mb in micro),
    )
    settings = cfg.loss_settings()
    fn = nn.value_and_grad(model, lambda m, mb: micro_loss(m, mb, cfg, settings, normalizer))
    total, grads = 0.0, None
    for mb in micro:
        (loss, _), g = fn(model, mb)
        total += loss.item()
        grads = g if grads is None else tree_map(mx.add, grads, g)
    return total, dict(tree_flatten(grads))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_update_in_token_chunks_gives_the_loss_and_gradient_of_whole_micro_batches(
    tmp_path, loss_type, accumulation
):
    from mlx_grpo.core.lora import apply_lora

    lm = load_model(str(build_tiny_qwen3(tmp_path / "m", init_std=0.3)))
    apply_lora(lm.model, 4, 2.0, 0.0, ["q_proj", "v_proj", "down_proj"], range(2))
    lm.model.update(  # nonzero B factors: gradients reach every factor
        tree_map(lambda b: mx.random.normal(b.shape) * 0.1, lm.model.trainable_parameters())
    )
    batch = sampled(lm, None)
    adv = mx.array(np.random.default_rng(0).normal(size=len(PROMPTS) * G).astype(np.float32))
    cfg = TrainConfig(
        loss_type=loss_type,
        beta=0.04,
        num_iterations=2,  # pi_old from the rollout: the ratios are not all 1
        num_generations=G,
        prompts_per_step=len(PROMPTS),
        max_completion_length=10,
        gradient_accumulation_steps=accumulation,
    )
    whole = micro_batches(lm.model, batch, adv, cfg)
    width = batch.prompt_tokens.shape[1]
    budget = 3 * (width + 10)
    chunked = micro_batches(lm.model, batch, adv, cfg, budget)
    assert len(whole) == accumulation and len(chunked) >= 4
    for mb in chunked:
        assert mb.completion_ids.shape[0] * (width + mb.completion_ids.shape[1]) <= budget
    lm.model.update(tree_map(lambda p: p * 1.01, lm.model.trainable_parameters()))  # off-policy
    loss_whole, grads_whole = summed_loss_and_grads(lm.model, whole, cfg)
    loss_chunked, grads_chunked = summed_loss_and_grads(lm.model, chunked, cfg)
    assert loss_chunked == pytest.approx(loss_whole, rel=1e-5, abs=2e-6)  # terms are O(1)
    assert abs(loss_whole) > 1e-4
    for name, g in grads_whole.items():
        np.testing.assert_allclose(np.array(grads_chunked[name]), np.array(g), rtol=1e-4, atol=1e-6)
    assert any(np.abs(np.array(g)).max() > 1e-5 for g in grads_whole.values())


# --------------------------------------------------------------------------- the plan


def qwen3_shapes(chunk=256):
    weights = 4 * (
        QWEN3_0_6B["vocab_size"] * QWEN3_0_6B["hidden_size"]
        + 28 * (1024 * 2048 * 2 + 2 * 1024 * 1024 + 3 * 1024 * 3072)
    )
    return memory.Shapes.of(QWEN3_0_6B, weights, 4 * 10_092_544, 4, chunk, True)


def test_the_plan_shrinks_with_the_budget_and_refuses_only_when_nothing_fits():
    shapes = qwen3_shapes()
    work = memory.Work(4, 16, 96, 256, 4, True)
    roomy = memory.make_plan(shapes, work, 64 * 10**9)
    assert roomy.decode_rows == 64 and roomy.update_tokens == 16 * (96 + 256)
    assert roomy.peak <= 64 * 10**9
    # the KV cache of 64 sequences x 352 positions is 5.2 GB in float32
    assert 5.2e9 < roomy.rollout - 2.4e9 < 6e9
    tight = memory.make_plan(shapes, work, int(roomy.peak * 0.6))
    assert tight.decode_rows < 64 and tight.update_tokens < roomy.update_tokens
    assert tight.peak <= tight.budget
    assert "decode" in tight.describe() and f"{tight.decode_rows} of 64" in tight.describe()
    # one step smaller would not have been needed: the next larger choice does not fit
    need = memory.smallest_peak(shapes, work)
    assert memory.make_plan(shapes, work, need).decode_rows >= 1
    with pytest.raises(ValueError) as err:
        memory.make_plan(shapes, work, need - 1)
    message = str(err.value)
    assert "Raise --max-memory to at least" in message and "--max-completion-length" in message
    with pytest.raises(ValueError, match="smaller model"):
        memory.make_plan(shapes, work, 10**9)  # below the weights alone


@pytest.mark.parametrize(
    ("text", "size"),
    [("12GB", 12 * 10**9), ("900MB", 9 * 10**8), ("8GiB", 8 * 2**30), ("1.5 tb", 1.5e12)],
)
def test_sizes_parse(text, size):
    assert memory.parse_size(text) == size


@pytest.mark.parametrize("text", ["12", "GB", "-1GB", "12 apples", ""])
def test_a_size_without_a_unit_is_refused(text):
    with pytest.raises(ValueError, match="e.g. 12GB"):
        memory.parse_size(text)


MID = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    vocab_size=8192,
)


def even_share(prompts, completions, completion_ids, **kwargs):
    return [sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]


@pytest.fixture(scope="module")
def mid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mid")
    model = build_tiny_qwen3(root / "model", **MID)
    data = root / "data.jsonl"
    text = "count the vowels in this sentence and reply with the number "
    data.write_text(
        "".join(json.dumps({"prompt": f"{k}: {text * 2}"[:77]}) + "\n" for k in range(8))
    )
    return model, data


@pytest.mark.parametrize(
    ("prompts", "generations", "length", "accumulation", "budget"),
    [(1, 4, 32, 1, None), (2, 8, 64, 2, None), (4, 8, 64, 1, None), (4, 8, 64, 1, "0.1GB")],
)
def test_the_estimate_is_never_below_the_measured_peak(
    mid_run, tmp_path, prompts, generations, length, accumulation, budget
):
    model, data = mid_run
    cfg = resolve(
        None,
        model=str(model),
        data=str(data),
        output_dir=str(tmp_path / "run"),
        num_generations=generations,
        prompts_per_step=prompts,
        max_completion_length=length,
        gradient_accumulation_steps=accumulation,
        lora_rank=8,
        beta=0.1,
        rewards=[],
        max_memory=budget,
        save_steps=0,
    )
    run = setup(cfg, [even_share])
    run.lm.eos_ids = []  # every completion runs to the limit: the estimate's worst case
    try:
        for step in range(2):  # the second step has AdamW's moments too
            metrics, _ = train_step(run, step)
    finally:
        run.release()
    plan = run.plan
    for phase in ("rollout", "reference", "update"):
        measured, estimated = metrics[f"memory/{phase}_gb"] * 1e9, getattr(plan, phase)
        assert measured <= estimated <= 1.35 * measured, (phase, measured, estimated)
    if budget:
        assert plan.peak <= memory.parse_size(budget) and plan.update_tokens < 32 * (96 + 64)


def test_a_small_budget_picks_a_smaller_plan_trains_and_ends_with_the_same_adapter(
    quick_settings, tmp_path, capsys
):
    from mlx_grpo.core import data as data_mod
    from mlx_grpo.core.adapters import Adapter
    from mlx_grpo.core.setup import _load_model

    settings = dict(quick_settings, beta=0.04, max_completion_length=12, show_progress="lines")
    cfg = resolve(None, **{k: v for k, v in settings.items() if k != "show_progress"})
    lm, _ = _load_model(cfg)
    rows = data_mod.load_prompts(cfg.data, lm.tokenizer, "prompt", None, None, None)
    shapes, work = memory_shapes(cfg, lm), memory_work(cfg, rows)
    roomy = memory.make_plan(shapes, work, 10**12)
    # a budget between the smallest plan and the full one
    budget = (memory.smallest_peak(shapes, work) + roomy.peak) // 2
    small = memory.make_plan(shapes, work, budget)
    assert small.decode_rows < roomy.decode_rows or small.update_tokens < roomy.update_tokens

    whole = train(**dict(settings, output_dir=str(tmp_path / "whole")))
    planned = train(**dict(settings, output_dir=str(tmp_path / "small"), max_memory=f"{budget}B"))
    shown = capsys.readouterr().out
    assert f"decode {small.decode_rows} of {work.sequences} sequences" in shown
    assert mx.get_peak_memory() > 0 and planned.metrics[-1]["step"] == 2
    a, b = Adapter.load(whole.output_dir), Adapter.load(planned.output_dir)
    for name in a.lora_b:
        np.testing.assert_allclose(np.array(b.lora_b[name]), np.array(a.lora_b[name]), atol=2e-5)
    assert any(np.abs(np.array(v)).max() > 1e-4 for v in a.lora_b.values())  # it trained


def test_a_budget_no_plan_fits_is_refused_before_anything_is_written(quick_settings, tmp_path):
    out = tmp_path / "never"
    flags = cli_flags(dict(quick_settings, output_dir=str(out), max_memory="1MB"))
    result = run_cli("train", *flags)
    assert_refused(result, "no memory plan fits max_memory 0.00 GB", "Raise --max-memory")
    assert not out.exists()
    result = run_cli("train", *cli_flags(dict(quick_settings, max_memory="lots")))
    assert_refused(result, "max_memory must be a size such as 12GB")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_rows_bucketed_by_length_pad_less_and_give_the_same_loss_and_gradient(tmp_path, loss_type):
    from mlx_grpo.core.lora import apply_lora

    lm = load_model(str(build_tiny_qwen3(tmp_path / "m", init_std=0.3)))
    apply_lora(lm.model, 4, 2.0, 0.0, ["q_proj", "down_proj"], range(2))
    lm.model.update(
        tree_map(lambda b: mx.random.normal(b.shape) * 0.1, lm.model.trainable_parameters())
    )
    batch = sampled(lm, None, seed=1, length=120)
    lengths = batch.lengths
    assert max(lengths) - min(lengths) > 40  # short and long completions side by side
    adv = mx.array(np.random.default_rng(1).normal(size=len(PROMPTS) * G).astype(np.float32))
    cfg = TrainConfig(
        loss_type=loss_type,
        beta=0.04,
        num_generations=G,
        prompts_per_step=len(PROMPTS),
        max_completion_length=120,
        gradient_accumulation_steps=2,
    )
    padded = micro_batches(lm.model, batch, adv, cfg, buckets=False)
    bucketed = micro_batches(lm.model, batch, adv, cfg)
    assert len(padded) == 2 and len(bucketed) > 2

    def padded_tokens(micro):
        return sum(mb.mask.size for mb in micro)

    assert padded_tokens(bucketed) < 0.8 * padded_tokens(padded)
    rows = sorted(r for mb in bucketed for r in np.array(mb.advantages).tolist())
    assert rows == sorted(np.array(adv).tolist())  # every row once
    loss_padded, grads_padded = summed_loss_and_grads(lm.model, padded, cfg)
    loss_bucketed, grads_bucketed = summed_loss_and_grads(lm.model, bucketed, cfg)
    assert loss_bucketed == pytest.approx(loss_padded, rel=1e-5, abs=2e-6)
    for name, g in grads_padded.items():
        np.testing.assert_allclose(
            np.array(grads_bucketed[name]), np.array(g), rtol=1e-4, atol=1e-6
        )
