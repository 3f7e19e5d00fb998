"""mlx-grpo: GRPO fine-tuning through LoRA adapters on Apple's MLX."""

from mlx_grpo.core import __version__
from mlx_grpo.core.backend import keep_freed_memory, load_openblas

# Must run before anything imports mlx.core (see core/backend.py).
load_openblas()
keep_freed_memory()

__all__ = ["TrainConfig", "__version__", "train"]


def __getattr__(name: str):
    # Lazy, so `import mlx_grpo` stays cheap and loads no model code.
    if name == "TrainConfig":
        from mlx_grpo.core.config import TrainConfig

        return TrainConfig
    if name == "train":
        from mlx_grpo.core.trainer import train

        return train
    raise AttributeError(f"module 'mlx_grpo' has no attribute {name!r}")
