"""Agent episodes on the tiny model with forced tokens: tools are called with the parsed
arguments, their results enter the sequence with loss mask 0, the KV cache after a tool
result equals a fresh prefill of the whole sequence, and episodes end as TRL ends them."""

import dataclasses
from types import SimpleNamespace

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from mlx_grpo.core import episodes as episodes_mod
from mlx_grpo.core.agent_tools import ToolRunner
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.episodes import Episode, run_episodes, tool_suffix
from mlx_grpo.core.models import load_model
from mlx_grpo.core.rollout import Noise
from mlx_grpo.tasks.toy import build_tiny_qwen3

PROMPTS = [[10, 20, 30, 40], [5, 6, 7]]
G = 2


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def explode(reason: str) -> str:
    """Raise.

    Args:
        reason: Why.
    """
    raise RuntimeError(reason)


TOOLS = {"multiply": multiply, "explode": explode}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(
        str(build_tiny_qwen3(tmp_path_factory.mktemp("tiny-agent"), init_std=0.3, tools=True))
    )


def call(name, **arguments):
    import json

    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


class Script:
    """A `pick` that makes row r say its scripted turns, one token at a time, each turn
    ended by EOS; the log-prob is the model's own for that token."""

    def __init__(self, lm, turns_per_row):
        self.eos = lm.tokenizer.eos_token_id
        self.queues = [
            [t for turn in turns for t in lm.tokenizer.encode(turn) + [self.eos]]
            for turns in turns_per_row
        ]
        self.seen = []  # (rows, logits) of every call

    def __call__(self, logits, u, rows):
        self.seen.append((rows.copy(), logits))
        tokens = [self.queues[r].pop(0) if self.queues[r] else self.eos for r in rows]
        token = mx.array(tokens)
        logp = logits.astype(mx.float32) - mx.logsumexp(
            logits.astype(mx.float32), -1, keepdims=True
        )
        return token, mx.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def episode_run(lm, turns, max_rounds=3, length=400, timeout=5.0, schedule="pause"):
    episodes = [Episode(dict(TOOLS)) for _ in range(len(PROMPTS) * G)]
    script = Script(lm, turns)
    sampling = dataclasses.replace(TrainConfig().sampling(), max_completion_length=length)
    suffix = tool_suffix(lm.tokenizer)
    rollout = run_episodes(
        lm.model, lm.tokenizer, PROMPTS, episodes, sampling, lm.eos_ids, lm.pad_id,
        ToolRunner(timeout), suffix, max_rounds, Noise(0), pick=script, schedule=schedule,
    )  # fmt: skip
    return SimpleNamespace(rollout=rollout, episodes=episodes), script, suffix


def text(lm, ids):
    return lm.tokenizer.decode(ids, skip_special_tokens=False)


def test_a_tool_call_runs_its_tool_and_the_result_is_in_the_sequence_but_not_the_loss(lm):
    turns = [
        [call("multiply", a=6, b=7), "It is 42."],
        ["No tools needed."],
        [call("explode", reason="on purpose"), "Sorry."],
        [call("nothing"), "Hm."],
    ]
    out, _, suffix = episode_run(lm, turns)
    eos = lm.tokenizer.eos_token_id
    enc = lm.tokenizer.encode
    first = episode = out.episodes[0]
    tool_ids = suffix([{"role": "tool", "name": "multiply", "content": "42"}])
    expected = enc(turns[0][0]) + [eos] + tool_ids + enc(turns[0][1]) + [eos]
    assert episode.ids == expected
    assert episode.trained == [1] * (len(enc(turns[0][0])) + 1) + [0] * len(tool_ids) + [1] * (
        len(enc(turns[0][1])) + 1
    )
    assert "42" in text(lm, tool_ids)
    roll = out.rollout
    k = len(expected)
    np.testing.assert_array_equal(np.array(roll.completion_ids[0, :k]), expected)
    np.testing.assert_array_equal(np.array(roll.loss_mask[0, :k]), first.trained)
    assert np.array(roll.completion_mask[0]).sum() == k
    logp = np.array(roll.sampled_logprobs[0, :k])
    assert (logp[np.array(first.trained) == 0] == 0).all() and (logp[:5] < 0).all()
    assert first.messages == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "multiply", "arguments": {"a": 6, "b": 7}},
                }
            ],
        },
        {"role": "tool", "name": "multiply", "content": "42"},
        {"role": "assistant", "content": "It is 42."},
    ]
    assert (first.calls, first.failures, first.rounds) == (1, 0, 1)
    plain = out.episodes[1]
    assert plain.messages == [{"role": "assistant", "content": "No tools needed."}]
    assert plain.trained == [1] * len(plain.ids) and plain.calls == 0
    failed = out.episodes[2]
    assert failed.messages[1] == {
        "role": "tool",
        "name": "explode",
        "content": "{'error': 'on purpose'}",
    }
    assert (failed.calls, failed.failures) == (1, 1)
    unknown = out.episodes[3]
    assert unknown.messages[1]["content"] == "{'error': 'Tool nothing not found.'}"
    assert out.rollout.truncated == [False] * 4


