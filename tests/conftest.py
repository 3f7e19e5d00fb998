import pytest

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx)
from mlx_grpo.toy import build_tiny_qwen3, write_toy_task


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen3 with peaky outputs, so rewards can shape it quickly."""
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), init_std=0.3)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    return write_toy_task(tmp_path_factory.mktemp("data") / "toy.jsonl", rows=16)


@pytest.fixture
def quick_settings(tiny_model_dir, toy_data, tmp_path):
    """Settings of a run that takes well under a second per step."""
    return dict(
        model=str(tiny_model_dir),
        data=str(toy_data),
        rewards=["mlx_grpo.toy:allowed_share"],
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
