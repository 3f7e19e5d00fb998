"""Training an agent: a TRL-style environment (reset, two tools, get_reward) and plain tools
train unchanged on the tiny model, whose first turn is forced to call a tool; the loss
leaves the tool results out; failing and hanging tools do not stop the run; a stopped run
resumes to the same adapter; completions.jsonl keeps every episode."""

import json
import re
import signal
import time
from pathlib import Path

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core; must come first)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_refused, cli_flags, run_cli

from mlx_grpo.core import agent as agent_mod
from mlx_grpo.core.agent import AgentCode
from mlx_grpo.core.agent_tools import ToolSpecError
from mlx_grpo.core.batches import micro_batches
from mlx_grpo.core.episodes import FirstTurn
from mlx_grpo.core.objective import Normalizer
from mlx_grpo.core.rollout import Noise
from mlx_grpo.core.settings import resolve
from mlx_grpo.core.setup import setup
from mlx_grpo.core.trainer import train
from mlx_grpo.core.update import micro_loss


class Arithmetic:
    """A TRL-style environment: reset with the row, two tools, and its own reward."""

    def reset(self, **row):
        self.used = []
        return " Use the tools."

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        """
        self.used.append("multiply")
        return a * b

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first term.
            b: The second term.
        """
        self.used.append("add")
        return a + b

    def get_reward(self) -> float:
        return float(len(self.used))


def slow(seconds: float) -> str:
    """Take a while.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "done"


def boom(x: int) -> int:
    """Fail.

    Args:
        x: Anything.
    """
    raise ValueError("boom")


def length_reward(completions, **kwargs):
    """The last message's length, so that groups differ."""
    return [len(c[-1]["content"]) / 10 for c in completions]


FIRST_TURN = '<tool_call>{"name": "multiply", "arguments": {"a": 6, "b": 7}}</tool_call>'


@pytest.fixture
def forced(monkeypatch):
    """Every episode's first turn is FIRST_TURN (the model's own log-probs of those tokens);
    later turns are sampled as usual."""
    real = agent_mod.run_episodes
    turn = {"text": FIRST_TURN}

    def with_first_turn(model, tokenizer, prompts, episodes, sampling, *args, **kwargs):
        pick = FirstTurn(tokenizer, turn["text"], sampling, len(episodes))
        return real(model, tokenizer, prompts, episodes, sampling, *args, **kwargs, pick=pick)

    monkeypatch.setattr(agent_mod, "run_episodes", with_first_turn)
    return turn


@pytest.fixture
def agent_settings(quick_settings, tool_model_dir):
    return {
        **quick_settings,
        "model": str(tool_model_dir),
        "max_completion_length": 170,  # the forced call, its result, a short second turn
        "rewards": [],
        "max_steps": 3,
        "show_progress": False,
        "lora_dropout": 0.1,
        "save_steps": 2,
    }


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_a_trl_environment_trains_unchanged_and_owns_the_reward(agent_settings, forced):
    out = Path(agent_settings["output_dir"])
    seen = []

    def prompts_seen(prompts, completions, **kwargs):
        seen.extend(prompts)
        return [0.0] * len(completions)

    steps = train(
        **agent_settings, environment_factory=Arithmetic, reward_funcs=[prompts_seen]
    ).metrics
    # the reward functions get each prompt with reset's text appended, as TRL passes it
    assert seen and all(p.endswith(" Use the tools.") for p in seen)
    for m in steps:
        assert m["tools/call_frequency"] >= 1.0 and m["tools/failure_frequency"] == 0.0
        assert m["rewards/Arithmetic/mean"] >= 1.0  # each episode multiplied at least once
    (sample, *_) = [r for r in records(out / "completions.jsonl") if r["step"] == 1]
    roles = [m["role"] for m in sample["messages"]]
    assert roles[:2] == ["assistant", "tool"] and sample["messages"][1]["content"] == "42"
    assert sample["messages"][0]["tool_calls"][0]["function"]["arguments"] == {"a": 6, "b": 7}
    spans = sample["trained_spans"]
    assert spans[0][0] == 0 and len(spans) == 2  # the first turn, then (after the result) the next
    assert "42" in sample["completion"]


