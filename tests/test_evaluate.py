import itertools
import json

import pytest
from click.testing import CliRunner
from conftest import run_cli

from mlx_grpo.cli import main
from mlx_grpo.core.builtin_rewards import arithmetic, equation_format, exact_answer
from mlx_grpo.core.evaluation import pass_at_k, summarize
from mlx_grpo.tasks.arithmetic import ALL_KINDS, all_problems, make_split, write_split
from mlx_grpo.tools.evaluate import EvalResult, compare_with, evaluate
from mlx_grpo.tools.generate import generate


def test_arithmetic_rewards_check_value_format_and_both():
    completions = [
        "7 + 5 = 12",
        " 7 + 5 = 12.\n",
        "12",
        "7 + 5 = 13",
        "The sum is 12.",
        "7 + 5 = 12 because",
        "47 - 85 = -38",
        "7 + 5 = 12",
    ]
    answers = ["12", "12", "12", "12", "12", "12", "-38", "12"]
    equations = ["7 + 5 = 12"] * 6 + ["47 - 85 = -38", "3 + 9 = 12"]
    assert arithmetic([], completions, [], answer=answers) == [1, 1, 1, 0, 1, 1, 1, 1]
    assert equation_format([], completions, []) == [1, 1, 0, 1, 0, 0, 1, 1]
    assert exact_answer([], completions, [], equation=equations) == [1, 1, 0, 0, 0, 0, 1, 0]
    assert arithmetic([], ["12"], []) == [None] and exact_answer([], ["12"], []) == [None]


def test_problem_sets_are_seeded_disjoint_and_balanced():
    train, test = make_split(400, 100, seed=3)
    assert (train, test) == make_split(400, 100, seed=3)
    assert make_split(400, 100, seed=4)[1] != test
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    assert sum(r["kind"] == "add1" for r in test) == 50
    for row in train + test:
        expression = row["prompt"].split("What is ")[1].split("?")[0]
        assert str(eval(expression)) == row["answer"]  # the answer is the arithmetic truth
        assert row["equation"] == f"{expression} = {row['answer']}"


def test_every_kind_has_the_operands_and_operators_it_names():
    operands = {"add1": range(10), "add2": range(10, 100), "addsub2": range(10, 100)}
    operators = {"add1": {"+"}, "add2": {"+"}, "addsub2": {"+", "-"}}
    for kind in ALL_KINDS:
        problems = all_problems(kind)
        terms = [r["equation"].split(" = ")[0].split() for r in problems]
        assert {t[1] for t in terms} == operators[kind]
        assert {int(t[0]) for t in terms} == {int(t[2]) for t in terms} == set(operands[kind])
        assert (
            len(problems)
            == len({r["prompt"] for r in problems})
            == len(operands[kind]) ** 2 * len(operators[kind])
        )
    _, test = make_split(400, 100, seed=3, kinds=("add1", "add2"))
    assert {r["kind"] for r in test} == {"add1", "add2"}
    with pytest.raises(ValueError, match="use one of add1, add2, addsub2"):
        all_problems("mul1")


def test_pass_at_k_matches_counting_every_subset():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (4, 4, 2), (7, 3, 7)]:
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        expected = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.fixture
def reward_file(tmp_path):
    # Correct when the completion's first character is a lowercase letter.
    path = tmp_path / "first_char.py"
    path.write_text(
        "def lower_first(prompts, completions, completion_ids, **kw):\n"
        "    return [1.0 if c[:1].islower() else 0.0 for c in completions]\n"
    )
    return f"{path}:lower_first"


