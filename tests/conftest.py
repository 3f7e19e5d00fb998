import hashlib
from pathlib import Path

import pytest

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx)
from mlx_grpo.tasks.toy import build_tiny_qwen3, write_toy_task


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen3 with peaky outputs, so rewards can shape it quickly."""
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), init_std=0.3)


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory):
    """The same tiny model with the chat template that shows tools (agent runs)."""
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-tools"), init_std=0.3, tools=True)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    return write_toy_task(tmp_path_factory.mktemp("data") / "toy.jsonl", rows=16)


@pytest.fixture
def quick_settings(tiny_model_dir, toy_data, tmp_path):
    """Settings of a run that takes well under a second per step."""
    return dict(
        model=str(tiny_model_dir),
        data=str(toy_data),
        rewards=["mlx_grpo.tasks.toy:allowed_share"],
        output_dir=str(tmp_path / "run"),
        num_generations=4,
        prompts_per_step=2,
        max_completion_length=8,
        lora_rank=4,
        lora_alpha=8,
        learning_rate=1e-2,
        max_steps=2,
        save_steps=0,
    )


def cli_flags(settings: dict) -> list[str]:
    """`mlx-grpo train` flags for keyword settings (lists comma-separated)."""
    out = []
    for key, value in settings.items():
        if key == "show_progress":  # a Python API argument, not a setting
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def run_cli(*args):
    """`mlx-grpo ARGS` in this process; any exception but SystemExit propagates (a traceback
    fails the test loudly)."""
    from click.testing import CliRunner

    from mlx_grpo.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_refused(result, *phrases):
    """Exit code 2 and one paragraph holding every phrase, without a traceback."""
    # click >= 8.2 always mixes stderr into `output`; older ones do by default.
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert message.startswith("Error: ") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"


def tree(folder):
    """SHA-256 of every file under `folder`, hidden ones included."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def hub_calls(monkeypatch):
    """A recording stand-in for huggingface_hub.HfApi: the list of (method, kwargs) called."""
    import huggingface_hub

    calls = []

    class RecordingHub:
        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))
            return f"https://huggingface.co/{kwargs['repo_id']}"

        def upload_folder(self, **kwargs):
            files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            calls.append(("upload_folder", {**kwargs, "files": files}))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    return calls