@pytest.mark.parametrize("max_rows", [4, 3])  # whole groups; halves of a group
def test_episodes_decoded_in_chunks_are_those_of_one_batch(
    agent_settings, forced, monkeypatch, tmp_path, max_rows
):
    settings = {**agent_settings, "max_steps": 1, "environment_factory": Arithmetic}
    seen = []
    real = agent_mod.Agent.rollout

    def planned(self, *args):  # the memory plan's decode_rows, as the trainer passes it
        seen.append(args[-1])
        return real(self, *args[:-1], chunk["rows"])

    chunk = {"rows": None}
    monkeypatch.setattr(agent_mod.Agent, "rollout", planned)
    train(**{**settings, "output_dir": str(tmp_path / "whole")})
    chunk["rows"] = max_rows
    train(**{**settings, "output_dir": str(tmp_path / "part")})
    assert seen == [8, 8]  # the plan lets the whole batch decode at once; the test does not
    whole, part = (records(tmp_path / name / "completions.jsonl") for name in ("whole", "part"))
    assert [r["messages"] for r in part] == [r["messages"] for r in whole]
    assert [r["rewards"] for r in part] == [r["rewards"] for r in whole]
    (a,), (b,) = (records(tmp_path / name / "metrics.jsonl") for name in ("whole", "part"))
    assert a["completions/mean_length"] == b["completions/mean_length"]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_the_loss_leaves_tool_results_out(agent_settings, forced):
    settings = {k: v for k, v in agent_settings.items() if k != "show_progress"}
    cfg = resolve(None, **{**settings, "tools": ["test_agent_training:boom"]})
    run = setup(cfg, [length_reward], code=AgentCode(environment_factory=Arithmetic))
    lm = run.lm
    rows = run.rows[:2]
    out = run.agent.rollout(lm.model, rows, cfg.sampling(), lm.eos_ids, lm.pad_id, Noise(3))
    batch = out.batch
    # the memory plan counts the prompts as the episodes show them: with the tools' schemas
    shown = batch.prompt_tokens.shape[1] - np.array(batch.prompt_padding)
    reset_text = len(lm.tokenizer.encode(Arithmetic().reset()))  # not known before the run
    assert run.plan.work.prompt_tokens >= shown.max() - reset_text
    assert run.plan.work.prompt_tokens > max(len(r.prompt_ids) for r in run.rows) + 50
    trained, extent = np.array(batch.loss_mask), np.array(batch.completion_mask)
    assert (trained <= extent).all() and (trained < extent).any()  # tool results are read only
    adv = mx.array(np.linspace(-1, 1, batch.completion_ids.shape[0]).astype(np.float32))
    (mb,) = micro_batches(lm.model, batch, adv, cfg)
    np.testing.assert_array_equal(np.array(mb.mask), trained[:, : mb.mask.shape[1]])
    # pi_old off the current policy, so ratios are not 1 and the clip acts
    rng = np.random.default_rng(0)
    old = np.array(batch.sampled_logprobs)[:, : mb.mask.shape[1]]
    mb.old_logp = mx.array(
        (old + rng.normal(0, 0.3, old.shape) * trained[:, : old.shape[1]]).astype(np.float32)
    )
    loss, _ = micro_loss(
        lm.model, mb, cfg, cfg.loss_settings(), Normalizer(1, float(trained.sum()))
    )
    # by hand: each sequence through the model in full, dapo's token mean over the mask
    expected_sum = 0.0
    lp_all = []
    for i in range(batch.completion_ids.shape[0]):
        pad = int(batch.prompt_padding[i].item())
        n = int(extent[i].sum())
        prompt = np.array(batch.prompt_tokens[i, pad:]).tolist()
        ids = np.array(batch.completion_ids[i, :n]).tolist()
        logits = lm.model(mx.array([prompt + ids]))[0, len(prompt) - 1 : -1].astype(mx.float32)
        lp = np.array(logits - mx.logsumexp(logits, -1, keepdims=True))[np.arange(n), ids]
        ratio = np.exp(lp - np.array(mb.old_logp[i, :n]))
        a = float(adv[i])
        per_token = -np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a)
        expected_sum += float((per_token * trained[i, :n]).sum())
        lp_all.append(lp)
    assert float(loss) == pytest.approx(expected_sum / trained.sum(), rel=1e-4, abs=1e-6)
    # counting the tool results too would give another loss
    wrong = (
        sum(
            float(
                (
                    -np.minimum(
                        np.exp(lp - np.array(mb.old_logp[i, : len(lp)])) * float(adv[i]),
                        np.clip(np.exp(lp - np.array(mb.old_logp[i, : len(lp)])), 0.8, 1.2)
                        * float(adv[i]),
                    )
                ).sum()
            )
            for i, lp in enumerate(lp_all)
        )
        / extent.sum()
    )
    assert abs(wrong - float(loss)) > 1e-4


