import dataclasses
import json

import pytest
import yaml
from conftest import cli_flags, run_cli

from mlx_grpo.core.config import TOPICS, TrainConfig
from mlx_grpo.core.rewards import BUILTIN_REWARDS, columns_read
from mlx_grpo.core.settings import resolve


def test_flags_override_the_yaml_file_which_overrides_defaults(quick_settings, tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump({**quick_settings, "max_steps": 5, "lora_rank": 2}))
    result = run_cli("train", "--config", str(config), "--max-steps", "1")
    assert result.exit_code == 0, result.output

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["max_steps"] == 1  # flag beats file
    assert saved["lora_rank"] == 2  # file beats default
    assert saved["epsilon"] == TrainConfig.epsilon  # default where nobody said
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1


def test_unknown_yaml_key_is_rejected_with_a_suggestion(tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text("learning_rat: 0.001\n")
    result = run_cli("train", "--config", str(config))
    assert result.exit_code == 2
    assert "unknown setting 'learning_rat'" in result.output
    assert "Did you mean 'learning_rate'?" in result.output
    assert "Traceback" not in result.output


def test_bad_data_row_names_file_and_line(quick_settings, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    result = run_cli("train", *cli_flags({**quick_settings, "data": str(data)}))
    assert result.exit_code == 2
    assert f"{data}:2" in result.output
    assert "Traceback" not in result.output


def test_failing_reward_names_the_function_and_row(quick_settings, tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "def broken(prompts, completions, completion_ids, **kw):\n"
        "    raise RuntimeError('cannot score this')\n"
    )
    settings = {**quick_settings, "rewards": [f"{module}:broken"]}
    result = run_cli("train", *cli_flags(settings))
    assert result.exit_code == 2
    assert "broken" in result.output and "cannot score this" in result.output
    assert "toy.jsonl:" in result.output  # the dataset row it failed on


def test_missing_reward_spec_is_a_clear_error(quick_settings):
    result = run_cli("train", *cli_flags({**quick_settings, "rewards": ["no_such_module:fn"]}))
    assert result.exit_code == 2
    assert "no_such_module" in result.output


def test_an_existing_run_is_not_overwritten_without_the_flag(quick_settings):
    assert run_cli("train", *cli_flags({**quick_settings, "max_steps": 1})).exit_code == 0
    again = run_cli("train", *cli_flags({**quick_settings, "max_steps": 1}))
    assert again.exit_code == 2 and "--overwrite" in again.output
    forced = run_cli("train", *cli_flags({**quick_settings, "max_steps": 1}), "--overwrite")
    assert forced.exit_code == 0


def test_every_setting_is_a_flag_with_help():
    result = run_cli("train", "--help")
    assert result.exit_code == 0
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in result.output


def test_resolve_coerces_types_and_checks_choices(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning-rate: '2e-5'\nlora_targets: q_proj,v_proj\nbeta: 1\n")
    cfg = resolve(config, max_steps="7")
    assert cfg.learning_rate == 2e-5 and cfg.max_steps == 7 and cfg.beta == 1.0
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="loss_type must be one of grpo, .*, got 'ppo'"):
        resolve(None, loss_type="ppo")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 must divide"):
        resolve(None, num_generations=4, gradient_accumulation_steps=3)
    with pytest.raises(ValueError, match="Did you mean 'num_generations'"):
        resolve(None, num_generation=4)


def test_demo_runs_offline_and_reports_the_reward_gain(tmp_path):
    result = run_cli("demo", "--output-dir", str(tmp_path / "demo"), "--max-steps", "4")
    assert result.exit_code == 0, result.output
    assert "mean reward, first" in result.output
    metrics = (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 4 and "reward" in json.loads(metrics[0])


def test_mlx_lm_generate_accepts_the_trained_adapter(quick_settings):
    import subprocess
    import sys

    assert run_cli("train", *cli_flags(quick_settings)).exit_code == 0
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            quick_settings["model"],
            "--adapter-path",
            quick_settings["output_dir"],
            "--prompt",
            "Reply with digits only.",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Generation: " in out.stdout


def test_example_configs_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        assert resolve(path).model  # every key known, every value of the right type


def test_every_setting_is_in_exactly_one_help_topic():
    listed = [name for names in TOPICS.values() for name in names]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(TrainConfig))


def test_train_help_groups_the_settings_by_topic():
    text = run_cli("train", "--help").output
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and line[0] != " "]
    assert headings[: len(TOPICS)] == list(TOPICS)
    for topic, names in TOPICS.items():
        section = text.split(f"\n{topic}:\n")[1].split("\n\n")[0]
        for name in names:
            assert "--" + name.replace("_", "-") in section, (topic, name)


def test_rewards_lists_every_builtin_with_the_columns_it_reads():
    text = run_cli("rewards").output
    entries = {block.split("\n")[0]: block for block in text.strip().split("\n") if block}
    for name, fn in BUILTIN_REWARDS.items():
        assert name in entries
        block = text.split(f"{name}\n", 1)[1].split("\n", 2)
        assert block[0].strip() == fn.__doc__.strip().splitlines()[0]
        columns = columns_read(fn)
        assert block[1].strip() == "reads: " + (", ".join(columns) or "no column")
    assert columns_read(BUILTIN_REWARDS["exact_answer"]) == ["equation"]
    assert columns_read(BUILTIN_REWARDS["think_format"]) == []


def test_a_model_kept_by_name_loads_by_that_name(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from mlx_grpo.core.models import fingerprint, named_model

    monkeypatch.setenv("MLX_GRPO_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_model_dir, tmp_path / "cache" / "models" / "tiny-named")
    monkeypatch.chdir(tmp_path)
    assert named_model("tiny-named") == str(tmp_path / "cache" / "models" / "tiny-named")
    assert fingerprint("tiny-named") == fingerprint(str(tiny_model_dir))
    result = run_cli("generate", "--model", "tiny-named", "--max-tokens", "2", "Hello")
    assert result.exit_code == 0, result.output
    (tmp_path / "tiny-named").mkdir()  # a local folder of the same name wins
    assert named_model("tiny-named") == "tiny-named"
    assert named_model("org/tiny-named") == "org/tiny-named"  # Hub ids are left alone
