"""Try a model, with or without an adapter, on one prompt."""

from __future__ import annotations

from pathlib import Path

from mlx_grpo.core.adapters import load_adapted
from mlx_grpo.core.config import DEFAULTS
from mlx_grpo.core.data import encode_prompt
from mlx_grpo.core.models import check_completion_length
from mlx_grpo.core.settings import check_settings
from mlx_grpo.core.values import AT_LEAST_0, check_option


def generate(
    model: str,
    prompt: str,
    adapter: str | Path | None = None,
    max_completion_length: int = DEFAULTS.max_completion_length,
    temperature: float = 0.0,
    system_prompt: str | None = DEFAULTS.system_prompt,
    enable_thinking: bool | None = DEFAULTS.enable_thinking,
    top_p: float = DEFAULTS.top_p,
    top_k: int = DEFAULTS.top_k,
    min_p: float = DEFAULTS.min_p,
) -> str:
    """The model's reply to `prompt` (chat template applied when the model has one).

    Sampling options mean what they mean in training; the temperature
    defaults to 0, greedy.

    Example:
        >>> generate("Qwen/Qwen3-0.6B", "What is 17 * 3?", adapter="runs/qwen3-gsm8k")
    """
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    check_settings(
        top_p=top_p, top_k=top_k, min_p=min_p, max_completion_length=max_completion_length
    )
    check_option("--temperature", temperature, AT_LEAST_0)
    if not prompt.strip():
        raise ValueError("the prompt is empty; give the text to reply to, e.g. 'What is 17 * 3?'")
    lm, _ = load_adapted(model, adapter)
    check_completion_length(lm, max_completion_length, "--max-completion-length")
    lm.model.eval()
    ids = encode_prompt(prompt, lm.tokenizer, system_prompt, enable_thinking)
    sampler = make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    return mlx_lm.generate(
        lm.model, lm.tokenizer, ids, max_tokens=max_completion_length, sampler=sampler
    )
