"""Bad inputs to `mlx-grpo train`: each one exits with code 2 and a one-paragraph
message saying what is wrong, where and how to fix it, and nothing is written."""

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import assert_refused, cli_flags, tree

from mlx_grpo.cli import main
from mlx_grpo.core.data import DataError


def train(*args):
    # Exceptions other than SystemExit propagate, so a traceback fails the test loudly.
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def refused(settings, *phrases, extra=()):
    """Run train with `settings`; it must refuse with `phrases` and leave no output dir."""
    assert_refused(train(*cli_flags(settings), *extra), *phrases)
    assert not Path(settings["output_dir"]).exists()


@pytest.fixture
def settings(quick_settings):
    return {**quick_settings, "max_steps": 1}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --------------------------------------------------------------------------- model


def test_a_missing_model_directory_is_refused(settings):
    refused(
        {**settings, "model": "/path/that/does/not/exist"},
        "model directory /path/that/does/not/exist does not exist",
        "pass --model a local model directory or a Hugging Face id",
    )


def garbage_config(folder, tiny_model_dir):
    (folder / "config.json").write_text("{not json")
    return [f"{folder / 'config.json'} is not valid JSON", "at line 1, column 2"]


def no_weights(folder, tiny_model_dir):
    for file in tiny_model_dir.glob("*.json"):
        shutil.copy(file, folder / file.name)
    return [f"model directory {folder} has no weights", "Copy the model's model*.safetensors"]


def no_tokenizer(folder, tiny_model_dir):
    for file in [*tiny_model_dir.glob("*.safetensors"), tiny_model_dir / "config.json"]:
        shutil.copy(file, folder / file.name)
    return [f"model directory {folder} has no tokenizer", "Copy the model's tokenizer files"]


def garbage_tokenizer(folder, tiny_model_dir):
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    (folder / "tokenizer.json").write_text('{"model": ')
    return [f"{folder / 'tokenizer.json'} is not valid JSON", "restore the model's original"]


@pytest.mark.parametrize("break_it", [garbage_config, no_weights, no_tokenizer, garbage_tokenizer])
def test_a_broken_model_directory_is_refused(settings, tiny_model_dir, tmp_path, break_it):
    folder = tmp_path / "model"
    folder.mkdir()
    phrases = break_it(folder, tiny_model_dir)
    refused({**settings, "model": str(folder)}, *phrases, "point --model at the complete model")


# --------------------------------------------------------------------------- data


def test_a_missing_dataset_file_is_refused(settings, tmp_path):
    path = tmp_path / "missing.jsonl"
    refused(
        {**settings, "data": str(path)}, f"prompt file '{path}' does not exist", "Check the path"
    )


def test_an_empty_dataset_file_is_refused(settings, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    refused({**settings, "data": str(path)}, f"{path} holds no rows", "one JSON object a line")


def test_a_dataset_that_is_not_utf8_text_is_refused(settings, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "café"}\n'.encode("latin-1"))
    refused(
        {**settings, "data": str(path)},
        f"{path} is not UTF-8 text (byte 15 is 0xe9)",
        "save it as UTF-8",
    )


def test_invalid_json_names_the_line_and_column(settings, tmp_path):
    rows = ['{"prompt": "a"}', '{"prompt": "b"}', '{"prompt": "c",}', '{"prompt": "d"}']
    path = write_lines(tmp_path / "bad.jsonl", rows)
    refused(
        {**settings, "data": str(path)},
        f"{path}:3: invalid JSON",
        "at column 16",
        "Each line must be one complete JSON object",
    )


def test_a_missing_prompt_column_suggests_the_one_the_rows_have(settings, tmp_path):
    path = write_lines(tmp_path / "q.jsonl", ['{"question": "2+2?"}'])
    refused(
        {**settings, "data": str(path), "prompt_column": "prompt"},
        f"{path}:1: no 'prompt' column",
        "the row has ['question']",
        "Did you mean --prompt-column question?",
    )


def test_an_empty_prompt_names_its_row(settings, tmp_path):
    rows = ['{"prompt": "a"}', '{"prompt": "b"}', '{"prompt": ""}']
    path = write_lines(tmp_path / "e.jsonl", rows)
    refused(
        {**settings, "data": str(path)},
        f"{path}:3: the 'prompt' column is empty",
        "write a prompt there or delete that row",
    )


def test_a_prompt_longer_than_the_models_context_is_refused(
    settings, tiny_model_dir, toy_data, tmp_path
):
    model = tmp_path / "short-context"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    # 16 positions less the 8 of a completion leave 8 for the prompt.
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    refused(
        {**settings, "model": str(model)},
        f"{toy_data}:1: the prompt has",
        "more than the limit of 8",
        "max_position_embeddings",
        "use a model with a longer context",
    )


def test_a_prompt_longer_than_max_prompt_length_is_refused(settings, toy_data):
    refused(
        {**settings, "max_prompt_length": 5},
        f"{toy_data}:1: the prompt has",
        "more than the limit of 5",
        "raise --max-prompt-length",
    )


# --------------------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    "spec, phrases",
    [
        ("math_answr", ["unknown reward 'math_answr'", "Did you mean 'math_answer'?"]),
        ("path/missing.py:fn", ["reward file 'path/missing.py'", "not found: looked at"]),
    ],
)
def test_a_reward_that_cannot_be_found_is_refused(settings, tmp_path, monkeypatch, spec, phrases):
    monkeypatch.chdir(tmp_path)  # so the relative path is looked up in an empty folder
    fix = "Built-in rewards:" if ":" not in spec else "check the path or give an absolute one"
    refused({**settings, "rewards": [spec]}, *phrases, fix)