def test_greedy_eval_scores_what_the_model_generates(tiny_model_dir, reward_file, tmp_path):
    _, test = write_split(tmp_path / "task", 0, 6, seed=1)
    out = tmp_path / "eval.jsonl"
    result = evaluate(
        str(tiny_model_dir),
        str(test),
        [reward_file],
        max_completion_length=6,
        group_by="kind",
        output=out,
        show_progress=False,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and result.records == records
    for r in records:
        assert r["rewards"]["lower_first"] == (1.0 if r["completion"][:1].islower() else 0.0)
    assert result.summary["all"]["accuracy"] == pytest.approx(
        sum(r["correct"] for r in records) / 6
    )
    assert result.summary["add1"]["prompts"] == 3 and result.summary["add2"]["prompts"] == 3
    # Batched greedy decoding gives what generating each prompt alone gives.
    first = json.loads(test.read_text().splitlines()[0])["prompt"]
    alone = generate(str(tiny_model_dir), first, max_completion_length=6)
    assert records[0]["completion"] == alone


def test_sampled_eval_reports_pass_at_k(tiny_model_dir, reward_file, tmp_path):
    _, test = write_split(tmp_path / "task", 0, 4, seed=2)
    result = evaluate(
        str(tiny_model_dir),
        str(test),
        [reward_file],
        num_samples=4,
        temperature=1.0,
        max_completion_length=4,
        show_progress=False,
    )
    figures = result.summary["all"]
    assert len(result.records) == 16
    assert figures["pass@1"] == pytest.approx(figures["accuracy"])
    assert figures["pass@4"] >= figures["pass@1"]
    with pytest.raises(ValueError, match="needs sampling"):
        evaluate(str(tiny_model_dir), str(test), [reward_file], num_samples=2)


def test_eval_command_prints_the_table(tiny_model_dir, tmp_path):
    _, test = write_split(tmp_path / "task", 0, 4, seed=2)
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(test),
            "--rewards",
            "arithmetic",
            "--max-tokens",
            "4",
            "--group-by",
            "kind",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "accuracy" in lines[-4] and lines[-3].startswith("all")
    assert any(line.startswith("add1") for line in lines)


def test_a_training_mix_changes_the_kinds_shares_and_not_the_held_out_set():
    train, test = make_split(400, 100, seed=3, mix=(1, 3))
    assert test == make_split(400, 100, seed=3)[1]
    assert sum(r["kind"] == "add1" for r in train) == 100  # a quarter of 400
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    only_two_digit, _ = make_split(40, 100, seed=3, mix=(0, 1))
    assert {r["kind"] for r in only_two_digit} == {"add2"}
    with pytest.raises(ValueError, match="one share >= 0 per kind"):
        make_split(10, 10, mix=(1,))


def test_holding_out_more_than_half_of_a_kind_is_refused():
    with pytest.raises(ValueError, match="more than half of the 100"):
        make_split(10, 200)


def test_summary_has_every_group_and_each_reward_mean():
    def record(source, kind, exact, right):
        return {
            "source": source,
            "columns": {"kind": kind},
            "correct": bool(exact),
            "reward": float(exact),
            "truncated": False,
            "rewards": {"exact_answer": float(exact), "arithmetic": right},
        }

    records = [
        record("a:1", "add1", 1, 1),
        record("a:2", "add1", 0, 1),
        record("a:3", "addsub2", 0, 0),
        record("a:4", "addsub2", 0, None),
    ]
    summary = summarize(records, 1, "kind")
    assert list(summary) == ["all", "add1", "addsub2"]
    assert summary["add1"]["accuracy"] == 0.5 and summary["add1"]["arithmetic"] == 1.0
    assert summary["addsub2"]["arithmetic"] == 0.0  # None is left out, not counted as 0
    assert summary["all"]["accuracy"] == 0.25 and summary["all"]["prompts"] == 4


def test_a_completion_no_reward_scored_has_no_reward_as_in_training(tiny_model_dir, tmp_path):
    """One rule for training and eval: an all-None completion is left out, not scored 0."""
    path = tmp_path / "half.py"
    path.write_text(  # scores odd rows 2.0, and none of the even ones
        "def odd_only(completions, **kw):\n"
        "    return [2.0 if i % 2 else None for i in range(len(completions))]\n"
    )
    _, test = write_split(tmp_path / "task", 0, 4, seed=1)
    result = evaluate(
        str(tiny_model_dir),
        str(test),
        [f"{path}:odd_only"],
        max_completion_length=2,
        show_progress=False,
    )
    rewards = [r["reward"] for r in result.records]
    assert rewards == [None, 2.0, None, 2.0]
    assert [r["correct"] for r in result.records] == [False, True, False, True]
    assert result.summary["all"]["mean_reward"] == 2.0  # not (0 + 2 + 0 + 2) / 4


def test_compare_prints_the_change_from_an_earlier_evaluation_per_group_and_reward(tmp_path):
    def record(source, kind, exact, right):
        return {
            "source": source,
            "sample": 0,
            "completion": "x",
            "columns": {"kind": kind},
            "correct": bool(exact),
            "reward": float(exact),
            "truncated": False,
            "rewards": {"exact_answer": float(exact), "arithmetic": float(right)},
        }

    before = [record("a:1", "add1", 0, 1), record("a:2", "addsub2", 0, 0)]
    after = [record("a:1", "add1", 1, 1), record("a:2", "addsub2", 0, 1)]
    path = tmp_path / "before.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in before))
    result = EvalResult(summarize(after, 1, "kind"), after, "kind", 1)
    lines = compare_with(result, path).splitlines()
    assert lines[0] == f"change from {path}"
    changes = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in lines[1:]}
    assert set(changes) == {"all", "add1", "addsub2"}
    assert "accuracy 0 -> 0.5 (+0.5)" in changes["all"]
    assert "accuracy 0 -> 1 (+1)" in changes["add1"]
    assert "arithmetic 0 -> 1 (+1)" in changes["addsub2"]
    assert "exact_answer 0 -> 0 (+0)" in changes["addsub2"]


def test_compare_refuses_a_file_that_is_no_evaluation(tmp_path):
    other = tmp_path / "notes.jsonl"
    other.write_text('{"text": "hello"}\n')
    result = EvalResult({"all": {"accuracy": 1.0}}, [])
    with pytest.raises(ValueError, match="is not an evaluation's output"):
        compare_with(result, other)


def test_eval_shows_the_mean_of_a_single_reward_function_too():
    records = [
        {"source": "a:1", "columns": {}, "correct": True, "reward": 2.0, "truncated": False,
         "rewards": {"double": 2.0}},
        {"source": "a:2", "columns": {}, "correct": False, "reward": 0.0, "truncated": False,
         "rewards": {"double": 0.0}},
    ]  # fmt: skip
    summary = summarize(records, 1, None)
    assert summary["all"]["double"] == 1.0 and summary["all"]["mean_reward"] == 1.0


def test_eval_compare_on_the_command_line(tiny_model_dir, tmp_path):
    _, test = write_split(tmp_path / "task", 0, 4, seed=1)
    common = ["eval", "--model", tiny_model_dir, "--data", test, "--rewards", "arithmetic"]
    common += ["--max-tokens", "2", "--group-by", "kind"]
    first = run_cli(*common, "-o", tmp_path / "before.jsonl")
    assert first.exit_code == 0, first.output
    second = run_cli(*common, "--compare", tmp_path / "before.jsonl")
    assert second.exit_code == 0, second.output
    assert f"change from {tmp_path / 'before.jsonl'}" in second.output
    assert "accuracy" in second.output.split("change from")[1]
    assert "(+0)" in second.output  # the same greedy model: nothing changed
