"""Every setting of a training run, in one place.

`TrainConfig` is the single source of truth: its fields are the YAML keys,
the `mlx-grpo train` flags (`lora_rank` -> `--lora-rank`) and the Python API
arguments, with one default each (settings.py merges them: flags > YAML file >
defaults).

GRPO defaults follow TRL's GRPOConfig (REFERENCE section 1) with one
deliberate difference: `learning_rate` is 1e-5, not TRL's 1e-6, because TRL's
value is tuned for full fine-tuning and barely moves a LoRA adapter.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_grpo.core.advantages import MULTI_OBJECTIVE, SCALE_REWARDS
from mlx_grpo.core.lora import LORA_TARGETS, lora_scale
from mlx_grpo.core.memory import parse_size
from mlx_grpo.core.objective import (
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    LossSettings,
)
from mlx_grpo.core.trackers import TRACKERS, missing
from mlx_grpo.core.values import (
    AT_LEAST_0,
    AT_LEAST_1,
    FLOAT32_MAX,
    INT32_MAX,
    MAX_SEED,
    OPEN_UNIT,
    POSITIVE,
    SHARE,
    Range,
    SettingError,
)

_LAYERS_RE = re.compile(r"all|last:[1-9]\d*|\d+(,\d+)*,?")


def _opt(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    allowed: Range | None = None,
    **kw: Any,
) -> Any:
    metadata = {"help": help, "choices": choices, "allowed": allowed}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled (TrainConfig.sampling builds them for training)."""

    temperature: float  # 0 = greedy
    top_p: float  # 1 = off
    top_k: int  # 0 = off
    min_p: float  # 0 = off
    max_completion_length: int

    @property
    def logprob_temperature(self) -> float:
        # Greedy decoding has no sampling temperature; score at 1.
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class TrainConfig:
    """Settings of one GRPO-LoRA run. See `mlx-grpo train --help` for each."""

    # Model and data
    model: str = _opt(
        "",
        "Model: Hugging Face id, local mlx-lm/transformers directory, .gguf file, or a model "
        "kept by name (the main job keeps smollm2-135m-instruct).",
    )
    data: str = _opt("", "Prompt dataset: a JSONL file, or a Hugging Face dataset id (online).")
    prompt_column: str = _opt("prompt", "Column holding the prompt (text or chat messages).")
    system_prompt: str | None = _opt(None, "System prompt added to chat prompts.")
    enable_thinking: bool | None = _opt(
        None, "Qwen3 chat-template switch; unset keeps the template's default."
    )
    max_prompt_length: int | None = _opt(
        None,
        "Refuse prompts longer than this many tokens (default: model context).",
        allowed=AT_LEAST_1,
    )
    rewards: list[str] = _opt(
        ["math_answer"],
        "Reward functions: a built-in name (`mlx-grpo rewards` lists them), "
        "module:function or path/file.py:function.",
    )
    reward_weights: list[float] | None = _opt(
        None,
        "One weight per reward function (default 1).",
        allowed=Range(-FLOAT32_MAX, FLOAT32_MAX),
    )
    output_dir: str = _opt("runs/grpo", "Where the adapter, metrics and config are written.")
    overwrite: bool = _opt(
        False,
        "Replace the run mlx-grpo made in the output directory; a folder it did not make is "
        "never deleted.",
    )
    seed: int = _opt(
        0, "Seed for sampling, LoRA init, dropout and data order.", allowed=Range(0, MAX_SEED)
    )
    dtype: str = _opt(
        "auto",
        "Compute dtype; auto = float32 on CPU, the model's own on Apple GPUs.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )

    # LoRA
    lora_rank: int = _opt(16, "LoRA rank r.", allowed=AT_LEAST_1)
    lora_alpha: float = _opt(
        32.0, "LoRA alpha; the update is scaled by alpha / r.", allowed=POSITIVE
    )
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA input.", allowed=SHARE)
    lora_targets: list[str] = _opt(list(LORA_TARGETS), "Module names that get adapters.")
    lora_layers: str = _opt("all", "Adapted layers: all, last:N, or indices like 0,1,5.")
    use_rslora: bool = _opt(False, "rsLoRA: scale the update by alpha / sqrt(r) instead.")
    adapter: str | None = _opt(
        None,
        "Start from this adapter (mlx-lm or PEFT folder); its rank, alpha and modules "
        "replace the lora_* settings.",
    )

    # Rollout
    num_generations: int = _opt(8, "G: completions sampled per prompt.", allowed=Range(2))
    prompts_per_step: int = _opt(
        1,
        "B: prompts per optimisation step (B x G sequences); per process when distributed.",
        allowed=AT_LEAST_1,
    )
    max_completion_length: int = _opt(512, "Maximum tokens per completion.", allowed=AT_LEAST_1)
    temperature: float = _opt(1.0, "Sampling temperature (log-probs use it too).", allowed=POSITIVE)
    top_p: float = _opt(
        1.0, "Nucleus sampling threshold (1 = off).", allowed=Range(0, 1, low_open=True)
    )
    top_k: int = _opt(0, "Top-k sampling (0 = off).", allowed=AT_LEAST_0)
    min_p: float = _opt(0.0, "Min-p sampling (0 = off).", allowed=SHARE)

    # Objective
    loss_type: str = _opt(
        "dapo",
        "Loss: grpo, bnpo, dr_grpo, dapo (clipped surrogate, four normalisations); cispo "
        "(clipped weights, set epsilon_high e.g. 5); sapo (soft gate); luspo (sequence sums, "
        "with sequence ratios); vespo (Gamma weights, with token ratios).",
        choices=LOSS_TYPES,
    )
    beta: float = _opt(0.0, "KL penalty weight (0 = no reference pass).", allowed=AT_LEAST_0)
    kl_estimator: str = _opt(
        "k3", "KL per token: k3 estimator or exact full-vocabulary KL.", choices=KL_ESTIMATORS
    )
    use_bias_correction_kl: bool = _opt(
        True, "Multiply the k3 KL term by the importance ratio (TRL's default)."
    )
    epsilon: float = _opt(0.2, "Lower clipping range epsilon.", allowed=OPEN_UNIT)
    epsilon_high: float | None = _opt(
        None, "Upper clipping range (default: epsilon).", allowed=POSITIVE
    )
    delta: float | None = _opt(
        None,
        "Two-sided clipping: cap the ratio at delta in the clipped losses (> 1 + epsilon_high).",
        allowed=POSITIVE,
    )
    sapo_temperature_pos: float = _opt(1.0, "sapo: gate temperature where A > 0.", allowed=POSITIVE)
    sapo_temperature_neg: float = _opt(
        1.05, "sapo: gate temperature where A <= 0.", allowed=POSITIVE
    )
    vespo_k_pos: float = _opt(2.0, "vespo: power k where A >= 0.", allowed=AT_LEAST_0)
    vespo_lambda_pos: float = _opt(3.0, "vespo: decay lambda where A >= 0.", allowed=AT_LEAST_0)
    vespo_k_neg: float = _opt(3.0, "vespo: power k where A < 0.", allowed=AT_LEAST_0)
    vespo_lambda_neg: float = _opt(2.0, "vespo: decay lambda where A < 0.", allowed=AT_LEAST_0)
    off_policy_mask_threshold: float | None = _opt(
        None,
        "Drop from the policy term the rows with A < 0 whose mean log(pi_old / pi) per token "
        "exceeds this (off by default; matters when num_iterations > 1).",
        allowed=AT_LEAST_0,
    )
    top_entropy_quantile: float = _opt(
        1.0,
        "Keep in the policy term only the tokens whose entropy is in this top share of the "
        "micro-batch's (0.2 in the 80/20 paper; 1 = every token).",
        allowed=Range(0, 1),
    )
    entropy_coef: float = _opt(
        0.0,
        "Entropy bonus: subtract this x the mean token entropy from the loss (adaptive: the "
        "starting value).",
        allowed=Range(-FLOAT32_MAX, FLOAT32_MAX),
    )
    use_adaptive_entropy: bool = _opt(
        False,
        "Skywork-OR1's control: after each update, raise entropy_coef by entropy_coef_delta "
        "while the entropy is at or below entropy_target, else lower it; applied only then.",
    )
    entropy_coef_min: float = _opt(0.0, "Adaptive entropy: lowest coefficient.", allowed=AT_LEAST_0)
    entropy_coef_max: float = _opt(1.0, "Adaptive entropy: top coefficient.", allowed=AT_LEAST_0)
    entropy_coef_delta: float = _opt(
        0.005, "Adaptive entropy: change per update.", allowed=AT_LEAST_0
    )
    entropy_target: float = _opt(
        0.2,
        "Adaptive entropy: target mean entropy per token (nats; language models start at 2-10).",
        allowed=AT_LEAST_0,
    )
    mask_truncated_completions: bool = _opt(
        False,
        "Leave completions cut at max_completion_length out of the loss and the token count "
        "(their rewards still count in the advantages).",
    )
    num_iterations: int = _opt(1, "mu: optimisation passes per rollout.", allowed=AT_LEAST_1)
    dynamic_sampling: bool = _opt(
        False,
        "DAPO's dynamic sampling: drop groups whose rewards are all equal and roll out more "
        "prompts until the step has prompts_per_step groups that differ.",
    )
    max_resample_rounds: int = _opt(
        3,
        "Dynamic sampling: rollouts after the first at most; then the step is filled up with "
        "groups of equal rewards.",
        allowed=AT_LEAST_0,
    )
    importance_sampling_level: str = _opt(
        "token", "token (GRPO) or sequence (GSPO) ratios.", choices=IMPORTANCE_SAMPLING_LEVELS
    )
    scale_rewards: str = _opt("group", "Advantage scaling by std.", choices=SCALE_REWARDS)
    multi_objective_aggregation: str = _opt(
        "sum_then_normalize",
        "Several reward functions: normalise their weighted sum (scale_rewards applies), or "
        "normalize_then_sum: each function within its group, then the weighted sum over the "
        "batch (GDPO).",
        choices=MULTI_OBJECTIVE,
    )

    # Optimisation
    learning_rate: float = _opt(1e-5, "Peak learning rate of AdamW.", allowed=POSITIVE)
    lr_scheduler: str = _opt(
        "constant", "Schedule after warmup.", choices=("constant", "linear", "cosine")
    )
    warmup_steps: int = _opt(0, "Linear warmup steps from 0 to the peak rate.", allowed=AT_LEAST_0)
    weight_decay: float = _opt(0.0, "AdamW weight decay.", allowed=AT_LEAST_0)
    adam_beta1: float = _opt(0.9, "AdamW beta1.", allowed=SHARE)
    adam_beta2: float = _opt(0.999, "AdamW beta2.", allowed=SHARE)
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.", allowed=POSITIVE)
    max_grad_norm: float = _opt(
        1.0, "Clip the global gradient norm to this (0 = off).", allowed=AT_LEAST_0
    )
    gradient_accumulation_steps: int = _opt(
        1,
        "Micro-batches per optimizer update.",
        allowed=AT_LEAST_1,
    )
    steps_per_generation: int | None = _opt(
        None,
        "Micro-batches the B x G sequences of a rollout are split into (default: "
        "gradient_accumulation_steps); a multiple of it makes one rollout feed several "
        "optimizer updates, each of gradient_accumulation_steps micro-batches.",
        allowed=AT_LEAST_1,
    )
    max_steps: int = _opt(100, "Optimisation steps (rollouts) to run.", allowed=AT_LEAST_1)
    max_minutes: float | None = _opt(
        None,
        "Stop after the step that passes this many minutes of training.",
        allowed=POSITIVE,
    )
    logits_chunk_size: int = _opt(
        256,
        "Completion tokens (rows x positions) per LM-head chunk when scoring (bounds memory).",
        allowed=AT_LEAST_1,
    )
    grad_checkpoint: bool = _opt(
        True, "Recompute each block's activations in backward: much less memory, a little slower."
    )
    max_memory: str | None = _opt(
        None,
        "Memory budget, e.g. 12GB: the run decodes fewer sequences at once and updates in "
        "smaller chunks as needed to stay under it (default: on Apple silicon the GPU's "
        "recommended working set, elsewhere 70% of the memory).",
    )

    # Reporting
    logging_steps: int = _opt(
        1, "Print a sample of completions every this many steps.", allowed=AT_LEAST_1
    )
    report_to: list[str] = _opt(
        [],
        "Also send the metrics to: tensorboard (the run folder's tensorboard/), wandb "
        "(WANDB_PROJECT, default mlx-grpo). Each needs its package.",
    )
    save_steps: int = _opt(
        50,
        "Write a checkpoint (adapter, optimizer, data position, RNG, metrics) every this many "
        "steps (0 = only at the end).",
        allowed=AT_LEAST_0,
    )
    save_total_limit: int = _opt(
        3, "Keep this many newest checkpoints (0 = keep all).", allowed=AT_LEAST_0
    )

    # Failures
    on_reward_error: str = _opt(
        "raise",
        "When a reward function raises: stop the run (raise), score the completion 0 (zero), "
        "or leave it unscored like a None reward (skip). Every failure is logged.",
        choices=("raise", "zero", "skip"),
    )
    tools: list[str] = _opt(
        [],
        "Agent tools the model may call: module:function or path/to/file.py:function (typed, "
        "with a Google-style docstring; sync or async), as TRL's tools.",
    )
    environment: str | None = _opt(
        None,
        "An environment factory, module:Name or path/to/file.py:Name (TRL's "
        "environment_factory): one instance per episode; its public methods are tools.",
    )
    max_tool_calling_iterations: int | None = _opt(
        None, "Rounds of tool calls an episode may make (default: no limit).", allowed=AT_LEAST_0
    )
    tool_timeout: float = _opt(
        30.0,
        "Seconds a tool call may run; past it the model reads an error (the call counts as "
        "failed) and the step goes on.",
        allowed=POSITIVE,
    )
    eval_data: str | None = _opt(
        None,
        "Held-out prompts (a JSONL file or folder, as data) scored during training with the "
        "updated adapter; their figures are logged as eval_* metrics.",
    )
    eval_steps: int | None = _opt(
        None,
        "Evaluate after every this many steps (default: a tenth of max_steps).",
        allowed=AT_LEAST_1,
    )
    eval_samples: int = _opt(
        1,
        "Completions per held-out prompt; more gives pass@k (needs eval_temperature > 0).",
        allowed=AT_LEAST_1,
    )
    eval_temperature: float = _opt(
        0.0, "Sampling temperature of the evaluation (0: greedy).", allowed=AT_LEAST_0
    )
    eval_limit: int | None = _opt(
        None, "Evaluate only the first this many held-out prompts.", allowed=AT_LEAST_1
    )
    eval_success_threshold: float = _opt(
        1.0, "A held-out completion is correct when its weighted reward reaches this."
    )
    keep_best: str | None = _opt(
        None,
        "An eval metric (eval_reward, eval_accuracy, eval_pass@k, eval_rewards/<name>/mean): "
        "the adapter with its highest value so far is kept in the run's best/ folder.",
    )
    max_nonfinite_updates: int = _opt(
        5,
        "Stop after this many updates in a row skipped for a NaN or Inf loss or gradient.",
        allowed=AT_LEAST_1,
    )
    distributed_timeout: float = _opt(
        1800.0,
        "Distributed runs: seconds a process waits for the others at a synchronisation point "
        "before it stops the run (a hung process or a broken network).",
        allowed=POSITIVE,
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def slices(self) -> int:
        """Micro-batches a rollout is split into: steps_per_generation."""
        return self.steps_per_generation or self.gradient_accumulation_steps

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates one rollout feeds: mu x its slices / the accumulation steps."""
        return self.num_iterations * self.slices // self.gradient_accumulation_steps

    @property
    def lora_scale(self) -> float:
        return lora_scale(self.lora_alpha, self.lora_rank, self.use_rslora)

    def sampling(self) -> SamplingSettings:
        """How the rollout samples completions."""
        return SamplingSettings(
            self.temperature, self.top_p, self.top_k, self.min_p, self.max_completion_length
        )

    def loss_settings(self) -> LossSettings:
        """What the objective needs to know of the run."""
        return LossSettings(
            loss_type=self.loss_type,
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_upper,
            beta=self.beta,
            importance_sampling_level=self.importance_sampling_level,
            use_bias_correction_kl=self.use_bias_correction_kl,
            max_completion_length=self.max_completion_length,
            kl_estimator=self.kl_estimator,
            delta=self.delta,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos,
            vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
            top_entropy_quantile=self.top_entropy_quantile,
            entropy_bonus=self.entropy_coef != 0.0 or self.use_adaptive_entropy,
        )

    def validate(self) -> None:
        """Check choices, ranges and the settings that constrain each other.

        Raises SettingError naming the settings; `resolve` adds where each came from.
        """
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name))
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise SettingError(
                ("epsilon_high", "epsilon"),
                f"epsilon_high ({self.epsilon_high:g}) must be >= epsilon ({self.epsilon:g}): "
                "the upper clipping range cannot be narrower than the lower one",
            )
        if self.entropy_coef_min > self.entropy_coef_max:
            raise SettingError(
                ("entropy_coef_min", "entropy_coef_max"),
                f"entropy_coef_min ({self.entropy_coef_min:g}) must be <= entropy_coef_max "
                f"({self.entropy_coef_max:g})",
            )
        self._check_slices()
        self._check_evaluation()
        if not self.lora_targets:
            raise SettingError(("lora_targets",), "must name at least one module, e.g. q_proj", [])
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if any("." in t for t in unknown):
            raise SettingError(
                ("lora_targets",), "must be leaf names like q_proj", self.lora_targets
            )
        if not _LAYERS_RE.fullmatch(self.lora_layers.replace(" ", "")):
            raise SettingError(
                ("lora_layers",), "must be all, last:N or indices like 0,1,5", self.lora_layers
            )
        if self.max_memory is not None:
            try:
                parse_size(self.max_memory)
            except ValueError:
                raise SettingError(
                    ("max_memory",), "must be a size such as 12GB, 8GiB or 900MB", self.max_memory
                ) from None
        unknown = [t for t in self.report_to if t not in TRACKERS]
        if unknown:
            raise SettingError(
                ("report_to",), f"must name trackers among {', '.join(TRACKERS)}", self.report_to
            )
        if missing(self.report_to):
            raise SettingError(
                ("report_to",),
                f"needs a package that is not installed: {'; '.join(missing(self.report_to))}",
                self.report_to,
            )
        for name in ("prompt_column", "output_dir"):
            if not getattr(self, name).strip():
                raise SettingError((name,), "must not be empty", getattr(self, name))
        # The weight count is checked where the rewards are known (Python callables count too).

    def _check_slices(self) -> None:
        n, ga = self.num_generations * self.prompts_per_step, self.gradient_accumulation_steps
        name = "steps_per_generation"
        if not self.steps_per_generation:
            name = "gradient_accumulation_steps"
        if self.slices % ga:
            raise SettingError(
                ("steps_per_generation", "gradient_accumulation_steps"),
                f"steps_per_generation={self.slices} must be a multiple of "
                f"gradient_accumulation_steps={ga}: every optimizer update takes {ga} "
                "micro-batches of one rollout (for fewer updates per rollout, raise "
                "prompts_per_step instead)",
            )
        if n % self.slices:
            raise SettingError(
                (name, "num_generations", "prompts_per_step"),
                f"{name}={self.slices} must divide prompts_per_step x num_generations = {n} "
                "(the rollout is split into that many micro-batches)",
            )

    def _check_evaluation(self) -> None:
        if self.eval_samples > 1 and self.eval_temperature == 0:
            raise SettingError(
                ("eval_samples", "eval_temperature"),
                f"eval_samples={self.eval_samples} needs sampling: set eval_temperature above 0 "
                "(greedy decoding gives the same completion every time)",
            )
        if self.keep_best is not None and self.eval_data is None:
            raise SettingError(
                ("keep_best", "eval_data"),
                "keep_best needs an evaluation: give eval_data (held-out prompts)",
            )
        if self.keep_best is not None and not self.keep_best.startswith("eval_"):
            raise SettingError(
                ("keep_best",),
                "must name an eval metric such as eval_reward or eval_accuracy",
                self.keep_best,
            )

    @property
    def eval_every(self) -> int:
        """Steps between evaluations."""
        return self.eval_steps or max(1, self.max_steps // 10)

    def prompt_limit(self, context: int | None, model: str) -> int | None:
        """The longest prompt (tokens) that leaves room for a whole completion.

        `context` is the model's max_position_embeddings (None: unknown).
        Refuses a completion length that leaves no room for any prompt.
        """
        if context is None:
            return self.max_prompt_length
        room = context - self.max_completion_length
        if room < 1:
            raise ValueError(
                f"max_completion_length {self.max_completion_length} leaves no room for a prompt "
                f"in the model's context of {context} tokens (max_position_embeddings in "
                f"{model}'s config.json); set --max-completion-length below {context}."
            )
        if self.max_prompt_length is not None and self.max_prompt_length > room:
            raise ValueError(
                f"max_prompt_length {self.max_prompt_length} + max_completion_length "
                f"{self.max_completion_length} exceed the model's context of {context} tokens "
                f"(max_position_embeddings in {model}'s config.json); lower one of them so "
                f"that they add up to at most {context}."
            )
        return room if self.max_prompt_length is None else self.max_prompt_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# How `mlx-grpo train --help` groups the settings; every field is in exactly one topic.
TOPICS: dict[str, tuple[str, ...]] = {
    "Model": ("model", "dtype", "adapter"),
    "Data": ("data", "prompt_column", "system_prompt", "enable_thinking", "max_prompt_length"),
    "Rewards": ("rewards", "reward_weights", "on_reward_error"),
    "GRPO": (
        "num_generations",
        "prompts_per_step",
        "loss_type",
        "beta",
        "kl_estimator",
        "use_bias_correction_kl",
        "epsilon",
        "epsilon_high",
        "delta",
        "sapo_temperature_pos",
        "sapo_temperature_neg",
        "vespo_k_pos",
        "vespo_lambda_pos",
        "vespo_k_neg",
        "vespo_lambda_neg",
        "off_policy_mask_threshold",
        "top_entropy_quantile",
        "entropy_coef",
        "use_adaptive_entropy",
        "entropy_coef_min",
        "entropy_coef_max",
        "entropy_coef_delta",
        "entropy_target",
        "mask_truncated_completions",
        "num_iterations",
        "dynamic_sampling",
        "max_resample_rounds",
        "importance_sampling_level",
        "scale_rewards",
        "multi_objective_aggregation",
    ),
    "Sampling": ("max_completion_length", "temperature", "top_p", "top_k", "min_p"),
    "LoRA": (
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_targets",
        "lora_layers",
        "use_rslora",
    ),
    "Optimisation": (
        "learning_rate",
        "lr_scheduler",
        "warmup_steps",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "gradient_accumulation_steps",
        "steps_per_generation",
        "max_nonfinite_updates",
    ),
    "Run and checkpoints": (
        "output_dir",
        "overwrite",
        "seed",
        "max_steps",
        "max_minutes",
        "logging_steps",
        "report_to",
        "save_steps",
        "save_total_limit",
        "distributed_timeout",
    ),
    "Agents": ("tools", "environment", "max_tool_calling_iterations", "tool_timeout"),
    "Evaluation": (
        "eval_data",
        "eval_steps",
        "eval_samples",
        "eval_temperature",
        "eval_limit",
        "eval_success_threshold",
        "keep_best",
    ),
    "Memory": ("max_memory", "grad_checkpoint", "logits_chunk_size"),
}


def check_field(f: dataclasses.Field, value: Any) -> None:
    """Refuse a value outside the field's choices or range (SettingError names the field)."""
    choices, allowed = f.metadata.get("choices"), f.metadata.get("allowed")
    if choices and value not in choices:
        raise SettingError((f.name,), f"must be one of {', '.join(choices)}", value)
    values = value if isinstance(value, list) else [value]
    big = f.name != "seed" and any(isinstance(v, int) and v > INT32_MAX for v in values)
    if big:  # arrays and loop counts are 32-bit in MLX
        raise SettingError((f.name,), f"must be at most {INT32_MAX}", value)
    if allowed is not None and any(v is not None and v not in allowed for v in values):
        rule = f"must {'each ' if isinstance(value, list) else ''}be {allowed}"
        raise SettingError((f.name,), rule, value)


def setting(name: str) -> dataclasses.Field:
    """TrainConfig's field `name`: its default, help text (`metadata["help"]`) and range."""
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name)


DEFAULTS = TrainConfig()  # the trainer's defaults, for the tools that share its options


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