def test_the_cache_after_a_tool_result_is_a_fresh_prefill_of_the_whole_sequence(lm, monkeypatch):
    turns = [[call("multiply", a=2, b=3), "6"], ["x"], ["yy"], [call("multiply", a=1, b=1), "1"]]
    caught = []
    real = episodes_mod._Turns.join

    def spy(*args):
        rows, logits, cache = real(*args)
        if cache is None:  # no episode goes on
            return rows, logits, cache
        # as it is now: the next turn's decoding writes into it
        kept = [
            (
                np.array(c.keys),
                np.array(c.values),
                np.array(c.left_padding),
                c._idx,
                np.array(c.offset),
            )
            for c in cache
        ]
        caught.append((rows, np.array(logits), kept))
        return rows, logits, cache

    monkeypatch.setattr(episodes_mod._Turns, "join", spy)
    out, script, _ = episode_run(lm, turns)
    rows, logits, cache = caught[0]
    assert rows.tolist() == [0, 3]
    for i, row in enumerate(rows):
        ep = out.episodes[row]
        upto = ep.turn  # the first turn and its tool result
        prompt = PROMPTS[row // G]
        n = len(prompt) + upto
        fresh = [KVCache() for _ in lm.model.layers]
        full = lm.model(mx.array([prompt + ep.ids[:upto]]), cache=fresh)[:, -1, :]
        np.testing.assert_allclose(logits[i], np.array(full[0]), atol=1e-4)
        for layer, (keys, values, padding, end, offset) in enumerate(cache):
            pad = int(padding[i])
            assert end - pad == n and offset[i] == n  # RoPE positions go on from there
            np.testing.assert_allclose(
                keys[i, :, pad:end], np.array(fresh[layer].keys[0, :, :n]), atol=1e-4
            )
            np.testing.assert_allclose(
                values[i, :, pad:end], np.array(fresh[layer].values[0, :, :n]), atol=1e-4
            )


def test_an_episode_stops_after_max_rounds_and_where_a_result_would_not_fit(lm):
    # row 0 asks three times; with max_rounds=1 its second call is never run
    turns = [[call("multiply", a=1, b=2), call("multiply", a=3, b=4), "done"], ["a"], ["b"], ["c"]]
    out, _, _ = episode_run(lm, turns, max_rounds=1)
    ep = out.episodes[0]
    assert (ep.calls, ep.rounds) == (1, 1)
    assert ep.messages[-1]["tool_calls"][0]["function"]["arguments"] == {"a": 3, "b": 4}
    assert [m["role"] for m in ep.messages] == ["assistant", "tool", "assistant"]
    # a budget that holds the first turn but not its tool result: rolled back, not truncated
    first = len(lm.tokenizer.encode(turns[0][0])) + 1
    out, _, _ = episode_run(lm, turns, max_rounds=3, length=first + 5)
    ep = out.episodes[0]
    assert len(ep.ids) == first and ep.trained == [1] * first
    assert [m["role"] for m in ep.messages] == ["assistant"] and not ep.truncated
    assert ep.calls == 1  # the tool ran; its result did not fit


def test_a_turn_cut_by_the_budget_is_truncated_and_calls_no_tool(lm):
    turns = [[call("multiply", a=6, b=7)], ["a"], ["b"], ["c"]]
    out, _, _ = episode_run(lm, turns, length=10)
    ep = out.episodes[0]
    assert len(ep.ids) == 10 and ep.truncated and ep.calls == 0
    assert out.rollout.truncated == [True, False, False, False]


def test_rows_that_rejoin_at_once_get_the_same_episodes_in_fewer_decode_steps(lm):
    # turns of unequal lengths: with "pause" every round waits for the longest turn
    turns = [
        [call("multiply", a=2, b=3), "six, the product of two and three, and a few more words"],
        ["a long answer without any tool at all, longer than the first turn"],
        [call("explode", reason="r") + " and many more words here", "x"],
        ["short"],
    ]
    paused, pause_script, _ = episode_run(lm, turns, schedule="pause")
    joined, join_script, _ = episode_run(lm, turns, schedule="rejoin")
    assert len(join_script.seen) < len(pause_script.seen)  # decode steps
    for a, b in zip(paused.episodes, joined.episodes):
        assert (a.ids, a.trained, a.messages) == (b.ids, b.trained, b.messages)
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-4)
    # each token's log-prob is the one a single pass over the whole sequence gives
    for row, ep in enumerate(joined.episodes):
        prompt = PROMPTS[row // G]
        logits = lm.model(mx.array([prompt + ep.ids]))[0, len(prompt) - 1 : -1]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        whole = np.array(mx.take_along_axis(logp, mx.array(ep.ids)[:, None], axis=-1)[:, 0])
        trained = np.array(ep.trained) == 1
        np.testing.assert_allclose(np.array(ep.logp)[trained], whole[trained], atol=1e-4)
