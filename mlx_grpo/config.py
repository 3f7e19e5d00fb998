"""Every setting of a training run, in one place.

`TrainConfig` is the single source of truth: its fields are the YAML keys,
the `mlx-grpo train` flags (`lora_rank` -> `--lora-rank`) and the Python API
arguments, with one default each. Precedence: flags > YAML file > defaults.

GRPO defaults follow TRL's GRPOConfig (REFERENCE section 1) with one
deliberate difference: `learning_rate` is 1e-5, not TRL's 1e-6, because TRL's
value is tuned for full fine-tuning and barely moves a LoRA adapter.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class TrainConfig:
    """Settings of one GRPO-LoRA run. See `mlx-grpo train --help` for each."""

    # Model and data
    model: str = _opt("", "Model: Hugging Face id or local mlx-lm/transformers directory.")
    data: str = _opt("", "Prompt dataset: a JSONL file, or a Hugging Face dataset id (online).")
    prompt_column: str = _opt("prompt", "Column holding the prompt (text or chat messages).")
    system_prompt: str | None = _opt(None, "System prompt added to chat prompts.")
    enable_thinking: bool | None = _opt(
        None, "Qwen3 chat-template switch; unset keeps the template's default."
    )
    max_prompt_length: int | None = _opt(
        None, "Refuse prompts longer than this many tokens (default: model context)."
    )
    rewards: list[str] = _opt(
        ["math_answer"],
        "Reward functions: builtin name, module:function or path/file.py:function.",
    )
    reward_weights: list[float] | None = _opt(None, "One weight per reward function (default 1).")
    output_dir: str = _opt("runs/grpo", "Where the adapter, metrics and config are written.")
    overwrite: bool = _opt(False, "Allow writing into an output directory that holds a run.")
    seed: int = _opt(0, "Seed for sampling, LoRA init, dropout and data order.")
    dtype: str = _opt(
        "auto",
        "Compute dtype; auto = float32 on CPU, the model's own on Apple GPUs.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )

    # LoRA
    lora_rank: int = _opt(16, "LoRA rank r.")
    lora_alpha: float = _opt(32.0, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA input.")
    lora_targets: list[str] = _opt(list(LORA_TARGETS), "Module names that get adapters.")
    lora_layers: str = _opt("all", "Adapted layers: all, last:N, or indices like 0,1,5.")
    use_rslora: bool = _opt(False, "rsLoRA: scale the update by alpha / sqrt(r) instead.")
    adapter: str | None = _opt(
        None,
        "Start from this adapter (mlx-lm or PEFT folder); its rank, alpha and modules "
        "replace the lora_* settings.",
    )

    # Rollout
    num_generations: int = _opt(8, "G: completions sampled per prompt.")
    prompts_per_step: int = _opt(
        1, "B: prompts per optimisation step (B x G sequences); per process when distributed."
    )
    max_completion_length: int = _opt(512, "Maximum tokens per completion.")
    temperature: float = _opt(1.0, "Sampling temperature (log-probs use it too).")
    top_p: float = _opt(1.0, "Nucleus sampling threshold (1 = off).")
    top_k: int = _opt(0, "Top-k sampling (0 = off).")
    min_p: float = _opt(0.0, "Min-p sampling (0 = off).")

    # Objective
    loss_type: str = _opt("dapo", "Loss aggregation.", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    beta: float = _opt(0.0, "KL penalty weight (0 = no reference pass).")
    kl_estimator: str = _opt(
        "k3", "KL per token: k3 estimator or exact full-vocabulary KL.", choices=("k3", "exact")
    )
    use_bias_correction_kl: bool = _opt(
        True, "Multiply the k3 KL term by the importance ratio (TRL's default)."
    )
    epsilon: float = _opt(0.2, "Lower clipping range epsilon.")
    epsilon_high: float | None = _opt(None, "Upper clipping range (default: epsilon).")
    num_iterations: int = _opt(1, "mu: optimisation passes per rollout.")
    importance_sampling_level: str = _opt(
        "token", "token (GRPO) or sequence (GSPO) ratios.", choices=("token", "sequence")
    )
    scale_rewards: str = _opt(
        "group", "Advantage scaling by std.", choices=("group", "batch", "none")
    )

    # Optimisation
    learning_rate: float = _opt(1e-5, "Peak learning rate of AdamW.")
    lr_scheduler: str = _opt(
        "constant", "Schedule after warmup.", choices=("constant", "linear", "cosine")
    )
    warmup_steps: int = _opt(0, "Linear warmup steps from 0 to the peak rate.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this (0 = off).")
    gradient_accumulation_steps: int = _opt(
        1, "Micro-batches the B x G sequences are split into per update."
    )
    max_steps: int = _opt(100, "Optimisation steps (rollouts) to run.")
    max_minutes: float | None = _opt(
        None, "Stop after the step that passes this many minutes of training."
    )
    logits_chunk_size: int = _opt(
        256, "Completion tokens (rows x positions) per LM-head chunk when scoring (bounds memory)."
    )
    grad_checkpoint: bool = _opt(
        True, "Recompute each block's activations in backward: much less memory, a little slower."
    )

    # Reporting
    logging_steps: int = _opt(1, "Print a sample of completions every this many steps.")
    save_steps: int = _opt(
        50,
        "Write a checkpoint (adapter, optimizer, data position, RNG, metrics) every this many "
        "steps (0 = only at the end).",
    )
    save_total_limit: int = _opt(3, "Keep this many newest checkpoints (0 = keep all).")

    # Failures
    on_reward_error: str = _opt(
        "raise",
        "When a reward function raises: stop the run (raise), score the completion 0 (zero), "
        "or leave it unscored like a None reward (skip). Every failure is logged.",
        choices=("raise", "zero", "skip"),
    )
    max_nonfinite_updates: int = _opt(
        5, "Stop after this many updates in a row skipped for a NaN or Inf loss or gradient."
    )
    distributed_timeout: float = _opt(
        1800.0,
        "Distributed runs: seconds a process waits for the others at a synchronisation point "
        "before it stops the run (a hung process or a broken network).",
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / (self.lora_rank**0.5 if self.use_rslora else self.lora_rank)

    def validate(self) -> None:
        """Check types of choices and ranges; raise ValueError naming the key."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name}: {value!r} is not one of {', '.join(choices)}")
        positive = ("lora_rank", "num_generations", "prompts_per_step", "max_completion_length")
        positive += ("num_iterations", "gradient_accumulation_steps", "max_steps")
        positive += ("logits_chunk_size", "logging_steps", "max_nonfinite_updates")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distributed_timeout <= 0:
            raise ValueError(f"distributed_timeout must be > 0, got {self.distributed_timeout}")
        for name in ("save_steps", "save_total_limit", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        n = self.num_generations * self.prompts_per_step
        if n % self.gradient_accumulation_steps:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} must divide "
                f"prompts_per_step x num_generations = {n}"
            )
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if not self.lora_targets:
            raise ValueError("lora_targets is empty; name at least one module, e.g. q_proj")
        if unknown and any("." in t for t in unknown):
            raise ValueError(f"lora_targets take leaf names like q_proj, got {sorted(unknown)}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for "
                f"{len(self.rewards)} reward functions {self.rewards}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def field_type(f: dataclasses.Field) -> tuple[type, bool, bool]:
    """(base type, is_list, is_optional) of a TrainConfig field."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        optional = type(None) in args
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _coerce(name: str, value: Any) -> Any:
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    base, is_list, optional = field_type(f)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} cannot be empty")
    if is_list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_scalar(name, base, v) for v in value]
    return _scalar(name, base, value)


def _scalar(name: str, base: type, value: Any) -> Any:
    if base is bool and isinstance(value, str):
        if value.lower() in ("true", "yes", "1", "on"):
            return True
        if value.lower() in ("false", "no", "0", "off"):
            return False
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    try:
        if base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
    except ValueError:
        pass
    if isinstance(value, base):
        return value
    raise ValueError(f"{name}: expected {base.__name__}, got {value!r}")


def check_keys(keys: typing.Iterable[str], where: str) -> None:
    """Reject unknown setting names, suggesting the closest known one."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{where}: unknown setting '{key}'.{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    # Accept kebab-case keys as written on the command line.
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    check_keys(data, str(path))
    return data


def resolve(config_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Build a config from defaults, then a YAML file, then `overrides`.

    Overrides whose value is None are "not given" and do not replace the file.

    Example:
        >>> cfg = resolve("grpo.yaml", learning_rate=2e-5)
    """
    check_keys(overrides, "arguments")
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_yaml(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    coerced = {}
    for k, v in values.items():
        coerced[k] = _coerce(k, v)
    return TrainConfig(**coerced)