def test_a_reward_that_is_not_callable_is_refused(settings, tmp_path):
    module = tmp_path / "score.py"
    module.write_text("SCORE = 3\n")
    refused(
        {**settings, "rewards": [f"{module}:SCORE"]},
        f"'SCORE' in {module} is the int 3, not a function",
        "point the spec at a function f(prompts, completions, completion_ids, **kwargs)",
    )


def test_a_reward_with_the_wrong_signature_is_refused(settings, tmp_path):
    module = tmp_path / "sig.py"
    module.write_text("def f(x):\n    return [0.0]\n")
    refused(
        {**settings, "rewards": [f"{module}:f"]},
        f"reward function 'f' ({module}:1) requires the argument 'x'",
        "reward functions get prompts, completions, completion_ids, trainer_state, log_extra, "
        f"log_metric and the columns of {settings['data']} (allowed)",
        "Add a 'x' column to the data",
    )


# --------------------------------------------------------------------------- output


def test_an_output_directory_under_a_file_is_refused(settings, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out = afile / "run"
    refused(
        {**settings, "output_dir": str(out)},
        f"output directory {out} cannot be created: {afile} is a file, not a folder",
        "Choose another --output-dir",
    )
    assert afile.read_text() == "not a folder"


def test_an_output_directory_that_is_not_writable_is_refused(settings, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # root writes anywhere
    refused(
        settings,
        f"output directory {settings['output_dir']} is not writable",
        f"{tmp_path} does not allow writing",
        "Choose a folder you can write to with --output-dir",
    )


def test_an_output_directory_holding_a_run_is_kept_until_overwrite(settings):
    out = Path(settings["output_dir"])
    assert train(*cli_flags(settings)).exit_code == 0
    before = tree(out)
    assert {"config.yaml", "metrics.jsonl", "adapters.safetensors"} <= set(before)
    assert any(name.startswith("checkpoints/") for name in before)

    assert_refused(
        train(*cli_flags(settings)),
        f"output directory {out} already holds a run",
        f"`mlx-grpo train --resume {out}`",
        "choose another --output-dir",
        "pass --overwrite to replace it",
    )
    assert tree(out) == before

    forced = train(*cli_flags(settings), "--overwrite")
    assert forced.exit_code == 0, forced.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # replaced, not appended


@pytest.mark.parametrize("exists", [True, False], ids=["empty-folder", "missing-folder"])
def test_resuming_a_folder_that_is_not_a_run_is_refused(tmp_path, monkeypatch, exists):
    monkeypatch.chdir(tmp_path)  # where the default output directory would go
    folder = tmp_path / "not-a-run"
    if exists:
        folder.mkdir()
    assert_refused(
        train("--resume", str(folder)),
        f"cannot resume {folder}: it {'has no config.yaml' if exists else 'does not exist'}",
        "Give --resume the output directory of an earlier `mlx-grpo train`",
    )
    assert [p.name for p in tmp_path.iterdir()] == (["not-a-run"] if exists else [])
    assert not exists or not any(folder.iterdir())


# --------------------------------------------------------------------------- --debug


def test_debug_lets_the_error_propagate_with_its_traceback(settings, tmp_path):
    path = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="does not exist") as info:
        train(*cli_flags({**settings, "data": str(path)}), "--debug")
    assert info.traceback[-1].name == "load_rows"  # the frame that raised, not a summary
    assert not Path(settings["output_dir"]).exists()
