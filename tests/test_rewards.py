import math
import sys

import numpy as np
import pytest

import mlx_grpo  # noqa: F401  (loads OpenBLAS before anything imports mlx)
from mlx_grpo.core.reward_calls import (
    TrainerState,
    score_completions,
)
from mlx_grpo.core.rewards import (
    BUILTIN_REWARDS,
    Reward,
    RewardError,
    RewardSpecError,
    load_reward,
    load_rewards,
    math_answer,
    think_format,
)


def score_one(completion, answer):
    return math_answer(["q"], [completion], [[0]], answer=[answer])[0]


# --------------------------------------------------------------------------- math_answer


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("so the result is \\boxed{42}.", "42"),
        ("\\boxed{1} then again \\boxed{7}", "7"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{\\text{{about}} 12}", "12"),
        ("We get \\boxed{-\\dfrac{1}{2}} in the end", "-0.5"),
    ],
)
def test_math_answer_reads_the_last_boxed_answer_with_nested_braces(completion, answer):
    assert score_one(completion, answer) == 1.0


def test_math_answer_reads_the_last_answer_tag():
    assert score_one("<answer>3</answer> no wait <answer>5</answer> 9", "5") == 1.0


def test_math_answer_reads_the_gsm8k_marker_before_trailing_numbers():
    assert score_one("16 - 3 - 4 = 9\n#### 9\nChecked in 2 steps", "9") == 1.0


def test_math_answer_falls_back_to_the_final_number():
    assert score_one("She buys 3 apples, then 4 more, so 7 in total.", "7") == 1.0
    assert score_one("She buys 3 apples, then 4 more, so 7 in total.", "4") == 0.0


def test_math_answer_boxed_wins_over_other_formats():
    assert score_one("<answer>2</answer> #### 3 \\boxed{4} 5", "4") == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("The total is $1,234.", "1234"),
        ("#### 1,450,000", "... #### 1,450,000"),
        ("It grew by 50%.", "50"),
        ("The temperature is -12 degrees", "-12"),
        ("x = -3.25.", "-3.25"),
        ("each gets 3/4 of a pie", "0.75"),
        ("\\boxed{\\$18}", "18"),
    ],
)
def test_math_answer_normalises_number_formats(completion, answer):
    assert score_one(completion, answer) == 1.0


def test_math_answer_reads_a_gsm8k_reference_solution():
    reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert score_one("48 + 24 = 72", reference) == 1.0
    assert score_one("48 / 2 = 24", reference) == 0.0


def test_math_answer_accepts_numeric_reference_values():
    assert score_one("the answer is 72", 72) == 1.0
    assert score_one("the answer is 0.5", 0.5) == 1.0


def test_math_answer_reads_only_the_text_after_think():
    completion = "<think>Maybe \\boxed{5}? No, 6.</think>\nThe answer is 6."
    assert score_one(completion, "6") == 1.0
    assert score_one(completion, "5") == 0.0


def test_math_answer_reads_the_whole_text_when_think_is_not_closed():
    assert score_one("<think>adding up, the total is 11", "11") == 1.0


def test_math_answer_compares_with_a_small_tolerance():
    assert score_one("0.30000000000000004", "0.3") == 1.0
    assert score_one("18.001", "18") == 0.0


def test_math_answer_gives_zero_for_wrong_or_missing_numbers():
    assert score_one("\\boxed{17}", "18") == 0.0
    assert score_one("I do not know.", "18") == 0.0
    assert score_one("\\boxed{no idea} but 18", "18") == 0.0


def test_math_answer_gives_none_without_an_answer():
    assert math_answer(["q", "q"], ["1", "2"], [[0], [0]]) == [None, None]
    assert math_answer(["q", "q"], ["1", "2"], [[0], [0]], answer=[None, "2"]) == [None, 1.0]


def test_math_answer_warns_and_gives_none_for_unreadable_references():
    with pytest.warns(UserWarning, match="hold no number"):
        assert score_one("42", "\\pi") is None


def test_math_answer_accepts_chat_format_completions():
    completion = [{"role": "assistant", "content": "It is \\boxed{8}"}]
    assert score_one(completion, "8") == 1.0


# --------------------------------------------------------------------------- think_format


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>2+2 is 4</think>\nThe answer is 4.", 1.0),
        ("  <think>\nreasoning\n</think>\n\n4  ", 1.0),
        ("reasoning after a template-injected opening tag\n</think> 4", 1.0),
        ("The answer is 4.", 0.0),
        ("<think>reasoning</think>", 0.0),
        ("<think>reasoning</think>   \n", 0.0),
        ("<think>a</think> 4 <think>b</think> 5", 0.0),
        ("<think>a</think> 4 </think>", 0.0),
        ("<think>a <think>b</think> 4", 0.0),
        ("text first <think>a</think> 4", 0.0),
        ("<think>a</think> 4 <think>", 0.0),
    ],
)
def test_think_format_accepts_only_one_closed_think_block_then_an_answer(completion, expected):
    assert think_format(["q"], [completion], [[0]]) == [expected]


