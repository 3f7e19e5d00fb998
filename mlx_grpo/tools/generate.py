"""Try a model, with or without an adapter, on one prompt."""

from __future__ import annotations

from pathlib import Path

from mlx_grpo.core.adapters import Adapter
from mlx_grpo.core.data import encode_prompt
from mlx_grpo.core.models import check_max_tokens, load_model
from mlx_grpo.core.values import AT_LEAST_0, AT_LEAST_1, check_option


def generate(
    model: str,
    prompt: str,
    adapter: str | Path | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    system_prompt: str | None = None,
    enable_thinking: bool | None = None,
) -> str:
    """The model's reply to `prompt` (chat template applied when the model has one).

    Example:
        >>> generate("Qwen/Qwen3-0.6B", "What is 17 * 3?", adapter="runs/qwen3-gsm8k")
    """
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    check_option("--max-tokens", max_tokens, AT_LEAST_1)
    check_option("--temperature", temperature, AT_LEAST_0)
    if not prompt.strip():
        raise ValueError("the prompt is empty; give the text to reply to, e.g. 'What is 17 * 3?'")
    lm = load_model(model)
    check_max_tokens(lm, max_tokens)
    if adapter is not None:
        Adapter.load(adapter).attach(lm.model)
    lm.model.eval()
    ids = encode_prompt(prompt, lm.tokenizer, system_prompt, enable_thinking)
    return mlx_lm.generate(
        lm.model, lm.tokenizer, ids, max_tokens=max_tokens, sampler=make_sampler(temp=temperature)
    )
