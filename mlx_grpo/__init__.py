"""mlx-grpo: GRPO fine-tuning through LoRA adapters on Apple's MLX."""

from mlx_grpo._backend import keep_freed_memory, load_openblas

# Must run before anything imports mlx.core (see _backend).
load_openblas()
keep_freed_memory()

__all__ = ["TrainConfig", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import mlx_grpo` stays cheap and loads no model code.
    if name == "TrainConfig":
        from mlx_grpo.config import TrainConfig

        return TrainConfig
    if name == "train":
        from mlx_grpo.trainer import train

        return train
    raise AttributeError(f"module 'mlx_grpo' has no attribute {name!r}")
