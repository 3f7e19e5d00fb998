"""Dynamic sampling: groups whose rewards are all equal are dropped and more prompts rolled
out until the step has its B informative groups, within --max-resample-rounds."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.core import dynamic
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.dynamic import Round, informative
from mlx_grpo.core.logprobs import completion_logprobs
from mlx_grpo.core.models import load_model
from mlx_grpo.core.reward_calls import RewardLogs
from mlx_grpo.core.rollout import Noise, RolloutBatch, join_rollouts, rollout
from mlx_grpo.core.settings import resolve
from mlx_grpo.core.setup import setup
from mlx_grpo.core.step_rewards import StepRewards
from mlx_grpo.core.trainer import train
from mlx_grpo.tasks.toy import build_tiny_qwen3

G = 4
NAN = float("nan")


def mixed(prompts, completions, completion_ids, allowed=None, **kwargs):
    """A reward that is the same for every completion of half the toy prompts (those asking
    for digits) and depends on the completion's first token for the others."""
    return [
        0.5 if "0123456789" in (chars or "") else float(ids[0] % 2)
        for ids, chars in zip(completion_ids, allowed or [None] * len(completion_ids))
    ]


def scores(per_func, weights=(1.0,), texts=None, extra=None, metrics=None):
    per_func = np.array(per_func, dtype=np.float64).reshape(len(per_func), -1)
    n = per_func.shape[0]
    logs = RewardLogs(extra=extra or {}, metrics=metrics or {})
    return StepRewards(
        per_func=per_func,
        weights=np.array(weights, dtype=np.float32),
        lengths=np.arange(n, dtype=np.float64) + 1,
        truncated=np.zeros(n, dtype=bool),
        texts=texts or [f"c{i}" for i in range(n)],
        logged=logs,
    )


def test_a_group_is_informative_when_its_weighted_rewards_differ():
    per_func = [
        [1, 0], [1, 0], [1, 0], [1, 0],  # equal: no
        [1, 0], [0, 2], [1, 0], [1, 0],  # the weighted sums differ (1 vs 4): yes
        [1, 0], [0, 0.5], [1, 0], [1, 0],  # each function differs, the sums do not: no
        [3, NAN], [NAN, NAN], [NAN, 1.5], [NAN, NAN],  # 3 and 3 scored: no
        [NAN, NAN], [NAN, NAN], [NAN, NAN], [2, 0],  # one scored completion: no std
        [1e-9, 0], [0, 0], [0, 0], [0, 0],  # a std close to 0 (TRL's isclose): no
        [NAN, 1], [NAN, 0], [NAN, NAN], [NAN, NAN],  # differs where scored: yes
    ]  # fmt: skip
    out = informative(scores(per_func, weights=(1.0, 2.0)), G)
    assert out.tolist() == [False, True, False, False, False, False, True]


