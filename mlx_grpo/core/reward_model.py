"""Hugging Face sequence-classification reward models, run in MLX, scored as TRL scores them.

`hf:<folder>` in `--rewards` names a local `...ForSequenceClassification`
checkpoint of a family mlx-lm builds (Qwen3, Qwen2, Llama and the SmolLM
models). Its body loads through mlx-lm, its `score.weight` head beside it.
TRL's scoring, which this follows: the text is prompt + completion (for
chat prompts, the reward model's chat template over the whole
conversation), tokenized without special tokens and padded on the right;
the reward is the first label's logit at the last token that is not the
pad token (the tokenizer's pad token, else its EOS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_grpo.core.models import compute_dtype, rope_config

FAMILIES = ("qwen3", "qwen2", "llama")  # model_type values whose body mlx-lm builds
PREFIX = "hf:"
ROWS_PER_PASS = 8  # texts scored together: bounds the activations of a long batch


class RewardModelError(ValueError):
    """A reward model folder cannot be loaded."""


class RewardModel:
    """A reward function (TRL's calling convention) backed by a classifier checkpoint."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self.__name__ = self.folder.resolve().name  # TRL logs a reward model by its name
        config = _classifier_config(self.folder)
        self.model, self.score = _load(self.folder, config)
        self.tokenizer = _tokenizer(self.folder)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        rewards: list[float] = []
        for i in range(0, len(texts), ROWS_PER_PASS):
            rewards += self.logits(texts[i : i + ROWS_PER_PASS])[:, 0].tolist()
        return rewards

    def text(self, prompt: Any, completion: Any) -> str:
        """What the model reads: the whole conversation through its chat template, or the
        prompt and completion strings joined."""
        if isinstance(prompt, list):  # conversational: lists of {"role", "content"}
            messages = prompt + (completion if isinstance(completion, list) else [])
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + completion

    def logits(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_labels) logits at each text's last non-pad token."""
        rows = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        width = max(1, max(len(r) for r in rows))
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        hidden = self.model.model(mx.array(ids))  # right padding: causal rows need no mask
        real = ids != self.pad_id
        last = np.where(real.any(1), (np.arange(width)[None] * real).argmax(1), 0)
        pooled = hidden[mx.arange(len(rows)), mx.array(last)]
        return np.array((pooled @ self.score.T).astype(mx.float32))


def _classifier_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise RewardModelError(
            f"reward model {PREFIX}{folder}: no config.json there; give the folder of a "
            "Hugging Face ...ForSequenceClassification checkpoint (config.json, *.safetensors, "
            "tokenizer files)."
        )
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise RewardModelError(
            f"reward model {PREFIX}{folder}: config.json names {architectures or 'no'} "
            "architectures; a reward model is a ...ForSequenceClassification checkpoint."
        )
    if config.get("model_type") not in FAMILIES:
        raise RewardModelError(
            f"reward model {PREFIX}{folder}: model_type {config.get('model_type')!r} is not "
            f"supported; supported: {', '.join(FAMILIES)}."
        )
    return config


def _load(folder: Path, config: dict[str, Any]) -> tuple[Any, mx.array]:
    """The mlx-lm model (its body holds every weight of the checkpoint's) and the score
    head (num_labels, D)."""
    from mlx_lm.utils import load_model

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RewardModelError(f"reward model {PREFIX}{folder}: no *.safetensors weights there.")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(str(f)))
    if "score.weight" not in weights:
        raise RewardModelError(
            f"reward model {PREFIX}{folder}: its weights have no score.weight (the "
            "classification head)."
        )
    model, _ = load_model(folder, strict=False, model_config=rope_config(folder))
    body = {f"model.{k}" for k, _ in tree_flatten(model.model.parameters())}
    missing = sorted(body - set(weights))
    if missing:
        raise RewardModelError(
            f"reward model {PREFIX}{folder}: its weights lack {len(missing)} tensors of the "
            f"{config['model_type']} body, e.g. {missing[0]}."
        )
    target = compute_dtype("auto")
    if target is not None:
        model.set_dtype(target)
    score = weights["score.weight"].astype(target or weights["score.weight"].dtype)
    model.eval()
    mx.eval(model.parameters(), score)
    return model, score


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many kinds
        raise RewardModelError(
            f"reward model {PREFIX}{folder}: its tokenizer does not load "
            f"({type(e).__name__}: {e}); the folder needs the tokenizer files."
        ) from e