def test_failing_and_hanging_tools_give_errors_and_the_run_goes_on(agent_settings, forced):
    forced["text"] = (
        '<tool_call>{"name": "slow", "arguments": {"seconds": 60}}</tool_call>'
        '<tool_call>{"name": "boom", "arguments": {"x": 1}}</tool_call>'
        "<tool_call>{oops}</tool_call>"
    )
    settings = {
        **agent_settings,
        "tools": ["test_agent_training:slow", "test_agent_training:boom"],
        "tool_timeout": 0.5,
        "max_steps": 1,
        "max_completion_length": 520,  # the forced turn is 160 tokens, the results 250
        "max_tool_calling_iterations": 1,
    }
    start = time.perf_counter()
    steps = train(**settings, reward_funcs=[length_reward]).metrics
    assert time.perf_counter() - start < 30  # two steps, each waiting 0.5 s for the hung tool
    for m in steps:
        assert m["tools/call_frequency"] == 3.0 and m["tools/failure_frequency"] == 1.0
    (sample, *_) = records(Path(settings["output_dir"]) / "completions.jsonl")
    results = [m["content"] for m in sample["messages"] if m["role"] == "tool"]
    assert results == [
        "{'error': 'the tool did not finish within 0.5 s'}",
        "{'error': 'boom'}",
        results[2],
    ]
    assert "not valid JSON" in results[2]


# The forced first turn, in a `mlx-grpo train` process of its own.
FORCE_IN_CHILD = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_agent_training as t
from mlx_grpo.core import agent as agent_mod
from mlx_grpo.core.agent import AgentCode
from mlx_grpo.core.episodes import FirstTurn
real = agent_mod.run_episodes
def run(model, tokenizer, prompts, episodes, sampling, *args, **kwargs):
    pick = FirstTurn(tokenizer, t.FIRST_TURN, sampling, len(episodes))
    return real(model, tokenizer, prompts, episodes, sampling, *args, **kwargs, pick=pick)
