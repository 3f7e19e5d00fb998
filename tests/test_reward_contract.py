"""Reward functions written for TRL run unchanged: called by keyword with TRL's
arguments, async ones concurrently, with `trainer_state`, `log_extra` and
`log_metric`; what they return, raise or ask for is checked at the boundary."""

import asyncio
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import cli_flags

import mlx_grpo
from mlx_grpo.cli import main
from mlx_grpo.core.builtin_rewards import (
    arithmetic,
    equation_format,
    exact_answer,
    math_answer,
    think_format,
)
from mlx_grpo.core.distributed import Peers
from mlx_grpo.core.reward_calls import (
    RewardLogs,
    score_completions,
)
from mlx_grpo.core.rewards import (
    STANDARD_ARGUMENTS,
    Reward,
    RewardError,
    RewardSpecError,
    check_arguments,
    load_reward,
    load_rewards,
)
from mlx_grpo.core.step_rewards import logged_metrics
from mlx_grpo.tools.evaluate import evaluate

# Written as for TRL: no prompts/completion_ids parameters, keyword-only, async.
TRL_REWARDS = """
import asyncio


def correct(completions, answer, **kwargs):
    return [int(a) + len(c) / 100 for c, a in zip(completions, answer)]


def spaces(*, completions, **kwargs):
    return [float(c.count(" ")) for c in completions]


async def slow_length(completions, **kwargs):
    await asyncio.sleep(0)
    return [len(c) / 10 for c in completions]


def chat_length(completions, **kwargs):
    return [float(len(completion[0]["content"])) for completion in completions]


def assistant_turn(completions, **kwargs):
    return [float(len(c) == 1 and c[0]["role"] == "assistant") for c in completions]
"""


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture
def trl_file(tmp_path):
    path = tmp_path / "trl_rewards.py"
    path.write_text(TRL_REWARDS)
    return path


def run_once(quick_settings, data, rewards, **overrides):
    """Train 2 steps of 1 prompt x 4 completions; every completion lands in completions.jsonl."""
    settings = {**quick_settings, "data": str(data), "rewards": rewards, "prompts_per_step": 1}
    result = mlx_grpo.train(**{**settings, **overrides}, show_progress=False)
    records = read_jsonl(result.output_dir / "completions.jsonl")
    return read_jsonl(result.output_dir / "metrics.jsonl"), records


def assert_logged_scores(metrics, records, name, expected):
    """Each record's reward is `expected(record)`, each step's mean is their mean."""
    for record in records:
        assert record["rewards"][name] == pytest.approx(expected(record), rel=1e-6)
    for m in metrics:
        values = [expected(r) for r in records if r["step"] == m["step"]]
        assert len(values) == 4
        assert m[f"rewards/{name}/mean"] == pytest.approx(np.mean(values), rel=1e-6)


# --------------------------------------------------------------------------- TRL files train


def test_a_trl_reward_file_trains_unchanged(quick_settings, trl_file, tmp_path):
    answers = {f"Write a word about {thing}.": str(n) for n, thing in enumerate("abcdefgh")}
    data = write_jsonl(
        tmp_path / "answers.jsonl", [{"prompt": p, "answer": a} for p, a in answers.items()]
    )
    specs = [f"{trl_file}:{name}" for name in ("correct", "spaces", "slow_length")]
    metrics, records = run_once(quick_settings, data, specs)
    assert [m["step"] for m in metrics] == [1, 2]
    expected = {
        "correct": lambda r: int(answers[r["prompt"]]) + len(r["completion"]) / 100,
        "spaces": lambda r: r["completion"].count(" "),
        "slow_length": lambda r: len(r["completion"]) / 10,
    }
    for name, score in expected.items():
        assert_logged_scores(metrics, records, name, score)


def test_a_conversational_dataset_gives_completions_as_assistant_messages(
    quick_settings, trl_file, tmp_path
):
    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}]} for w in ("hi", "yes", "no")]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    specs = [f"{trl_file}:chat_length", f"{trl_file}:assistant_turn", "equation_format"]
    metrics, records = run_once(quick_settings, data, specs)
    assert all(isinstance(r["completion"], str) for r in records)  # the log shows the text
    assert_logged_scores(metrics, records, "chat_length", lambda r: len(r["completion"]))
    assert_logged_scores(metrics, records, "assistant_turn", lambda r: 1.0)
    assert_logged_scores(
        metrics, records, "equation_format", lambda r: equation_format([], [r["completion"]], [])[0]
    )


