"""Every value a command takes is checked before anything is written: a value no
user could mean exits with code 2 and one paragraph naming the flag or key, the
value, what is allowed and where it came from. List flags take repetition and
comma lists alike."""

import re
from pathlib import Path

import pytest
import yaml
from conftest import assert_refused, cli_flags, run_cli

from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.settings import resolve


def entries(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --------------------------------------------------------------------------- train


BAD_TRAIN_VALUES = [
    ("num_generations", "1", ">= 2"),
    ("lora_rank", "0", ">= 1"),
    ("lora_rank", "1e300", "at most 2147483647"),
    ("num_generations", "10000000000", "at most 2147483647"),
    ("lora_alpha", "0", "> 0"),
    ("lora_dropout", "1", "in [0, 1)"),
    ("learning_rate", "-1e-5", "> 0"),
    ("learning_rate", "nan", "> 0"),
    ("epsilon", "-0.2", "in (0, 1)"),
    ("epsilon", "1.5", "in (0, 1)"),
    ("beta", "-0.1", ">= 0"),
    ("beta", "inf", ">= 0"),
    ("temperature", "0", "> 0"),
    ("top_p", "0", "in (0, 1]"),
    ("top_p", "1.5", "in (0, 1]"),
    ("top_k", "-1", ">= 0"),
    ("min_p", "2", "in [0, 1)"),
    ("seed", "-1", "in [0, "),
    ("reward_weights", "nan", "must each be in [-3.40282e+38, 3.40282e+38]"),
    ("reward_weights", "1e300", "must each be in [-3.40282e+38, 3.40282e+38]"),
    ("max_steps", "0", ">= 1"),
    ("max_minutes", "0", "> 0"),
    ("max_completion_length", "0", ">= 1"),
    ("max_prompt_length", "0", ">= 1"),
    ("prompts_per_step", "0", ">= 1"),
    ("num_iterations", "0", ">= 1"),
    ("warmup_steps", "-1", ">= 0"),
    ("weight_decay", "-0.1", ">= 0"),
    ("adam_beta1", "1", "in [0, 1)"),
    ("adam_beta2", "-0.5", "in [0, 1)"),
    ("adam_epsilon", "0", "> 0"),
    ("max_grad_norm", "-1", ">= 0"),
    ("gradient_accumulation_steps", "0", ">= 1"),
    ("logits_chunk_size", "0", ">= 1"),
    ("logging_steps", "0", ">= 1"),
    ("save_steps", "-1", ">= 0"),
    ("save_total_limit", "-1", ">= 0"),
    ("max_nonfinite_updates", "0", ">= 1"),
    ("distributed_timeout", "0", "> 0"),
    ("lora_layers", "first:2", "all, last:N or indices"),
]


@pytest.mark.parametrize(
    "key, value, allowed", BAD_TRAIN_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_TRAIN_VALUES]
)
def test_a_train_flag_out_of_range_is_refused_naming_flag_value_and_range(
    quick_settings, key, value, allowed
):
    settings = {k: v for k, v in quick_settings.items() if k != "reward_weights"}
    flag = "--" + key.replace("_", "-")
    result = run_cli("train", *cli_flags({**settings, key: value}))
    assert_refused(result, f"{key} must", allowed, f"from the flag {flag}", f"pass {flag}")
    shown = re.search(r"got \[?'?([^ ,\]']+)", result.output).group(1)
    assert shown == value or float(shown) == pytest.approx(float(value), nan_ok=True)
    assert not Path(quick_settings["output_dir"]).exists()