agent_mod.run_episodes = run
"""


def test_an_agent_run_killed_mid_run_resumes_to_the_same_adapter(agent_settings, forced, tmp_path):
    from test_resume import assert_same_run, spawn, wait_for_steps

    settings = {
        **agent_settings,
        "environment": "test_agent_training:Arithmetic",
        "max_steps": 3,
        "save_steps": 1,
    }
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(**{**settings, "output_dir": str(whole)})
    proc = spawn(cli_flags({**settings, "output_dir": killed}), tmp_path, FORCE_IN_CHILD)
    wait_for_steps(killed, 2, proc)  # step 1 checkpointed by then
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert len(records(killed / "metrics.jsonl")) < 3  # killed before the end
    again = spawn(["--resume", str(killed)], tmp_path, FORCE_IN_CHILD)
    assert again.wait(timeout=300) == 0, again.communicate()
    assert_same_run(whole, killed)


def test_tools_on_the_command_line(agent_settings, tmp_path):
    good = {**agent_settings, "tools": ["test_agent_training:slow"], "max_steps": 1}
    good.pop("show_progress")
    good["rewards"] = ["test_agent_training:length_reward"]
    result = run_cli("train", *cli_flags(good))
    assert result.exit_code == 0, result.output
    bad = {**good, "tools": ["test_agent_training:nothing"], "output_dir": str(tmp_path / "b")}
    assert_refused(run_cli("train", *cli_flags(bad)), "has no callable 'nothing'", "slow")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (["--dynamic-sampling"], "dynamic_sampling is not available with tools"),
        (["--eval-data", "DATA"], "eval_data is not available with tools"),
    ],
)
def test_what_agents_cannot_do_yet_is_refused_before_anything_is_written(
    agent_settings, flags, phrase
):
    settings = {**agent_settings, "tools": ["test_agent_training:slow"]}
    settings["rewards"] = ["test_agent_training:length_reward"]
    flags = [agent_settings["data"] if f == "DATA" else f for f in flags]
    assert_refused(run_cli("train", *cli_flags(settings), *flags), phrase)
    assert not Path(settings["output_dir"]).exists()


def test_the_example_environment_runs_python_and_scores_the_submitted_answer(
    agent_settings, forced, tmp_path
):
    from mlx_grpo.tasks.tool_arithmetic import write_task

    data = write_task(tmp_path / "mult.jsonl", rows=1, seed=1)  # every prompt is this one
    first = json.loads(data.read_text().splitlines()[0])
    forced["text"] = (
        '<tool_call>{"name": "python", "arguments": {"code": "print(2 * 21)"}}</tool_call>'
        '<tool_call>{"name": "submit", "arguments": {"answer": ' + str(first["answer"]) + "}}"
        "</tool_call>"
    )
    settings = {
        **agent_settings,
        "data": str(data),
        "environment": "mlx_grpo.tasks.tool_arithmetic:PythonSandbox",
        "max_completion_length": 320,
        "max_steps": 1,
        "max_tool_calling_iterations": 1,
    }
    steps = train(**settings).metrics
    assert steps[0]["tools/call_frequency"] == 2.0 and steps[0]["tools/failure_frequency"] == 0
    (sample, *_) = records(Path(settings["output_dir"]) / "completions.jsonl")
    assert [m["content"] for m in sample["messages"] if m["role"] == "tool"] == [
        "42\n",
        "submitted",
    ]
    assert steps[0]["rewards/PythonSandbox/mean"] == 1.0  # the right product, submitted
    for record in records(Path(settings["output_dir"]) / "completions.jsonl"):
        a, b = map(int, re.search(r"What is (\d+) \* (\d+)", record["prompt"]).groups())
        assert a * b == first["answer"] and record["rewards"]["PythonSandbox"] == 1.0


class BrokenReset(Arithmetic):
    """Its reset raises for prompts asking for digits."""

    def reset(self, **row):
        if "digits" in row["prompt"]:
            raise KeyError("no such level")
        return super().reset(**row)


def test_a_reset_that_raises_is_handled_by_on_reward_error(agent_settings, forced):
    action = "skip"
    settings = {**agent_settings, "on_reward_error": action, "max_steps": 2, "prompts_per_step": 4}
    steps = train(**settings, environment_factory=BrokenReset).metrics
    errors = records(Path(settings["output_dir"]) / "reward_errors.jsonl")
    assert errors and {e["function"] for e in errors} == {"BrokenReset.reset"}
    assert all(e["action"] == action and "KeyError" in e["error"] for e in errors)
    assert len(steps) == 2  # the run went on
    # the broken episodes are unscored, the others scored by get_reward
    for record in records(Path(settings["output_dir"]) / "completions.jsonl"):
        broken = "digits" in record["prompt"]
        assert (record["rewards"]["BrokenReset"] is None) == broken


def test_a_reset_that_raises_stops_the_run_by_default(agent_settings, forced):
    settings = {k: v for k, v in agent_settings.items() if k != "show_progress"}
    result = run_cli(
        "train", *cli_flags({**settings, "environment": "test_agent_training:BrokenReset"})
    )
    assert result.exit_code != 0
    assert "BrokenReset.reset raised KeyError" in result.output
    assert "--on-reward-error zero" in result.output


def test_a_chat_template_that_does_not_show_tools_is_refused(agent_settings, tmp_path):
    import shutil

    model = tmp_path / "no-tools-model"
    shutil.copytree(agent_settings["model"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    settings = {k: v for k, v in agent_settings.items() if k != "show_progress"}
    settings |= {"model": str(model), "tools": ["test_agent_training:slow"]}
    settings["rewards"] = ["test_agent_training:length_reward"]
    assert_refused(run_cli("train", *cli_flags(settings)), "does not show tools to the model")
    assert not Path(settings["output_dir"]).exists()


class Doubler:
    """A second environment with a tool of its own and a reward of its own."""

    def reset(self, **row):
        assert "environment" not in row  # it chose the factory; TRL does not pass it on
        self.doubled = 0

    def double(self, x: int) -> int:
        """Double a number.

        Args:
            x: The number.
        """
        self.doubled += 1
        return 2 * x

    def get_reward(self) -> float:
        return 10.0 + self.doubled


def test_a_dict_of_environments_is_chosen_by_each_rows_environment_column(
    agent_settings, forced, tmp_path
):
    data = tmp_path / "mixed.jsonl"
    rows = [{"prompt": f"Task {i}.", "environment": ["calc", "dbl"][i % 2]} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {**agent_settings, "data": str(data), "max_steps": 2, "logging_steps": 1}
    factories = {"calc": Arithmetic, "dbl": Doubler}
    steps = train(**settings, environment_factory=factories).metrics
    # the forced call is to multiply: Arithmetic episodes run it, Doubler ones cannot
    for record in records(Path(settings["output_dir"]) / "completions.jsonl"):
        env = rows[int(record["prompt"].split()[1][:-1])]["environment"]
        result = [m["content"] for m in record["messages"] if m["role"] == "tool"][0]
        if env == "calc":
            assert result == "42" and record["rewards"] == {"Arithmetic": 1.0, "Doubler": None}
        else:
            assert result == "{'error': 'Tool multiply not found.'}"
            assert record["rewards"] == {"Arithmetic": None, "Doubler": 10.0}
    failures = sum(m["tools/failure_frequency"] for m in steps) / len(steps)
    assert 0 < failures < 1  # both kinds ran over the two steps (the whole data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "environment": "nope"}) + "\n")
    with pytest.raises(ToolSpecError, match="environment 'nope' is not one of"):
        train(**{**settings, "data": str(bad), "output_dir": str(tmp_path / "b")},
              environment_factory=factories)  # fmt: skip
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_a_chatml_model_without_tools_gets_a_template_that_shows_them(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from mlx_grpo.core.agent import Agent
    from mlx_grpo.tasks.tool_arithmetic import Calculator, with_tool_template

    before = (tiny_model_dir / "tokenizer_config.json").read_text()
    target = with_tool_template(tiny_model_dir, tmp_path / "with-tools")
    assert (target / "model.safetensors").is_symlink()  # the weights are not copied
    assert (tiny_model_dir / "tokenizer_config.json").read_text() == before
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    cfg = resolve(model=str(target), data="x.jsonl")
    agent = Agent([], {None: Calculator}, cfg, tokenizer)  # refuses a template without tools
    env = Calculator()
    env.reset(answer=42)
    tools = agent.schemas([env.multiply, env.submit])
    conversation = [
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "multiply", "arguments": {"a": 6, "b": 7}}}
        ]},
        {"role": "tool", "name": "multiply", "content": str(env.multiply(6, 7))},
    ]  # fmt: skip
    text = tokenizer.apply_chat_template(
        conversation, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert '"name": "submit"' in text and '"description": "Multiply two integers."' in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}'
        "\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    ) in text
    env.submit(42)
    assert env.get_reward() == 1.0 and env.runs == 1


def test_the_agent_example_counts_calls_and_answers_from_a_run_folder(
    agent_settings, forced, tmp_path
):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import agent_example

    from mlx_grpo.tasks.tool_arithmetic import Calculator

    settings = {**agent_settings, "max_steps": 2, "environment_factory": Calculator}
    train(**settings)  # every first turn calls multiply; the second turn is noise
    per_step = settings["prompts_per_step"] * settings["num_generations"]
    summary = agent_example.summarize(Path(settings["output_dir"]), 1, per_step)
    every = summary["all"]
    assert summary["steps"] == 2 and every["episodes"] == 2 * per_step
    assert every["tool_calls"] == every["episodes"] and every["failed_tool_calls"] == 0
    assert every["right_answers"] == 0 and every["groups_without_signal"] == 1.0
    logged = settings["num_generations"]  # completions.jsonl keeps each step's first group
    assert every["logged_episodes"] == 2 * logged
    assert every["logged_episodes_with_a_tool_call_tag"] == 2 * logged
    assert summary["first"]["episodes"] == summary["last"]["episodes"] == per_step
    assert "made 16 tool calls in 16 episodes (0 failed)" in agent_example.readme_figures(
        summary, 1
    )