def test_builtin_rewards_read_chat_completions_like_text():
    texts = ["7 + 5 = 12", "<think>so</think> 12.", "twelve"]
    chats = [[{"role": "assistant", "content": t}] for t in texts]
    columns = {"answer": ["12"] * 3, "equation": ["7 + 5 = 12"] * 3}
    for fn in (arithmetic, equation_format, exact_answer, math_answer, think_format):
        as_text = fn(prompts=["q"] * 3, completions=texts, completion_ids=[[1]] * 3, **columns)
        as_chat = fn(prompts=["q"] * 3, completions=chats, completion_ids=[[1]] * 3, **columns)
        assert as_chat == as_text, fn.__name__
    assert arithmetic(prompts=[], completions=chats, completion_ids=[], **columns) == [1.0] * 2 + [
        0.0
    ]


# --------------------------------------------------------------------------- async

SOURCES = ["data/train.jsonl:1", "data/train.jsonl:1", "data/train.jsonl:7", "data/train.jsonl:7"]
COMPLETIONS = ["one", "two", "three", "a very bad completion"]


def score(*fns, columns=None, **kwargs):
    rewards = [Reward(fn.__name__, fn) for fn in fns]
    ids = [[1]] * len(COMPLETIONS)
    return score_completions(rewards, ["p"] * 4, COMPLETIONS, ids, columns or {}, SOURCES, **kwargs)


def test_async_rewards_of_a_batch_run_concurrently():
    ping_started, pong_started = asyncio.Event(), asyncio.Event()

    async def ping(completions, **kwargs):  # finishes only once pong has started
        ping_started.set()
        await asyncio.wait_for(pong_started.wait(), timeout=10)
        return [1.0] * len(completions)

    def plain(completions, **kwargs):
        return [2.0] * len(completions)

    async def pong(completions, **kwargs):
        pong_started.set()
        await asyncio.wait_for(ping_started.wait(), timeout=10)
        return [3.0] * len(completions)

    assert score(ping, plain, pong)[0].tolist() == [1.0, 2.0, 3.0]


def test_async_rewards_run_when_called_inside_a_running_event_loop():
    async def length(completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    async def notebook_cell():
        return score(length)  # a plain call, as train() inside Jupyter makes it

    assert asyncio.run(notebook_cell())[:, 0].tolist() == [3.0, 3.0, 5.0, 21.0]


def test_an_async_reward_failing_on_one_row_is_scored_zero_there():
    async def fragile(completions, **kwargs):
        return [1.0 / ("bad" not in c) for c in completions]

    logged = []
    out = score(fragile, on_error="zero", log=logged.append)
    assert out[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert [r["row"] for r in logged] == [SOURCES[3]]


# --------------------------------------------------------------------------- trainer_state


def test_trainer_state_tells_the_step_epoch_and_tokens_seen(quick_settings):
    states = []

    def progress(completions, trainer_state, **kwargs):
        states.append(trainer_state)
        return [0.0] * len(completions)

    settings = {**quick_settings, "rewards": [], "max_steps": 3}  # 2 of the 16 prompts a step
    result = mlx_grpo.train(**settings, reward_funcs=[progress], show_progress=False)
    assert [s.global_step for s in states] == [0, 1, 2]
    assert [s.epoch for s in states] == [0.0, 2 / 16, 4 / 16]
    assert {s.max_steps for s in states} == {3} and all(s.is_world_process_zero for s in states)
    seen = [0] + [m["num_tokens"] for m in result.metrics[:-1]]
    assert [s.num_input_tokens_seen for s in states] == seen and seen[1] > 0


def test_evaluation_passes_the_state_of_a_run_not_started(tiny_model_dir, tmp_path):
    path = tmp_path / "stateful.py"
    path.write_text(
        "def at_start(completions, trainer_state, **kwargs):\n"
        "    s = trainer_state\n"
        "    fresh = (s.global_step, s.max_steps, s.epoch, s.num_input_tokens_seen) == (0,) * 4\n"
        "    return [float(fresh and s.is_world_process_zero)] * len(completions)\n"
    )
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "hi"}, {"prompt": "yo"}])
    result = evaluate(
        str(tiny_model_dir),
        str(data),
        [f"{path}:at_start"],
        max_completion_length=4,
        show_progress=False,
    )
    assert [r["rewards"]["at_start"] for r in result.records] == [1.0, 1.0]


