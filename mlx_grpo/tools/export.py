"""Ship an adapter: PEFT folder with a model card, mlx-lm import, fused model, Hub upload.

Every output is written whole beside its place and renamed into it
(outputs.build); the base model, the source adapter, runs, models and any
folder this program did not make are never written into.

The base model is recorded as the Hub knows it whenever that can be known
(`hub_id`): --base-model, else the id the run trained on when it is a Hub id,
else the `_name_or_path` of the local model's config.json, else the source a
GGUF names. Otherwise the local path is recorded and the card says so; such
an export is refused for the Hub.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from mlx_grpo.core.adapters import PEFT_CONFIG, Adapter, load_adapted
from mlx_grpo.core.files import read_json_object
from mlx_grpo.core.models import named_model
from mlx_grpo.core.outputs import build, check_target
from mlx_grpo.core.reporting import CONFIG_FILE, METRICS_FILE
from mlx_grpo.core.values import is_hub_id

CARD_FILE = "README.md"


def check_repo_id(repo_id: str) -> None:
    """Refuse a --push-to-hub target that is not a Hub repository id (before any writing)."""
    if not is_hub_id(repo_id):
        raise ValueError(
            f"--push-to-hub {repo_id!r} is not a Hub repository id: give it as your-name/repo "
            "(letters, digits, '-', '_' and '.'; at most 96 characters on each side of the /)."
        )


def _on_hub(name: str | None) -> bool:
    """A Hub id that is not also a local path: models/qwen3 may be a folder, not a repository."""
    return is_hub_id(name) and not Path(name).expanduser().exists()


def hub_id(model: str | None) -> str | None:
    """The Hub id of a model given as a Hub id, a local folder or a .gguf file; None if unknown.

    A name that is not a local path counts when it has the org/name shape; a
    local folder gives its config.json `_name_or_path` (transformers and
    `mlx-grpo convert` write it) and a GGUF the source its metadata names.
    """
    if not model:
        return None
    path = Path(named_model(model)).expanduser()
    if not path.exists():
        return model if is_hub_id(model) else None
    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            from mlx_grpo.core.gguf import source_hub_id, string_metadata

            return source_hub_id(string_metadata(path))
        name = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if is_hub_id(name) else None


def export_peft(
    source: str | Path,
    output: str | Path,
    base_model: str | None = None,
    num_layers: int | None = None,
    for_hub: bool = False,
) -> Path:
    """Convert a run or adapter directory into a PEFT LoRA folder with a model card.

    `base_model` names the model for `base_model_name_or_path` (default: the
    Hub id of the model the run trained on, see `hub_id`, else its local path).
    `for_hub` refuses, before anything is written, a base known only as a
    local path. `num_layers` of the base lets the config omit
    `layers_to_transform` when every layer is adapted; it is read from the
    base model's config.json when that is a local directory. `output` must be
    new, empty or an earlier PEFT export, which is replaced whole.

    Example:
        >>> export_peft("runs/qwen3-gsm8k", "export/qwen3-gsm8k", base_model="Qwen/Qwen3-0.6B")
    """
    source, output = Path(source), Path(output)
    if base_model is not None and not (is_hub_id(base_model) or Path(base_model).exists()):
        raise ValueError(
            f"--base-model {base_model!r} is neither a Hub model id (org/name, e.g. "
            "Qwen/Qwen3-0.6B) nor a local model folder; give the base's Hub id."
        )
    adapter = Adapter.load(source)
    run = _run_summary(source)
    trained_on = adapter.base_model or run.get("model")
    adapter.base_model = base_model or hub_id(trained_on) or trained_on
    if for_hub:
        _require_hub_id(adapter.base_model, f"the export of {source}")
    if num_layers is None:
        num_layers = _num_layers(adapter.base_model) or _num_layers(trained_on)
    with build(output, "peft", {"the source adapter": source, "the base model": trained_on}) as d:
        adapter.save_peft(d, num_layers)
        (d / CARD_FILE).write_text(model_card(adapter, run))
    return output


def import_peft(source: str | Path, output: str | Path) -> Path:
    """Convert a PEFT LoRA folder into an mlx-lm adapter folder (`train --adapter` reads it).

    Example:
        >>> import_peft("peft/qwen3-lora", "adapters/qwen3-lora")
    """
    adapter = Adapter.load_peft(source)
    with build(output, "mlx-adapter", {"the PEFT adapter": source}) as folder:
        adapter.save(folder)
    return Path(output)


def _require_hub_id(base: str | None, what: str) -> None:
    if _on_hub(base):
        return
    known = f"known only as {base!r}, not a Hub id (org/name)" if base else "not recorded"
    raise ValueError(
        f"{what} cannot go to the Hub: its base model is {known}, so no one else could load "
        "the adapter; nothing was written or uploaded. Pass --base-model with the base's Hub "
        "id, e.g. --base-model Qwen/Qwen3-0.6B."
    )


def _run_summary(source: Path) -> dict[str, Any]:
    """Settings and final figures of the run that produced `source`, when it is a run.

    A config.yaml or metrics.jsonl that cannot be read leaves its part of the
    model card "not recorded": the adapter itself does not depend on them.
    """
    from mlx_grpo.core.settings import load_yaml
    from mlx_grpo.tools.plot import load_metrics

    summary: dict[str, Any] = {}
    if (source / CONFIG_FILE).is_file():
        with contextlib.suppress(ValueError):
            summary.update(load_yaml(source / CONFIG_FILE))
    try:
        records = load_metrics(source) if (source / METRICS_FILE).is_file() else []
    except ValueError:
        records = []
    if records:
        rewards = [r["reward"] for r in records[-10:] if isinstance(r.get("reward"), (int, float))]
        summary["steps_done"] = records[-1].get("step")
        summary["final_reward"] = sum(rewards) / len(rewards) if rewards else None
        summary["first_reward"] = records[0].get("reward")
    return summary


def _num_layers(base_model: str | None) -> int | None:
    folder = Path(named_model(base_model)).expanduser() if base_model else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    fix = "restore the base model's config.json, or pass another --base-model"
    return read_json_object(folder / "config.json", fix).get("num_hidden_layers")


def model_card(adapter: Adapter, run: dict[str, Any]) -> str:
    """A Hugging Face model card (README.md) for the exported adapter.

    Names and settings are escaped where they land (YAML, Markdown, Python),
    so none can add metadata keys, table rows or code.
    """
    base = adapter.base_model
    on_hub = _on_hub(base)
    meta: dict[str, Any] = {"base_model": base} if on_hub else {}
    meta |= {"library_name": "peft", "tags": ["lora", "grpo", "mlx-grpo"]}
    rewards = run.get("rewards") or []
    weights = run.get("reward_weights") or [1.0] * len(rewards)
    reward_lines = "\n".join(
        f"- {_code(r, table=False)} (weight {_md(_fmt(w))})" for r, w in zip(rewards, weights)
    )
    local = "" if on_hub or not base else " (not a Hub id)"
    rows = [
        ("base model", (_code(base) if base else "unknown") + local),
        ("training data", _code(run["data"]) if run.get("data") else "not recorded"),
        ("steps", _md(run.get("steps_done", "not recorded"))),
        ("reward, first step", _md(_fmt(run.get("first_reward")))),
        ("reward, mean of the last 10 steps", _md(_fmt(run.get("final_reward")))),
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
            rows.append((key, _md(run[key])))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    note = (
        ""
        if on_hub or not base
        else "\nThe base model is recorded as a local path (or another name that is not a Hub "
        "id), so the adapter loads only where that model is. Export again with `--base-model` "
        "and the base's Hub id before sharing it.\n"
    )
    return f"""---
{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---

# LoRA adapter for {_md(base or "an unrecorded base model")}, trained with GRPO

Trained with mlx-grpo: GRPO through a LoRA adapter on Apple MLX.
{note}
| | |
|---|---|
{table}

Reward functions:

{reward_lines or "- not recorded"}

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained({json.dumps(base or "<base model>")})
model = PeftModel.from_pretrained(base, "<this repository or folder>")
```
"""


def _md(value: Any) -> str:
    """Plain Markdown text on one line: whitespace collapsed, markup characters escaped."""
    text = " ".join(str(value).split())
    return re.sub(r"([\\`*_\[\]<>#|!~])", r"\\\1", text)


def _code(value: Any, table: bool = True) -> str:
    """An inline code span on one line; its fence is longer than any backtick run inside."""
    text = " ".join(str(value).split())
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    span = f"{fence} {text} {fence}"
    return span.replace("|", "\\|") if table else span  # GFM splits cells on | even in code


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not recorded"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def fuse(model: str, adapter: str | Path, output: str | Path, dequantize: bool = False) -> Path:
    """Save base + adapter as one model (W + scale B^T A^T) that `mlx_lm.load` accepts.

    Quantized bases are re-quantized after merging unless `dequantize`.
    `output` must be new, empty or an earlier fused model, which is replaced
    whole; the base model's folder (or its Hub download) is never written.

    Example:
        >>> fuse("Qwen/Qwen3-0.6B", "runs/qwen3-gsm8k", "fused/qwen3-gsm8k")
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, save

    from mlx_grpo.core.lora import LoRALinear
    from mlx_grpo.core.models import hub_snapshot

    on_hub = _on_hub(model)
    protected = {
        "the base model": model,
        "the base model's download": hub_snapshot(model) if on_hub else None,
        "the adapter": adapter,
    }
    check_target(output, "fused", protected)  # before loading anything
    lm, _ = load_adapted(model, adapter)
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
    with build(output, "fused", protected) as folder:
        save(folder, model, lm.model, lm.tokenizer, config, donate_model=False)
    return Path(output)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, api: Any = None) -> str:
    """Upload `folder` to the Hub repository `repo_id` (created if missing); return its URL.

    The token comes from the environment (HF_TOKEN) or the huggingface-cli
    login, as huggingface_hub finds it; it is never printed. A PEFT folder
    whose base model is not a Hub id is refused before anything is uploaded.
    """
    config = Path(folder) / PEFT_CONFIG
    if config.is_file():  # a PEFT adapter: its base must be loadable by others
        fix = "export the adapter again"
        base = read_json_object(config, fix).get("base_model_name_or_path")
        _require_hub_id(base, f"{folder}")
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