def fake_round(rewards, prompts, width, length, seed):
    """A round of len(rewards) / G groups with random tokens: prompts of `width` (left
    padding 0..2), completions up to `length`."""
    rng = np.random.default_rng(seed)
    n = len(rewards)
    padding = rng.integers(0, 3, n // G).repeat(G)
    tokens = rng.integers(1, 200, (n // G, width)).repeat(G, axis=0)
    tokens[np.arange(width)[None] < padding[:, None]] = 0
    lengths = rng.integers(1, length + 1, n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    batch = RolloutBatch(
        prompt_tokens=mx.array(tokens.astype(np.int32)),
        prompt_padding=mx.array(padding.astype(np.int32)),
        completion_ids=mx.array((rng.integers(1, 200, (n, length)) * mask).astype(np.int32)),
        completion_mask=mx.array(mask),
        sampled_logprobs=mx.array(-rng.uniform(0, 3, (n, length)).astype(np.float32) * mask),
        truncated=(lengths == length).tolist(),
    )
    texts = [f"{prompts[i // G]}:{i}" for i in range(n)]
    extra = {"note": [f"{seed}-{i}" for i in range(n)]}
    return Round(prompts, batch, scores(rewards, texts=texts, extra=extra, metrics={"m": [seed]}))


def row(batch, i):
    """Row i as (prompt without padding, completion ids, mask, log-probs, truncated)."""
    pad = int(batch.prompt_padding[i].item())
    n = int(batch.completion_mask[i].sum().item())
    return (
        np.array(batch.prompt_tokens[i, pad:]).tolist(),
        np.array(batch.completion_ids[i, :n]).tolist(),
        np.array(batch.sampled_logprobs[i, :n]).tolist(),
        batch.truncated[i],
    )


def test_rounds_go_on_until_b_informative_groups_then_keep_them_in_order():
    # groups per round: (informative?) round 0: no yes no; round 1: no no yes; round 2: yes yes no
    pattern = [[0, 1, 0], [0, 0, 1], [1, 1, 0]]
    rounds = [
        fake_round(
            [v for ok in groups for v in ([0, 1, 0, 0] if ok else [1] * G)],
            [f"r{r}p{b}" for b in range(3)],
            width=3 + r,
            length=4 + 2 * r,
            seed=r,
        )
        for r, groups in enumerate(pattern)
    ]
    drawn = iter(rounds)
    out, metrics = dynamic.sample(lambda: next(drawn), 3, G, max_resample_rounds=5, pad_id=0)
    assert metrics["dynamic_sampling/rounds"] == 3
    assert metrics["dynamic_sampling/frac_reward_zero_std_before"] == pytest.approx(5 / 9)
    assert metrics["dynamic_sampling/reward_before"] == pytest.approx((4 * 5 + 4) / 36)
    assert out.prompts == ["r0p1", "r1p2", "r2p0"]  # the first three informative, in order
    assert informative(out.scored, G).all()
    chosen = [(0, 1), (1, 2), (2, 0)]
    rows = [(r, b * G + j) for r, b in chosen for j in range(G)]
    assert out.batch.prompt_tokens.shape[1] == 5 and out.batch.completion_ids.shape[1] == 8
    for i, (r, source) in enumerate(rows):
        assert row(out.batch, i) == row(rounds[r].batch, source)
        assert out.scored.texts[i] == rounds[r].scored.texts[source]
        assert out.scored.logged.extra["note"][i] == f"{r}-{source}"
        assert out.scored.lengths[i] == rounds[r].scored.lengths[source]
    np.testing.assert_array_equal(
        out.scored.per_func, np.concatenate([rounds[r].scored.per_func[[s]] for r, s in rows])
    )
    assert out.scored.logged.metrics == {"m": [0, 1, 2]}  # every round's calls count


def test_when_the_rounds_run_out_the_step_is_filled_with_the_first_equal_groups():
    rounds = [
        fake_round([1] * G + [0, 1, 1, 1] + [2] * G, ["a", "b", "c"], 3, 4, seed=0),
        fake_round([1] * G * 3, ["d", "e", "f"], 3, 4, seed=1),
    ]
    drawn = iter(rounds)
    out, metrics = dynamic.sample(lambda: next(drawn), 3, G, max_resample_rounds=1, pad_id=0)
    assert metrics["dynamic_sampling/rounds"] == 2
    assert out.prompts == ["a", "b", "c"]  # b, then the first two equal ones: a and c
    once = iter(rounds)
    out, metrics = dynamic.sample(lambda: next(once), 3, G, max_resample_rounds=0, pad_id=0)
    assert metrics["dynamic_sampling/rounds"] == 1 and out.prompts == ["a", "b", "c"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(str(build_tiny_qwen3(tmp_path_factory.mktemp("tiny-dyn"), init_std=0.3)))


def test_a_joined_rollout_scores_as_its_rounds_did(lm):
    """Wider prompt padding and longer completion padding change no log-prob."""
    sampling = dataclasses.replace(TrainConfig().sampling(), max_completion_length=6)
    eos = lm.eos_ids + list(range(0, 256, 11))
    short = rollout(lm.model, [[10, 20], [30, 31, 32]], G, sampling, eos, lm.pad_id, Noise(1))
    longer = dataclasses.replace(sampling, max_completion_length=9)
    wide = rollout(lm.model, [[5, 6, 7, 8, 9, 11, 12]], G, longer, eos, lm.pad_id, Noise(2))
    joined = join_rollouts([(short, np.arange(4, 8)), (wide, np.arange(4))], lm.pad_id)

    def logp(b):
        scored = completion_logprobs(
            lm.model, b.prompt_tokens, b.prompt_padding, b.completion_ids, 1.0, 64
        )
        return np.array(scored.logp * b.completion_mask)

    ours, theirs_short, theirs_wide = logp(joined), logp(short), logp(wide)
    np.testing.assert_allclose(ours[:4, :6], theirs_short[4:8], atol=1e-5)
    np.testing.assert_allclose(ours[4:, :9], theirs_wide[:4], atol=1e-5)
    assert np.abs(ours[:4]).sum() > 0


def read_metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


@pytest.fixture
def dynamic_settings(quick_settings):
    return {
        **quick_settings,
        "rewards": ["test_dynamic_sampling:mixed"],
        "dynamic_sampling": True,
        "max_steps": 4,
        "show_progress": False,
    }


def test_a_dynamic_run_trains_only_on_groups_whose_rewards_differ(dynamic_settings):
    steps = train(**dynamic_settings).metrics
    rounds = [m["dynamic_sampling/rounds"] for m in steps]
    assert max(rounds) > 1  # half the toy prompts give equal rewards: some steps resample
    assert all(1 <= r <= 4 for r in rounds)
    for m in steps:
        if m["dynamic_sampling/rounds"] < 4:  # found enough: nothing uninformative trained
            assert m["frac_reward_zero_std"] == 0.0
    assert any(m["dynamic_sampling/frac_reward_zero_std_before"] > 0 for m in steps)
    plain = {k: v for k, v in dynamic_settings.items() if k != "dynamic_sampling"}
    plain["output_dir"] += "-plain"
    plain_steps = train(**plain).metrics
    assert not any(k.startswith("dynamic_sampling/") for k in plain_steps[0])
    assert any(m["frac_reward_zero_std"] > 0 for m in plain_steps)


def test_no_resampling_rounds_trains_on_the_first_draw(dynamic_settings):
    steps = train(**{**dynamic_settings, "max_resample_rounds": 0}).metrics
    assert all(m["dynamic_sampling/rounds"] == 1 for m in steps)
    for m in steps:  # nothing dropped: the trained groups are the drawn ones
        assert m["frac_reward_zero_std"] == m["dynamic_sampling/frac_reward_zero_std_before"]


def test_dynamic_sampling_is_refused_in_a_distributed_run(quick_settings):
    cfg = resolve(None, **{**quick_settings, "dynamic_sampling": True})
    with pytest.raises(ValueError, match="dynamic_sampling is not available in distributed"):
        setup(cfg, [], peers=SimpleNamespace(size=2, main=True))
    assert not Path(quick_settings["output_dir"]).exists()