# --------------------------------------------------------------------------- log_extra, log_metric


def test_logged_columns_and_metrics_land_in_the_run_files(quick_settings):
    def longest(completions, log_extra, log_metric, **kwargs):
        lengths = [len(c) for c in completions]
        log_extra("length", lengths)
        log_metric("custom/bound", max(lengths))
        return [0.0] * len(completions)

    def shortest(completions, log_metric, **kwargs):
        log_metric("custom/bound", min(len(c) for c in completions))
        return [0.0] * len(completions)

    settings = {**quick_settings, "rewards": [], "prompts_per_step": 1}
    result = mlx_grpo.train(**settings, reward_funcs=[longest, shortest], show_progress=False)
    records = read_jsonl(result.output_dir / "completions.jsonl")
    metrics = read_jsonl(result.output_dir / "metrics.jsonl")
    assert records and all(r["length"] == len(r["completion"]) for r in records)
    for m in metrics:
        lengths = [r["length"] for r in records if r["step"] == m["step"]]
        assert m["custom/bound"] == pytest.approx((max(lengths) + min(lengths)) / 2)


def test_only_successful_calls_keep_what_they_logged():
    def fails_on_bad(completions, log_extra, log_metric, **kwargs):
        log_extra("seen", [c.upper() for c in completions])
        log_metric("calls", 1.0)
        return [1.0 / ("bad" not in c) for c in completions]

    logs = RewardLogs()
    score(fails_on_bad, on_error="skip", logs=logs)
    # the batch call failed; then one call per row, of which the last failed
    assert logs.extra == {"seen": ["ONE", "TWO", "THREE", None]}
    assert logs.metrics == {"calls": [1.0, 1.0, 1.0]}


def test_log_extra_needs_one_value_per_completion_and_a_free_name():
    def short(completions, log_extra, **kwargs):
        log_extra("note", ["only one"])
        return [0.0] * len(completions)

    def clobbers(completions, log_extra, **kwargs):
        log_extra("completion", list(completions))
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"'short' called log_extra\('note', ...\) with 1 values"):
        score(short)
    with pytest.raises(
        RewardError, match="'clobbers' called log_extra with the column 'completion'"
    ):
        score(clobbers)


def test_a_logged_metric_named_like_a_trainer_metric_is_refused():
    logs = RewardLogs(metrics={"loss": [1.0]}, owners={"loss": "mine"})
    run = SimpleNamespace(peers=Peers())
    with pytest.raises(RewardError, match="'mine' logged the metric 'loss'"):
        logged_metrics(run, logs, {"loss": 0.5})
    logs = RewardLogs(metrics={"a": [1.0, 2.0], "b": [4.0]})
    assert logged_metrics(run, logs, {"loss": 0.5}) == {"a": 1.5, "b": 4.0}


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "bad, why",
    [
        (1e39, "within float32 range"),
        (-1e39, "within float32 range"),
        (np.float64(3.5e38), "within float32 range"),
        (10**400, "finite number"),
        (math.inf, "finite number"),
        (math.nan, "finite number"),
        ("0.5", "finite number"),
    ],
)
def test_a_value_that_is_not_a_finite_float32_is_refused_naming_function_and_row(bad, why):
    def odd(completions, **kwargs):
        return [0.0, 0.0, bad, 0.0]

    with pytest.raises(RewardError) as info:
        score(odd)
    message = str(info.value)
    assert "'odd' returned" in message and why in message
    assert "row data/train.jsonl:7" in message and "'three'" in message


def test_an_async_reward_returning_the_wrong_length_is_refused():
    async def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(RewardError, match="'short' returned 1 values for 4 completions"):
        score(short)


# --------------------------------------------------------------------------- SystemExit

QUITTING = """import sys


def quits(completions, **kwargs):
    return [sys.exit(3) if "bad" in c else 1.0 for c in completions]


async def quits_later(completions, **kwargs):
    return [sys.exit(4) if "bad" in c else 1.0 for c in completions]
"""


@pytest.fixture
def quitting(tmp_path):
    path = tmp_path / "quitting.py"
    path.write_text(QUITTING)
    return path


