"""Ship an adapter: PEFT folder with a model card, fused model, Hugging Face Hub upload."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from mlx_grpo.adapters import Adapter

CARD_FILE = "README.md"


def export_peft(
    source: str | Path,
    output: str | Path,
    base_model: str | None = None,
    num_layers: int | None = None,
) -> Path:
    """Convert a run or adapter directory into a PEFT LoRA folder with a model card.

    `base_model` names the model for `base_model_name_or_path` (default: the
    model the run trained on). `num_layers` of the base lets the config omit
    `layers_to_transform` when every layer is adapted; it is read from the
    base model's config.json when that is a local directory.

    Example:
        >>> export_peft("runs/qwen3-gsm8k", "export/qwen3-gsm8k", base_model="Qwen/Qwen3-0.6B")
    """
    source, output = Path(source), Path(output)
    adapter = Adapter.load(source)
    run = _run_summary(source)
    adapter.base_model = base_model or adapter.base_model or run.get("model")
    if num_layers is None:
        num_layers = _num_layers(adapter.base_model)
    adapter.save_peft(output, num_layers)
    (output / CARD_FILE).write_text(model_card(adapter, run))
    return output


def _run_summary(source: Path) -> dict[str, Any]:
    """Settings and final figures of the run that produced `source`, when it is a run."""
    summary: dict[str, Any] = {}
    config = source / "config.yaml"
    if config.is_file():
        summary.update(yaml.safe_load(config.read_text()) or {})
    metrics = source / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if records:
            rewards = [r["reward"] for r in records[-10:] if r.get("reward") is not None]
            summary["steps_done"] = records[-1]["step"]
            summary["final_reward"] = sum(rewards) / len(rewards) if rewards else None
            summary["first_reward"] = records[0].get("reward")
    return summary


def _num_layers(base_model: str | None) -> int | None:
    if not base_model or not (Path(base_model) / "config.json").is_file():
        return None
    config = json.loads((Path(base_model) / "config.json").read_text())
    return config.get("num_hidden_layers")


def model_card(adapter: Adapter, run: dict[str, Any]) -> str:
    """A Hugging Face model card (README.md) for the exported adapter."""
    base = adapter.base_model or "unknown"
    rewards = run.get("rewards") or []
    weights = run.get("reward_weights") or [1.0] * len(rewards)
    reward_lines = "\n".join(f"- `{r}` (weight {w:g})" for r, w in zip(rewards, weights))
    final = run.get("final_reward")
    first = run.get("first_reward")
    rows = [
        ("base model", f"`{base}`"),
        ("training data", f"`{run['data']}`" if run.get("data") else "not recorded"),
        ("steps", run.get("steps_done", "not recorded")),
        ("reward, first step", _fmt(first)),
        ("reward, mean of the last 10 steps", _fmt(final)),
        (
            "LoRA",
            f"r = {adapter.rank}, alpha = {adapter.alpha:g}"
            + (" (rsLoRA)" if adapter.rslora else "")
            + f", {len(adapter.modules)} modules",
        ),
    ]
    for key in (
        "num_generations",
        "prompts_per_step",
        "learning_rate",
        "loss_type",
        "beta",
        "max_completion_length",
        "temperature",
    ):
        if key in run:
            rows.append((key, run[key]))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
base_model: {base}
library_name: peft
tags:
- lora
- grpo
- mlx-grpo
---

# LoRA adapter for {base}, trained with GRPO

Trained with mlx-grpo: GRPO through a LoRA adapter on Apple MLX.

| | |
|---|---|
{table}

Reward functions:

{reward_lines or "- not recorded"}

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "<this repository or folder>")
```
"""


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not recorded"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def fuse(model: str, adapter: str | Path, output: str | Path, dequantize: bool = False) -> Path:
    """Save base + adapter as one model (W + scale B^T A^T) that `mlx_lm.load` accepts.

    Quantized bases are re-quantized after merging unless `dequantize`.

    Example:
        >>> fuse("Qwen/Qwen3-0.6B", "runs/qwen3-gsm8k", "fused/qwen3-gsm8k")
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, save

    from mlx_grpo.lora import LoRALinear
    from mlx_grpo.models import load_model

    lm = load_model(model, dtype="auto")
    Adapter.load(adapter).attach(lm.model)
    fused = [
        (name, m.fuse(dequantize))
        for name, m in lm.model.named_modules()
        if isinstance(m, LoRALinear)
    ]
    lm.model.update_modules(tree_unflatten(fused))
    config = dict(lm.config)
    if dequantize:
        lm.model = dequantize_model(lm.model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    output = Path(output)
    save(output, model, lm.model, lm.tokenizer, config, donate_model=False)
    return output


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, api: Any = None) -> str:
    """Upload `folder` to the Hub repository `repo_id` (created if missing); return its URL.

    The token comes from the environment (HF_TOKEN) or the huggingface-cli
    login, as huggingface_hub finds it; it is never printed.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload LoRA adapter trained with mlx-grpo",
    )
    return f"https://huggingface.co/{repo_id}"
