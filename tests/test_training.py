import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from mlx_grpo.core import batches as batches_mod
from mlx_grpo.core import update as update_mod
from mlx_grpo.core.lora import adapters_disabled
from mlx_grpo.core.settings import resolve
from mlx_grpo.core.trainer import setup, train, train_step
from mlx_grpo.core.update import lr_at
from mlx_grpo.tasks.toy import build_tiny_qwen3

TRL_METRICS = {
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "completions/clipped_ratio",
    "num_tokens",
    "learning_rate",
    "grad_norm",
    "loss",
}


def token_share(token_id):
    def share(prompts, completions, completion_ids, **kwargs):
        return [ids.count(token_id) / max(1, len(ids)) for ids in completion_ids]

    return share


def id_sum(prompts, completions, completion_ids, **kwargs):
    """A reward that almost never ties, so every group has a learning signal."""
    return [float(sum(ids) % 101) for ids in completion_ids]


def snapshot(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def test_short_run_changes_every_lora_parameter_and_no_base_parameter(quick_settings):
    cfg = resolve(None, **{**quick_settings, "max_steps": 3})
    run = setup(cfg, [])
    model = run.lm.model
    lora_before = snapshot(model.trainable_parameters())
    all_before = snapshot(model.parameters())
    for step in range(cfg.max_steps):
        train_step(run, step)
    lora_after = snapshot(model.trainable_parameters())
    all_after = snapshot(model.parameters())

    assert lora_before and set(lora_before) == set(lora_after)
    assert all(k.endswith(("lora_a", "lora_b")) for k in lora_before)
    unchanged = [k for k in lora_before if np.array_equal(lora_before[k], lora_after[k])]
    assert unchanged == []
    base = [k for k in all_before if k not in lora_before]
    assert base and all(np.array_equal(all_before[k], all_after[k]) for k in base)


def test_update_has_the_right_sign_on_a_toy_reward(tiny_model_dir, toy_data, tmp_path):
    # The reward is the share of one token the random model already emits now and then.
    result = train(
        model=str(tiny_model_dir),
        data=str(toy_data),
        reward_funcs=[token_share(35)],
        output_dir=str(tmp_path / "run"),
        num_generations=8,
        prompts_per_step=2,
        max_completion_length=12,
        lora_rank=8,
        lora_alpha=16,
        learning_rate=2e-2,
        max_steps=12,
        save_steps=0,
        show_progress=False,
    )
    rewards = [m["reward"] for m in result.metrics]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.2, rewards


def test_run_writes_an_adapter_mlx_lm_loads_and_trl_named_metrics(quick_settings, tmp_path):
    result = train(**quick_settings, show_progress=False)
    out = result.output_dir

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert TRL_METRICS <= set(record)
        assert "rewards/allowed_share/mean" in record and "rewards/allowed_share/std" in record
        assert record["tokens_per_second"] > 0 and record["peak_memory_gb"] > 0
    assert records[1]["num_tokens"] > records[0]["num_tokens"] > 0

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lora_rank"] == 4 and saved["max_steps"] == 2
    assert resolve(out / "config.yaml") == resolve(None, **quick_settings)

    samples = (out / "completions.jsonl").read_text().splitlines()
    assert samples and "completion" in json.loads(samples[0])

    model, tokenizer = mlx_lm.load(quick_settings["model"], adapter_path=str(out))
    base, _ = mlx_lm.load(quick_settings["model"])
    tokens = mx.array([tokenizer.encode("Reply with digits only.")])
    assert not mx.allclose(model(tokens), base(tokens), atol=1e-5).item()


def test_reference_pass_only_when_beta_is_nonzero(quick_settings, monkeypatch):
    calls = []
    real = batches_mod.adapters_disabled

    def counting(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(batches_mod, "adapters_disabled", counting)
    train(**{**quick_settings, "max_steps": 1}, show_progress=False)
    assert calls == []

    settings = {**quick_settings, "max_steps": 1, "beta": 0.1, "overwrite": True}
    metrics = train(**settings, show_progress=False).metrics
    assert len(calls) > 0
    # The adapter starts at B = 0, so pi = pi_ref and the KL is 0 on step 1.
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.fixture
def uncompiled():
    """Python runs on every call (a compiled loss replays its trace): calls can be counted."""
    mx.disable_compile()
    yield
    mx.enable_compile()


@pytest.mark.parametrize(
    "reuse", [{"num_iterations": 2}, {"steps_per_generation": 2}], ids=["mu=2", "2-updates"]
)
def test_pi_old_is_the_rollouts_log_probs_without_another_forward_pass(
    quick_settings, monkeypatch, uncompiled, reuse
):
    cfg = resolve(None, **{**quick_settings, **reuse})
    run = setup(cfg, [])
    calls, seen = [], []
    real_score, real_micro = update_mod.score, batches_mod.micro_batches

    def counting(*args, **kwargs):
        calls.append(1)
        return real_score(*args, **kwargs)

    monkeypatch.setattr(update_mod, "score", counting)

    def micro(model, batch, advantages, cfg, max_tokens=None, **kwargs):
        out = real_micro(model, batch, advantages, cfg, max_tokens, **kwargs)
        fresh = real_score(model, out[0], cfg).logp  # what TRL's extra forward pass gives
        seen.append((out[0].old_logp, fresh, out[0].mask))
        return out

    monkeypatch.setattr("mlx_grpo.core.trainer.micro_batches", micro)
    train_step(run, 0)
    assert len(calls) == 2  # the two updates only
    assert run.optimizer.step.item() == 2
    old, fresh, mask = seen[0]
    assert old is not None
    np.testing.assert_allclose(np.array(old * mask), np.array(fresh * mask), atol=1e-4)


@pytest.mark.parametrize("estimator", ["k3", "exact"])
def test_kl_grows_as_the_policy_leaves_the_reference(quick_settings, estimator):
    settings = {**quick_settings, "max_steps": 4, "beta": 0.05, "kl_estimator": estimator}
    metrics = train(**settings, show_progress=False).metrics
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[-1]["kl"] > 1e-5


def test_several_passes_per_rollout_update_once_each_and_report_clipping(quick_settings):
    cfg = resolve(None, **{**quick_settings, "num_iterations": 3, "learning_rate": 5e-2})
    run = setup(cfg, [])
    metrics = [train_step(run, step)[0] for step in range(2)]
    assert run.optimizer.step.item() == 2 * 3
    # Big steps move pi away from pi_old between passes, so some ratios clip.
    assert max(m["clip_ratio/region_mean"] for m in metrics) > 0


def test_gradient_accumulation_matches_one_big_batch(quick_settings):
    # Same seed -> same rollout; grpo over 2 micro-batches = grpo over 1 batch.
    grads = []
    for ga in (1, 2):
        cfg = resolve(
            None,
            **{**quick_settings, "loss_type": "grpo", "gradient_accumulation_steps": ga},
            overwrite=True,
        )
        run = setup(cfg, [])
        metrics, _ = train_step(run, 0)
        grads.append(metrics["grad_norm"])
    assert grads[0] == pytest.approx(grads[1], rel=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(quick_settings):
    # The recomputation in backward must see each block's cache as it was in forward.
    seen = []
    for checkpoint in (False, True):
        cfg = resolve(
            None, **{**quick_settings, "beta": 0.1, "grad_checkpoint": checkpoint}, overwrite=True
        )
        run = setup(cfg, [])
        update = run.optimizer.update

        def record(model, grads, update=update):
            seen.append(snapshot(grads))
            update(model, grads)

        run.optimizer.update = record
        train_step(run, 0)
    plain, recomputed = seen
    assert plain.keys() == recomputed.keys()
    assert any(np.abs(v).max() > 0 for v in plain.values())
    for k, v in plain.items():
        np.testing.assert_allclose(recomputed[k], v, atol=1e-6, rtol=1e-4)


def test_training_over_a_4bit_quantized_base(tiny_model_dir, toy_data, tmp_path):
    from mlx_lm import convert

    quantized = tmp_path / "q4"
    convert(str(tiny_model_dir), mlx_path=str(quantized), quantize=True, q_group_size=32, q_bits=4)
    result = train(
        model=str(quantized),
        data=str(toy_data),
        reward_funcs=[id_sum],
        output_dir=str(tmp_path / "run"),
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-2,
        show_progress=False,
    )
    norms = [m["grad_norm"] for m in result.metrics]
    assert all(np.isfinite(norms)) and max(norms) > 0
    model, _ = mlx_lm.load(str(quantized), adapter_path=str(result.output_dir))
    assert model(mx.array([[1, 2, 3]])).shape[-1] >= 264


def test_a_llama_model_trains_with_adapters_on_some_layers(toy_data, tmp_path):
    llama = build_tiny_qwen3(tmp_path / "llama", model_type="llama", tie_word_embeddings=False)
    cfg = resolve(
        None,
        model=str(llama),
        data=str(toy_data),
        rewards=[],
        output_dir=str(tmp_path / "run"),
        num_generations=4,
        max_completion_length=6,
        lora_targets=["q_proj", "v_proj"],
        lora_layers="1",
        max_steps=1,
    )
    run = setup(cfg, [id_sum])
    expected = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert sorted(run.lora_paths) == expected
    metrics, _ = train_step(run, 0)
    assert metrics["grad_norm"] > 0


def test_disabling_adapters_gives_the_base_policy_after_training(quick_settings):
    cfg = resolve(None, **quick_settings)
    run = setup(cfg, [])
    tokens = mx.array([[5, 6, 7, 8]])
    base = run.lm.model(tokens)
    for step in range(2):
        train_step(run, step)
    assert not mx.allclose(run.lm.model(tokens), base, atol=1e-6).item()
    with adapters_disabled(run.lm.model):
        assert mx.array_equal(run.lm.model(tokens), base).item()


@pytest.mark.parametrize(
    "scheduler,expected",
    [
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 2 / 3, 1 / 3]),
        ("cosine", [0.0, 0.5, 1.0, 0.75, 0.25]),
    ],
)
def test_learning_rate_warms_up_then_follows_the_schedule(scheduler, expected):
    cfg = resolve(
        None,
        model="m",
        data="d",
        learning_rate=1.0,
        warmup_steps=2,
        max_steps=5,
        lr_scheduler=scheduler,
    )
    assert [lr_at(s, cfg) for s in range(5)] == pytest.approx(expected)


def flaky(prompts, completions, completion_ids, **kwargs):
    """Fails on completions that start with an even token id."""
    return [1.0 / (ids[0] % 2) for ids in completion_ids]


def test_reward_errors_are_logged_and_skipped_when_asked(quick_settings, tmp_path):
    out = tmp_path / "run"
    result = train(
        **{**quick_settings, "rewards": [], "output_dir": str(out)},
        reward_funcs=[flaky],
        on_reward_error="skip",
        show_progress=False,
    )
    records = [json.loads(x) for x in (out / "reward_errors.jsonl").read_text().splitlines()]
    assert records and {r["step"] for r in records} <= {1, 2}
    assert all(r["function"] == "flaky" and "ZeroDivisionError" in r["traceback"] for r in records)
    assert len(result.metrics) == 2


def test_a_reward_error_stops_the_cli_run_with_the_function_and_row(quick_settings, tmp_path):
    from click.testing import CliRunner

    from mlx_grpo.cli import main

    (tmp_path / "rewards.py").write_text(
        "def flaky(prompts, completions, completion_ids, **kw):\n"
        "    return [1.0 / (ids[0] % 2) for ids in completion_ids]\n"
    )
    out = tmp_path / "run"
    args = ["--model", quick_settings["model"], "--data", quick_settings["data"]]
    args += ["--rewards", f"{tmp_path / 'rewards.py'}:flaky", "--output-dir", str(out)]
    args += ["--num-generations", "4", "--max-completion-length", "8", "--max-steps", "3"]
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 2
    assert "reward function 'flaky' raised on row" in result.output
    assert "ZeroDivisionError" in result.output and "reward_errors.jsonl" in result.output
    record = json.loads((out / "reward_errors.jsonl").read_text().splitlines()[0])
    assert record["action"] == "raise" and "Traceback" in record["traceback"]