@pytest.mark.parametrize("name, code, line", [("quits", 3, 5), ("quits_later", 4, 9)])
def test_sys_exit_in_a_reward_stops_with_the_function_file_and_line(quitting, name, code, line):
    reward = Reward(*load_reward(f"{quitting}:{name}"))
    logged = []
    with pytest.raises(RewardError) as info:
        score(reward.fn, on_error="raise", log=logged.append)
    message = str(info.value)
    assert f"reward function '{name}' raised on row data/train.jsonl:7" in message
    assert f"SystemExit: {code} at {quitting}:{line}" in message
    assert logged[0]["error"] == f"SystemExit: {code} at {quitting}:{line}"


@pytest.mark.parametrize("on_error, value", [("zero", 0.0), ("skip", math.nan)])
def test_sys_exit_in_a_reward_is_scored_like_an_exception(quitting, on_error, value):
    _, fn = load_reward(f"{quitting}:quits")
    logged = []
    out = score(fn, on_error=on_error, log=logged.append)[:, 0]
    assert out[:3].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_equal(out[3], np.float32(value))
    (record,) = logged
    assert record["row"] == SOURCES[3] and record["error"] == f"SystemExit: 3 at {quitting}:5"


def test_sys_exit_in_a_reward_during_training_is_a_reported_error(quick_settings, quitting):
    settings = {**quick_settings, "rewards": [f"{quitting}:quits"], "max_steps": 1}
    # every completion of this reward is "bad" for it
    quitting.write_text(QUITTING.replace('"bad" in c', "True"))
    result = CliRunner().invoke(main, ["train", *cli_flags(settings)])
    assert result.exit_code == 2, result.output  # not the reward's silent exit 3
    assert "reward function 'quits' raised on row" in result.output
    assert f"SystemExit: 3 at {quitting}:5" in result.output


def test_sys_exit_while_importing_a_reward_file_is_a_spec_error(tmp_path):
    path = tmp_path / "exits.py"
    path.write_text("import sys\n\nsys.exit(3)\n")
    with pytest.raises(RewardSpecError) as info:
        load_reward(f"{path}:f")
    message = str(info.value)
    assert f"reward file {path}" in message and "raised while being imported" in message
    assert f"SystemExit: 3 at {path}:3" in message
    assert not any(getattr(m, "__file__", None) == str(path) for m in list(sys.modules.values()))


# --------------------------------------------------------------------------- check_arguments


@pytest.mark.parametrize("column", STANDARD_ARGUMENTS)
def test_a_dataset_column_named_like_a_standard_argument_is_refused(column):
    with pytest.raises(RewardSpecError) as info:
        check_arguments(load_rewards(["think_format"]), ["answer", column], "data/train.jsonl")
    message = str(info.value)
    assert f"has a column {column!r}" in message and "data/train.jsonl" in message
    assert f"rename the column {column!r}" in message and "\n" not in message


def test_a_required_parameter_that_no_call_offers_is_refused(tmp_path):
    path = tmp_path / "needs.py"
    path.write_text("def needs(completions, answer, *, level, **kwargs):\n    return []\n")
    rewards = [Reward(*load_reward(f"{path}:needs"))]
    check_arguments(rewards, ["answer", "level"], "train.jsonl")  # both are columns: fine
    with pytest.raises(RewardSpecError) as info:
        check_arguments(rewards, ["answer"], "train.jsonl")
    message = str(info.value)
    assert f"reward function 'needs' ({path}:1) requires the argument 'level'" in message
    assert ", ".join(STANDARD_ARGUMENTS) in message and "columns of train.jsonl (answer)" in message
    assert "Add a 'level' column to the data" in message and "level=None" in message
    assert "\n" not in message


def test_check_arguments_accepts_defaults_and_refuses_functions_given_directly():
    def optional(completions, answer=None):
        return [0.0] * len(completions)

    def positional(prompts, completions, /):
        return []

    check_arguments([Reward("optional", optional)], [], "train.jsonl")
    with pytest.raises(RewardSpecError, match="'prompts' is positional-only"):
        check_arguments([Reward("positional", positional)], [], "train.jsonl")


def test_evaluate_refuses_a_dataset_column_named_like_a_standard_argument(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "hi", "completions": "x"}])
    with pytest.raises(RewardSpecError, match=f"rename the column 'completions' in {data}"):
        evaluate(str(tiny_model_dir), str(data), ["think_format"], show_progress=False)
