"""Load a model and tokenizer, choose the compute dtype, pad batches, split off the head.

Any mlx-lm model works (Hub id or local directory, quantized or not). Batches
of prompts with different lengths are left-padded; the caches in caches.py
give each row its own RoPE positions (starting at 0 at its first real token)
and a mask that hides the padding, so a padded row computes what it would
alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_grpo.core.backend import cpu_only
from mlx_grpo.core.files import cache_dir, models_dir, read_json_object, sha256

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# Model types whose __call__ does more than head(model(x)) (soft-capping, scaling).
_OWN_HEAD = {"gemma", "gemma2", "gemma3", "gemma3_text", "cohere", "cohere2", "granite"}
# Files of a local model folder that decide what the model computes.
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template*",
)


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    config: dict
    path: str
    eos_ids: list[int]
    pad_id: int


def load_model(path_or_id: str, dtype: str = "auto") -> LoadedModel:
    """Load an mlx-lm model and its tokenizer, cast for the device.

    Example:
        >>> lm = load_model("Qwen/Qwen3-0.6B")
        >>> lm.eos_ids
        [151643, 151645]
    """
    import mlx_lm

    if not path_or_id:
        raise ValueError("no model given: pass --model with a Hub id or a local directory")
    path_or_id = named_model(path_or_id)
    if path_or_id.lower().endswith(".gguf"):
        path_or_id = str(converted_gguf(Path(path_or_id)))
    local = Path(path_or_id).expanduser()
    looks_local = path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
    if looks_local and not local.exists():
        raise ValueError(
            f"model directory {local} does not exist; pass --model a local model directory "
            "or a Hugging Face id like Qwen/Qwen3-0.6B."
        )
    if local.exists():
        _check_model_dir(local)
    try:
        model, tokenizer, config = mlx_lm.load(
            str(local) if local.exists() else path_or_id,
            model_config=rope_config(local),
            return_config=True,
        )
    except Exception as e:  # mlx-lm raises many kinds; wrap them with context
        where = "the directory" if local.exists() else "the Hugging Face Hub (network and id)"
        kept = sorted(p.parent.name for p in models_dir().glob("*/config.json"))
        if kept and not local.exists():
            where += f", or use a model kept by name: {', '.join(kept)}"
        raise ValueError(
            f"could not load model '{path_or_id}': {type(e).__name__}: {e}. Check {where}."
        ) from e
    target = compute_dtype(dtype)
    if target is not None:
        model.set_dtype(target)
    mx.eval(model.parameters())
    eos = set(tokenizer.eos_token_ids or [])
    eos |= _generation_config_eos(local if local.exists() else hub_snapshot(path_or_id))
    tokenizer.eos_token_ids = eos  # so mlx-lm's own generate stops there too
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    return LoadedModel(model, tokenizer, config, path_or_id, sorted(eos), int(pad))


def named_model(path_or_id: str) -> str:
    """`path_or_id`, or the folder of the model kept under that name in `models_dir()`
    (a local path of the same name wins)."""
    bare = path_or_id and "/" not in path_or_id and not path_or_id.startswith(("~", "."))
    if not bare or Path(path_or_id).exists():
        return path_or_id
    folder = models_dir() / path_or_id
    return str(folder) if (folder / "config.json").is_file() else path_or_id


def fingerprint(model: str) -> str | None:
    """SHA-256 of a local model folder's config, weights and tokenizer files (None for Hub ids).

    The bytes are hashed, so a changed weight of the same size counts; read
    once per setup, in chunks.
    """
    folder = Path(named_model(model)).expanduser()
    if not folder.is_dir():
        return None
    files = sorted({f for pattern in _MODEL_FILES for f in folder.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{sha256(file)}\n".encode())
    return digest.hexdigest()


def check_completion_length(lm: LoadedModel, length: int, flag: str) -> None:
    """Refuse a completion length that leaves no room for a prompt in the model's context."""
    context = lm.config.get("max_position_embeddings")
    if context is not None and length >= context:
        raise ValueError(
            f"{flag} {length} does not fit the model's context of {context} tokens "
            f"(max_position_embeddings of {lm.path}); pass {flag} below {context}."
        )