def test_builtin_rewards_ignore_unknown_columns():
    assert think_format(["q"], ["<think>a</think>b"], [[0]], answer=["1"], level=[3]) == [1.0]
    assert math_answer(["q"], ["1"], [[0]], answer=["1"], level=[3]) == [1.0]


# --------------------------------------------------------------------------- load_reward


REWARD_MODULE = """
def length_reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(c)) for c in completions]

def helper(x):
    return x

def too_few(prompts, completions):
    return [float(len(p)) for p in prompts]

def positional(prompts, completions, /, **kwargs):
    return []

def only_args(*args):
    return []

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("my_rewards", None)


def test_load_reward_finds_builtins():
    assert set(BUILTIN_REWARDS) >= {"math_answer", "think_format"}
    assert load_reward("math_answer") == ("math_answer", math_answer)


def test_load_reward_suggests_a_builtin_for_a_typo():
    with pytest.raises(RewardSpecError, match="Did you mean 'math_answer'") as info:
        load_reward("math_anwser")
    assert "module:function" in str(info.value)


def test_load_reward_imports_module_function(reward_module):
    name, fn = load_reward("my_rewards:length_reward")
    assert name == "length_reward"
    assert fn(["p"], ["abc"], [[1, 2, 3]]) == [3.0]


def test_load_reward_imports_relative_and_absolute_file_paths(reward_module):
    for spec in ["my_rewards.py:length_reward", f"{reward_module / 'my_rewards.py'}:length_reward"]:
        name, fn = load_reward(spec)
        assert name == "length_reward"
        assert fn(["p"], ["ab"], [[1, 2]]) == [2.0]


def test_load_reward_reports_a_missing_file(reward_module):
    with pytest.raises(RewardSpecError) as info:
        load_reward("nowhere/rewards.py:f")
    message = str(info.value)
    assert "nowhere/rewards.py" in message and "not found" in message
    assert str(reward_module) in message  # says where relative paths start


def test_load_reward_reports_a_missing_module(reward_module):
    with pytest.raises(RewardSpecError) as info:
        load_reward("no_such_module_xyz:f")
    message = str(info.value)
    assert "cannot import module 'no_such_module_xyz'" in message
    assert "PYTHONPATH" in message and "no_such_module_xyz.py:f" in message


def test_load_reward_names_a_missing_dependency_of_the_module(reward_module):
    (reward_module / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    with pytest.raises(RewardSpecError) as info:
        load_reward("needs_dep:f")
    message = str(info.value)
    assert "cannot import module 'needs_dep'" in message
    assert "No module named 'no_such_dependency_xyz'" in message
    sys.modules.pop("needs_dep", None)


def test_load_reward_lists_callables_when_the_attribute_is_missing(reward_module):
    with pytest.raises(RewardSpecError) as info:
        load_reward("my_rewards.py:length_rewards")
    message = str(info.value)
    assert "no attribute 'length_rewards'" in message
    assert "Did you mean 'length_reward'" in message
    assert "helper" in message and "too_few" in message and "only_args" in message
    assert "NOT_A_FUNCTION" not in message.split("Callables it defines:")[1]


def test_load_reward_rejects_something_not_callable(reward_module):
    with pytest.raises(RewardSpecError, match="'NOT_A_FUNCTION'.* is the int 3, not a function"):
        load_reward("my_rewards:NOT_A_FUNCTION")


@pytest.mark.parametrize(
    "attr, why",
    [
        ("positional", "its parameter 'prompts' is positional-only"),
        ("only_args", "it takes no keyword arguments"),
    ],
)
def test_load_reward_rejects_a_function_that_cannot_be_called_by_keyword(reward_module, attr, why):
    with pytest.raises(RewardSpecError) as info:
        load_reward(f"my_rewards:{attr}")
    message = str(info.value)
    assert f"reward function {attr}(" in message and why in message
    assert f"{reward_module / 'my_rewards.py'}:" in message  # where it is defined
    assert "called by keyword" in message and "def f(completions, answer, **kwargs)" in message


def test_load_reward_accepts_any_subset_of_the_arguments(reward_module):
    # `x` may be a dataset column: only check_arguments, knowing the columns, can refuse it
    assert load_reward("my_rewards:helper")[0] == "helper"
    _, too_few = load_reward("my_rewards:too_few")
    scores = score_completions(
        [Reward("too_few", too_few)], ["ab", "abc"], ["1", "2"], [[1], [2]], {}, SOURCES[:2]
    )
    assert scores[:, 0].tolist() == [2.0, 3.0]


def test_load_reward_accepts_dataset_columns_as_named_parameters(tmp_path):
    (tmp_path / "by_column.py").write_text(
        "def matches(prompts, completions, completion_ids, answer):\n"
        "    return [float(c == a) for c, a in zip(completions, answer)]\n"
    )
    _, fn = load_reward(f"{tmp_path / 'by_column.py'}:matches")
    scores = score_completions(
        [Reward("matches", fn)], ["q"], ["4"], [[1]], {"answer": ["4"]}, ["1"]
    )
    assert scores.tolist() == [[1.0]]


def test_load_reward_runs_a_file_that_defines_a_dataclass(tmp_path):
    # with string annotations, dataclasses look their module up in sys.modules
    (tmp_path / "with_dataclass.py").write_text(
        "from __future__ import annotations\n\nfrom dataclasses import dataclass\n\n"
        "@dataclass\nclass Target:\n    text: str\n\n"
        "def exact(prompts, completions, completion_ids, **kwargs):\n"
        "    return [float(c == Target('4').text) for c in completions]\n"
    )
    _, fn = load_reward(f"{tmp_path / 'with_dataclass.py'}:exact")
    assert fn(["q", "q"], ["4", "5"], [[1], [2]]) == [1.0, 0.0]


def test_load_reward_reports_a_file_that_fails_to_import(tmp_path):
    (tmp_path / "broken.py").write_text("import math\n1 / 0\n")
    with pytest.raises(RewardSpecError, match="raised while being imported: ZeroDivisionError"):
        load_reward(f"{tmp_path / 'broken.py'}:f")


def test_load_rewards_defaults_weights_to_one_and_keeps_given_weights():
    rewards = load_rewards(["math_answer", "think_format"])
    assert [(r.name, r.weight) for r in rewards] == [("math_answer", 1.0), ("think_format", 1.0)]
    assert load_rewards(["think_format"], [0.25])[0].weight == 0.25


def test_load_rewards_rejects_a_weight_count_mismatch():
    with pytest.raises(ValueError, match="2 reward functions .* but 1 weights"):
        load_rewards(["math_answer", "think_format"], [1.0])


def test_load_rewards_keeps_duplicate_names_apart():
    rewards = load_rewards(["think_format", "think_format"], [1.0, 2.0])
    assert [r.name for r in rewards] == ["think_format", "think_format_2"]


def test_load_rewards_rejects_non_finite_weights():
    with pytest.raises(RewardSpecError, match="must be a finite number"):
        load_rewards(["think_format"], [math.nan])


# --------------------------------------------------------------------------- score_completions

SOURCES = ["data/train.jsonl:1", "data/train.jsonl:1", "data/train.jsonl:7", "data/train.jsonl:7"]
COMPLETIONS = ["one", "two", "three", "a very bad completion"]


def score(fn, columns=None):
    reward = Reward(name=fn.__name__, fn=fn)
    ids = [[1]] * len(COMPLETIONS)
    return score_completions([reward], ["p"] * 4, COMPLETIONS, ids, columns or {}, SOURCES)


def test_score_completions_returns_float32_scores_with_nan_for_none():
    def half(prompts, completions, completion_ids, **kwargs):
        return [1, None, 0.5, True]

    def lengths(prompts, completions, completion_ids, **kwargs):
        return np.array([len(c) for c in completions])

    rewards = [Reward("half", half), Reward("lengths", lengths, weight=3.0)]
    out = score_completions(rewards, ["p"] * 4, COMPLETIONS, [[1]] * 4, {}, SOURCES)
    assert out.dtype == np.float32 and out.shape == (4, 2)
    assert out[0, 0] == 1.0 and math.isnan(out[1, 0]) and out[2, 0] == 0.5 and out[3, 0] == 1.0
    assert out[:, 1].tolist() == [3.0, 3.0, 5.0, 21.0]  # weights not applied


def test_score_completions_calls_each_function_once_by_keyword_with_everything():
    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        return [0.0] * len(kwargs["completions"])

    columns = {"answer": ["1", "1", "2", "2"], "level": [1, 1, 3, 3]}
    score(record, columns)
    (call,) = calls
    assert list(call) == [
        "prompts",
        "completions",
        "completion_ids",
        "answer",
        "level",
        "trainer_state",
        "log_extra",
        "log_metric",
    ]
    assert call["completions"] == COMPLETIONS and call["prompts"] == ["p"] * 4
    assert call["completion_ids"] == [[1]] * 4
    assert {k: call[k] for k in columns} == columns
    assert call["trainer_state"] == TrainerState()
    assert callable(call["log_extra"]) and callable(call["log_metric"])


def test_score_completions_passes_only_named_arguments_to_functions_without_kwargs():
    def strict(answer, completions):  # any order, any subset
        return [float(a) + len(c) / 100 for a, c in zip(answer, completions)]

    out = score(strict, {"answer": ["1", "1", "2", "2"], "level": [1, 1, 3, 3]})
    assert out[:, 0].tolist() == pytest.approx([1.03, 1.03, 2.05, 2.21])


def test_a_required_column_no_row_of_the_batch_has_gets_none_for_each_row():
    def needs_answer(completions, answer):
        return [0.0 if a is None else 1.0 for a in answer]

    assert score(needs_answer)[:, 0].tolist() == [0.0] * 4


def test_score_completions_scores_math_answer_against_the_answer_column():
    rewards = load_rewards(["math_answer"])
    completions = ["\\boxed{4}", "5"]
    out = score_completions(
        rewards, ["q", "q"], completions, [[1], [2]], {"answer": ["#### 4", "#### 4"]}, SOURCES[:2]
    )
    assert out[:, 0].tolist() == [1.0, 0.0]


def test_a_raising_reward_names_the_function_row_and_completion():
    def fragile(prompts, completions, completion_ids, **kwargs):
        return [1.0 / (len(c) - 21) for c in completions]

    with pytest.raises(RewardError) as info:
        score(fragile)
    message = str(info.value)
    assert "'fragile'" in message and "data/train.jsonl:7" in message
    assert "a very bad completion" in message and "ZeroDivisionError" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_a_reward_returning_the_wrong_length_says_expected_and_got():
    def short(prompts, completions, completion_ids, **kwargs):
        return [1.0]

    with pytest.raises(RewardError, match="'short' returned 1 values for 4 completions") as info:
        score(short)
    assert "data/train.jsonl:1" in str(info.value) and "expected 4" in str(info.value)


def test_a_reward_returning_a_non_list_is_an_error():
    def scalar(prompts, completions, completion_ids, **kwargs):
        return 1.0

    with pytest.raises(RewardError, match="'scalar' returned a float; it must return a list"):
        score(scalar)


@pytest.mark.parametrize("bad", ["high", math.nan, [1.0]])
def test_a_reward_returning_a_non_number_names_the_function_and_row(bad):
    def odd(prompts, completions, completion_ids, **kwargs):
        return [0.0, 0.0, bad, 0.0]

    with pytest.raises(RewardError) as info:
        score(odd)
    message = str(info.value)
    assert "'odd'" in message and "data/train.jsonl:7" in message and "'three'" in message
    assert "or None" in message


# --------------------------------------------------------------------------- reward failures


def fails_on_bad(prompts, completions, completion_ids, **kwargs):
    return [1.0 / ("bad" not in c) for c in completions]  # ZeroDivisionError on "bad"


def score_with(on_error, fn=fails_on_bad, logged=None):
    """Scores of COMPLETIONS by `fn` alone, and what was logged about its failures."""
    logged = [] if logged is None else logged
    out = score_completions(
        [Reward(fn.__name__, fn)],
        ["p"] * 4,
        COMPLETIONS,
        [[1]] * 4,
        {},
        SOURCES,
        on_error=on_error,
        log=logged.append,
    )
    return out[:, 0], logged


@pytest.mark.parametrize("on_error, value", [("zero", 0.0), ("skip", math.nan)])
def test_a_failing_reward_scores_the_offending_completion_zero_or_none(on_error, value):
    scores, logged = score_with(on_error)
    assert scores[:3].tolist() == [1.0, 1.0, 1.0]  # the others keep their values
    np.testing.assert_equal(scores[3], np.float32(value))
    (record,) = logged
    assert record["function"] == "fails_on_bad" and record["row"] == SOURCES[3]
    assert record["completion"] == COMPLETIONS[3] and record["action"] == on_error
    assert "ZeroDivisionError" in record["error"]
    assert "Traceback" in record["traceback"] and "fails_on_bad" in record["traceback"]


def test_a_failing_reward_with_raise_logs_the_completion_and_stops():
    logged = []
    with pytest.raises(RewardError, match="'fails_on_bad' raised on row data/train.jsonl:7"):
        score_with("raise", logged=logged)
    assert logged[0]["completion"] == COMPLETIONS[3] and "ZeroDivisionError" in logged[0]["error"]


def test_a_reward_returning_a_non_number_is_a_failure_too():
    def text_for_bad(prompts, completions, completion_ids, **kwargs):
        return ["oops" if "bad" in c else 0.5 for c in completions]

    scores, logged = score_with("zero", text_for_bad)
    assert scores.tolist() == [0.5, 0.5, 0.5, 0.0]
    assert len(logged) == 1 and logged[0]["row"] == SOURCES[3]