def test_a_bad_value_in_a_yaml_file_names_the_file_and_line(quick_settings, tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text(
        yaml.safe_dump({"model": quick_settings["model"], "data": quick_settings["data"]})
        + "output_dir: "
        + quick_settings["output_dir"]
        + "\nlora_alpha: 0\n"
    )
    result = run_cli("train", "--config", config)
    assert_refused(result, "lora_alpha must be > 0, got 0.0", f"from {config}, line 4")
    assert f"change lora_alpha in {config}" in result.output
    assert not Path(quick_settings["output_dir"]).exists()


def test_settings_that_contradict_each_other_name_both_and_their_origins(quick_settings):
    result = run_cli("train", *cli_flags({**quick_settings, "epsilon_high": "0.1"}))
    assert_refused(
        result,
        "epsilon_high (0.1) must be >= epsilon (0.2)",
        "epsilon_high from the flag --epsilon-high",
        "epsilon from its default",
    )
    assert not Path(quick_settings["output_dir"]).exists()


@pytest.mark.parametrize(
    "changes, phrases",
    [
        (
            {"gradient_accumulation_steps": 2, "steps_per_generation": 3},
            ["steps_per_generation=3 must be a multiple of gradient_accumulation_steps=2",
             "raise prompts_per_step instead", "from the flag --steps-per-generation"],
        ),
        (
            {"steps_per_generation": 16},  # 2 prompts x 4 completions
            ["steps_per_generation=16 must divide prompts_per_step x num_generations = 8"],
        ),
    ],
    ids=["not-a-multiple", "more-slices-than-rows"],
)  # fmt: skip
def test_a_rollout_that_cannot_be_cut_into_updates_is_refused(quick_settings, changes, phrases):
    result = run_cli("train", *cli_flags({**quick_settings, **changes}))
    assert_refused(result, *phrases)
    assert not Path(quick_settings["output_dir"]).exists()


def test_a_lora_rank_beyond_the_adapted_modules_dimensions_is_refused(quick_settings):
    # The tiny model's k_proj and v_proj map 64 -> 48 features.
    result = run_cli("train", *cli_flags({**quick_settings, "lora_rank": 49}))
    assert_refused(result, "lora_rank 49 is more than the smallest dimension (48)", "at most 48")
    assert not Path(quick_settings["output_dir"]).exists()


def test_a_completion_longer_than_the_models_context_is_refused(quick_settings):
    # The tiny model's context is 4096 tokens; 100000000 once crashed the process.
    settings = {**quick_settings, "max_completion_length": 100_000_000}
    result = run_cli("train", *cli_flags(settings))
    assert_refused(
        result,
        "max_completion_length 100000000 leaves no room for a prompt",
        "context of 4096 tokens",
        "set --max-completion-length below 4096",
    )
    assert not Path(quick_settings["output_dir"]).exists()


@pytest.mark.parametrize(
    "text, phrase",
    [
        (b"lora_rank: 4\n\xff\xfe\n", "is not UTF-8 text"),
        (b"lora_rank: [4\n", "is not valid YAML"),
        (b"- 1\n- 2\n", "holds a list, not a mapping of settings"),
        (b"lora_rank: 4\nlora_rank: 8\n", "'lora_rank' is given twice (lines 1 and 2)"),
        (b"lora_rank: four\n", "lora_rank must be a whole number, got 'four'"),
    ],
    ids=["not-utf8", "not-yaml", "not-a-mapping", "duplicate-key", "wrong-type"],
)
def test_a_broken_yaml_file_is_refused_naming_the_file(tmp_path, text, phrase):
    config = tmp_path / "grpo.yaml"
    config.write_bytes(text)
    assert_refused(run_cli("train", "--config", config), str(config), phrase)
    assert entries(tmp_path) == {"grpo.yaml"}


# --------------------------------------------------------------------------- list flags


def test_comma_and_repeated_list_flags_resolve_alike(tmp_path):
    repeated = resolve(
        None,
        given_as="flag",
        rewards=["math_answer", "think_format", "mlx_grpo.tasks.toy:allowed_share"],
        reward_weights=["1.0", "0.2", "0.5"],
        lora_targets=["q_proj", "v_proj"],
    )
    comma = resolve(
        None,
        given_as="flag",
        rewards=["math_answer,think_format", "mlx_grpo.tasks.toy:allowed_share"],
        reward_weights=["1.0,0.2", "0.5"],
        lora_targets=["q_proj,v_proj"],
    )
    config = tmp_path / "grpo.yaml"
    config.write_text(
        "rewards: math_answer, think_format,mlx_grpo.tasks.toy:allowed_share\n"
        "reward_weights: [1.0, 0.2, 0.5]\nlora_targets: q_proj,v_proj\n"
    )
    assert repeated == comma == resolve(config)
    assert comma.rewards == ["math_answer", "think_format", "mlx_grpo.tasks.toy:allowed_share"]
    assert comma.reward_weights == [1.0, 0.2, 0.5]
    assert comma != TrainConfig()


def test_the_readme_reward_flags_train_with_both_rewards(quick_settings):
    """`--rewards a,b --reward-weights 1.0,0.2` as the README writes it, through the CLI."""
    out = Path(quick_settings["output_dir"])
    settings = {k: v for k, v in quick_settings.items() if k != "rewards"}
    flags = cli_flags({**settings, "max_steps": 1})
    rewards = "mlx_grpo.tasks.toy:allowed_share,think_format"
    result = run_cli("train", *flags, "--rewards", rewards, "--reward-weights", "1.0,0.2")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["rewards"] == ["mlx_grpo.tasks.toy:allowed_share", "think_format"]
    assert saved["reward_weights"] == [1.0, 0.2]


def test_help_says_list_flags_take_commas_or_repetition():
    for command in ("train", "eval"):
        text = " ".join(run_cli(command, "--help").output.split())
        assert "Repeat the flag or separate with commas" in text


# --------------------------------------------------------------------------- eval


@pytest.fixture
def eval_args(tiny_model_dir, toy_data):
    return [
        "--model",
        tiny_model_dir,
        "--data",
        toy_data,
        "--rewards",
        "mlx_grpo.tasks.toy:allowed_share",
    ]


@pytest.mark.parametrize(
    "extra, phrases",
    [
        (["--samples", "0"], ["--samples must be >= 1, got 0"]),
        (["--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
        (["--limit", "-1"], ["--limit must be >= 1, got -1"]),
        (["--temperature", "-1"], ["--temperature must be >= 0, got -1.0"]),
        (["--top-p", "0"], ["top_p must be in (0, 1], got 0.0 (from the flag --top-p)"]),
        (["--top-k", "-1"], ["top_k must be >= 0, got -1 (from the flag --top-k)"]),
        (["--min-p", "1"], ["min_p must be in [0, 1), got 1.0 (from the flag --min-p)"]),
        (["--max-tokens", "0"], ["max_completion_length must be >= 1, got 0"]),
        (
            ["--max-completion-length", "100000000"],
            ["--max-completion-length 100000000 does not fit", "4096"],
        ),
        (["--seed", "-3"], ["--seed must be in [0, "]),
        (["--success-threshold", "nan"], ["--success-threshold must be a finite number"]),
        (["--group-by", "kind"], ["--group-by 'kind'", "has that column", "allowed"]),
        (["--reward-weights", "1,2"], ["got 1 reward functions", "but 2 weights"]),
        (["--reward-weights", "x"], ["reward_weights must be a number, got 'x'"]),
        (["--samples", "2"], ["--samples > 1 needs sampling"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("--") else "",
)
def test_a_bad_eval_option_is_refused(eval_args, tmp_path, extra, phrases):
    out = tmp_path / "completions.jsonl"
    assert_refused(run_cli("eval", *eval_args, *extra, "--output", out), *phrases)
    assert not out.exists()


def test_eval_refuses_to_write_over_its_own_data_file(eval_args, toy_data):
    before = Path(toy_data).read_bytes()
    result = run_cli("eval", *eval_args, "--output", toy_data)
    assert_refused(result, f"--output {toy_data} is the --data file itself")
    assert Path(toy_data).read_bytes() == before


def test_eval_rewards_repeated_or_comma_separated_score_alike(eval_args, tmp_path):
    base, spec = eval_args[:-2], eval_args[-1]
    common = ["--limit", "2", "--max-tokens", "4"]
    repeated = run_cli(
        "eval", *base, "--rewards", spec, "--rewards", "think_format",
        "--reward-weights", "1", "--reward-weights", "0", *common, "-o", tmp_path / "a.jsonl",
    )  # fmt: skip
    comma = run_cli(
        "eval", *base, "--rewards", f"{spec},think_format", "--reward-weights", "1,0",
        *common, "-o", tmp_path / "b.jsonl",
    )  # fmt: skip
    assert repeated.exit_code == 0 and comma.exit_code == 0, repeated.output + comma.output
    table = comma.output.split("batch/s]")[-1]  # after the progress bar
    assert "accuracy" in table and table == repeated.output.split("batch/s]")[-1]
    assert "allowed_share" in comma.output and "think_format" in comma.output
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


@pytest.mark.parametrize(
    "flag, value", [("--top-p", "0"), ("--reward-weights", "x"), ("--max-completion-length", "0")]
)
def test_eval_reads_a_shared_setting_as_train_does(eval_args, quick_settings, flag, value):
    trained = run_cli("train", *cli_flags(quick_settings), flag, value)
    evaluated = run_cli("eval", *eval_args, flag, value)
    assert_refused(trained, flag)
    assert_refused(evaluated, flag)
    assert evaluated.output == trained.output


# --------------------------------------------------------------------------- other commands


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--max-tokens", "-5"], "max_completion_length must be >= 1, got -5"),
        (["--top-k", "x"], "top_k must be a whole number, got 'x' (from the flag --top-k)"),
        (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    ],
)
def test_a_bad_generate_option_is_refused(tiny_model_dir, extra, phrase):
    result = run_cli("generate", "--model", tiny_model_dir, *extra, "Hello")
    assert_refused(result, phrase)


@pytest.mark.parametrize(
    "command, extra, phrase",
    [
        ("quickstart", ["--minutes", "0"], "--minutes must be > 0, got 0.0"),
        ("quickstart", ["--minutes", "-3"], "--minutes must be > 0, got -3.0"),
        ("quickstart", ["--train-size", "0"], "--train-size must be >= 1, got 0"),
        ("quickstart", ["--test-size", "-1"], "--test-size must be >= 1, got -1"),
        ("demo", ["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        ("demo", ["--max-steps", "-2"], "--max-steps must be >= 1, got -2"),
    ],
)
def test_quickstart_and_demo_refuse_zero_or_negative_time_and_sizes(
    tmp_path, command, extra, phrase
):
    out = tmp_path / "out"
    assert_refused(run_cli(command, "--output-dir", out, *extra), phrase)
    assert not out.exists()


def test_generate_refuses_more_tokens_than_the_models_context(tiny_model_dir):
    result = run_cli("generate", "--model", tiny_model_dir, "--max-tokens", "100000000", "Hi")
    assert_refused(
        result, "--max-completion-length 100000000 does not fit", "context of 4096 tokens"
    )


def test_plot_never_writes_over_a_file_that_is_not_a_png(quick_settings, toy_data, tmp_path):
    run = Path(quick_settings["output_dir"])
    assert run_cli("train", *cli_flags({**quick_settings, "max_steps": 1})).exit_code == 0
    data_copy = tmp_path / "data.png"
    data_copy.write_bytes(Path(toy_data).read_bytes())  # a .png name, but not an image
    for target, phrase in ((toy_data, "give the plot a .png name"), (data_copy, "not a PNG")):
        before = Path(target).read_bytes()
        assert_refused(run_cli("plot", run, "-o", target), phrase)
        assert Path(target).read_bytes() == before
    assert run_cli("plot", run, "-o", tmp_path / "a.png").exit_code == 0
    assert run_cli("plot", run, "-o", tmp_path / "a.png").exit_code == 0  # its own plot: replaced


def test_a_bad_hub_repository_id_is_refused_before_the_export_is_written(
    quick_settings, tmp_path, hub_calls
):
    run = Path(quick_settings["output_dir"])
    assert run_cli("train", *cli_flags({**quick_settings, "max_steps": 1})).exit_code == 0
    out = tmp_path / "peft"
    flags = ["--base-model", "Qwen/Qwen3-0.6B", "--push-to-hub", "not a repo id"]
    result = run_cli("export", run, "-o", out, *flags)
    assert_refused(result, "--push-to-hub 'not a repo id' is not a Hub repository id")
    assert not out.exists() and hub_calls == []


def test_a_base_model_name_that_is_no_model_is_refused(quick_settings, tmp_path):
    run = Path(quick_settings["output_dir"])
    assert run_cli("train", *cli_flags({**quick_settings, "max_steps": 1})).exit_code == 0
    out = tmp_path / "peft"
    result = run_cli("export", run, "-o", out, "--base-model", "x\n---\nevil: true")
    assert_refused(result, "is neither a Hub model id (org/name")
    assert not out.exists()


def test_text_settings_cannot_inject_keys_into_the_saved_config(quick_settings):
    sneaky = "Be brief.\nlora_rank: 99\n---\nmodel: evil/model"
    settings = {**quick_settings, "system_prompt": sneaky, "max_steps": 1}
    assert run_cli("train", *cli_flags(settings)).exit_code == 0
    saved = resolve(Path(quick_settings["output_dir"]) / "config.yaml")
    assert saved.system_prompt == sneaky
    assert saved.lora_rank == quick_settings["lora_rank"] and saved.model == quick_settings["model"]


def test_a_large_seed_is_kept_exactly():
    assert resolve(None, given_as="flag", seed="9007199254740993").seed == 9007199254740993
    assert resolve(None, given_as="flag", seed=str(2**63 - 1)).seed == 2**63 - 1


def test_eval_never_writes_over_a_file_it_did_not_write(eval_args, tmp_path):
    config = tmp_path / "notes.jsonl"
    config.write_text('{"my": "notes"}\n')
    for target, phrase in (
        (tmp_path / "a.yaml", "give it a .jsonl name"),
        (config, "not an earlier"),
    ):
        before = target.read_bytes() if target.exists() else None
        assert_refused(run_cli("eval", *eval_args, "--limit", "1", "-o", target), phrase)
        assert (target.read_bytes() if target.exists() else None) == before
    out = tmp_path / "completions.jsonl"
    for _ in range(2):  # its own output is replaced
        assert (
            run_cli("eval", *eval_args, "--limit", "1", "--max-tokens", "2", "-o", out).exit_code
            == 0
        )


def test_resume_checks_flags_against_the_runs_own_settings(quick_settings):
    settings = {**quick_settings, "epsilon": 0.1, "epsilon_high": 0.15, "max_steps": 1}
    settings["save_steps"] = 1
    assert run_cli("train", *cli_flags(settings)).exit_code == 0
    out = quick_settings["output_dir"]
    # 0.15 >= the run's epsilon 0.1 (the default, 0.2, is not the run's)
    result = run_cli("train", "--resume", out, "--epsilon-high", "0.15", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    assert_refused(
        run_cli("train", "--resume", out, "--max-steps", "0"),
        "max_steps must be >= 1, got 0 (from the flag --max-steps)",
    )