def _check_model_dir(folder: Path) -> None:
    """Refuse a local folder mlx-lm cannot load, saying what is missing and how to fix it."""
    whole = "or point --model at the complete model directory"
    if not folder.is_dir():
        raise ValueError(
            f"--model {folder} is a file, not a model directory; point --model at the folder "
            "holding config.json and the model*.safetensors weights (a .gguf file also works)."
        )
    file = folder / "config.json"
    if not file.is_file():
        raise ValueError(
            f"model directory {folder} has no config.json; point --model at a directory "
            "holding an mlx-lm or transformers model (config.json + model*.safetensors)."
        )
    read_json_object(file, f"restore the model's original config.json, {whole}")
    tokenizer = [n for n in _TOKENIZER_FILES if (folder / n).is_file()]
    tokenizer += [p.name for p in folder.glob("*.tiktoken")]
    if not tokenizer:
        raise ValueError(
            f"model directory {folder} has no tokenizer: none of {', '.join(_TOKENIZER_FILES)} "
            f"is there. Copy the model's tokenizer files (tokenizer.json, tokenizer_config.json) "
            f"into it, {whole}."
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (folder / name).is_file():
            read_json_object(folder / name, f"restore the model's original {name}, {whole}")
    if not list(folder.glob("model*.safetensors")):
        others = sorted(p.name for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        found = f" (it holds {', '.join(others)})" if others else ""
        raise ValueError(
            f"model directory {folder} has no weights: mlx-lm reads model*.safetensors and "
            f"there are none{found}. Copy the model's model*.safetensors files into it, convert "
            f"other formats with `mlx_lm.convert`, {whole}."
        )


def converted_gguf(gguf: Path) -> Path:
    """The mlx-lm directory converted from a GGUF file, converting it once into the cache."""
    from mlx_grpo.core.gguf import convert_gguf

    if not gguf.is_file():
        raise ValueError(f"GGUF file {gguf} does not exist")
    stat = gguf.stat()
    target = cache_dir() / "converted" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not target.is_dir():
        # Built in a hidden sibling, marked and renamed into place: a crash leaves no half model.
        convert_gguf(gguf, target)
    return target


def rope_config(path: Path) -> dict:
    """rope_theta lifted to the top level of the config, where mlx-lm reads it.

    transformers 5 writes it only inside `rope_parameters`, and some mlx-lm
    models (Llama among them) would then silently use their default base.
    """
    file = path / "config.json"
    if not file.is_file():
        return {}
    config = json.loads(file.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if "rope_theta" in config or theta is None:
        return {}
    return {"rope_theta": theta}


def compute_dtype(name: str) -> mx.Dtype | None:
    """The dtype a model is cast to for `name` (--dtype); None: keep its own."""
    if name == "auto":
        # CPU matmuls are only fast in float32 (bf16/fp16 run far slower there).
        return mx.float32 if cpu_only() else None
    return DTYPES[name]


def hub_snapshot(repo_id: str) -> Path | None:
    """The local copy of a Hub model that mlx-lm downloaded; None when there is none."""
    from mlx_lm.utils import hf_repo_to_path

    try:
        return hf_repo_to_path(repo_id)
    except Exception:  # an incomplete cache only costs the extra EOS ids
        return None


def _generation_config_eos(path: Path | None) -> set[int]:
    """EOS ids of generation_config.json (Qwen3 also stops on <|endoftext|>)."""
    if path is None:
        return set()
    file = path / "generation_config.json"
    if not file.is_file():
        return set()
    eos = read_json_object(file, "restore the model's original one").get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[mx.array, mx.array]:
    """Left-pad token rows: ((B, P) tokens, (B,) padding lengths)."""
    width = max(len(r) for r in rows)
    padding = [width - len(r) for r in rows]
    tokens = [[pad_id] * p + r for p, r in zip(padding, rows)]
    return mx.array(tokens, dtype=mx.int32), mx.array(padding, dtype=mx.int32)


def body_and_head(model: nn.Module) -> tuple[Callable, Callable] | None:
    """Split a causal LM into body (tokens -> final hidden) and head (hidden -> logits).

    Scoring runs the head over chunks of positions so that full-vocabulary
    logits never exist for every token at once. None when the model's
    logits are more than head(body(x)) and cannot be split safely.
    """
    body = getattr(model, "model", None)
    model_type = getattr(model, "model_type", None) or getattr(
        getattr(model, "args", None), "model_type", None
    )
    if body is None or model_type in _OWN_HEAD:
        return None
    if hasattr(model, "lm_head"):
        return body, model.lm_head
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    if tied and hasattr(body, "embed_tokens"):
        return body, body.embed_tokens.as_linear
    return None


def body_of(model: nn.Module):
    """The part of the model that gives the hidden states the head reads (or the model)."""
    split = body_and_head(model)
    return model if split is None else split[0]
