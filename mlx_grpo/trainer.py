"""The GRPO-LoRA training loop: rollout -> rewards -> advantages -> updates -> metrics.

Each step takes B prompts, samples G completions of each in one batch,
scores them with the reward functions, and turns the rewards into group
advantages. pi_old log-probs are taken once after generation when more than
one pass runs over the rollout (mu > 1); the reference log-probs come from
the same model with the adapters switched off, and only when beta != 0.
Each of the mu passes accumulates gradients over the micro-batches and
makes one AdamW update. The math lives in objective.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_grpo import data as data_mod
from mlx_grpo import rewards as rewards_mod
from mlx_grpo.adapters import Adapter
from mlx_grpo.config import TrainConfig, resolve
from mlx_grpo.lora import apply_lora, parse_layers, total_count, trainable_count
from mlx_grpo.models import LoadedModel, load_model
from mlx_grpo.objective import group_advantages
from mlx_grpo.reporting import METRICS_FILE, Reporter, length_metrics, reward_metrics
from mlx_grpo.rollout import SamplingSettings, rollout
from mlx_grpo.update import lr_at, micro_batches, optimise


@dataclass
class Run:
    """Everything a run holds between steps."""

    cfg: TrainConfig
    lm: LoadedModel
    lora_paths: list[str]
    rewards: list[rewards_mod.Reward]
    rows: list[data_mod.PromptRow]
    optimizer: optim.Optimizer
    output_dir: Path
    order: np.random.Generator
    queue: list[int] = field(default_factory=list)
    epoch: int = 0
    num_tokens: int = 0


@dataclass
class TrainResult:
    output_dir: Path
    metrics: list[dict[str, Any]]


def train(
    config: TrainConfig | str | Path | None = None,
    *,
    reward_funcs: list[Callable] | None = None,
    show_progress: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Train a LoRA adapter with GRPO; return the output directory and metrics.

    `config` is a TrainConfig or a YAML path; keyword overrides win over it.
    `reward_funcs` adds Python callables (TRL signature) after the named
    rewards; `reward_weights` then covers both, in that order. Given alone
    (no `rewards`, no config), the callables are the only rewards.

    Example:
        >>> import mlx_grpo
        >>> def short(prompts, completions, completion_ids, **kw):
        ...     return [-len(c) / 100 for c in completions]
        >>> result = mlx_grpo.train(model="Qwen/Qwen3-0.6B", data="train.jsonl",
        ...                         rewards=["math_answer"], reward_funcs=[short],
        ...                         max_steps=50, output_dir="runs/demo")
        >>> result.metrics[-1]["reward"]
    """
    if reward_funcs and config is None and "rewards" not in overrides:
        overrides["rewards"] = []  # callables alone, not the default math_answer too
    if isinstance(config, TrainConfig):
        cfg = resolve(None, **{**config.to_dict(), **overrides})
    else:
        cfg = resolve(config, **overrides)
    run = setup(cfg, reward_funcs or [])
    # A time limit makes the step count unknown: show elapsed time and rate instead.
    total = None if cfg.max_minutes else cfg.max_steps
    reporter = Reporter(run.output_dir, total, show_progress)
    reporter.write(_summary(run))
    history = []
    started = time.perf_counter()
    try:
        for step in range(cfg.max_steps):
            metrics, samples = train_step(run, step)
            history.append(metrics)
            reporter.log(metrics)
            if step % cfg.logging_steps == 0:
                reporter.samples(step + 1, samples)
            if cfg.save_steps and (step + 1) % cfg.save_steps == 0:
                _save(run)
            if cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes:
                reporter.write(f"stopping after {step + 1} steps: {cfg.max_minutes:g} minutes")
                break
        _save(run)
    finally:
        reporter.close()
    return TrainResult(run.output_dir, history)


def setup(cfg: TrainConfig, reward_funcs: list[Callable]) -> Run:
    """Seed, prepare the output directory, load model, adapters, rewards and data."""
    output_dir = _prepare_output(cfg)
    mx.random.seed(cfg.seed)
    rewards = rewards_mod.load_rewards(cfg.rewards, None) if cfg.rewards or not reward_funcs else []
    rewards += [rewards_mod.Reward(getattr(f, "__name__", "reward"), f) for f in reward_funcs]
    weights = cfg.reward_weights or [1.0] * len(rewards)
    if len(weights) != len(rewards):
        names = [r.name for r in rewards]
        raise ValueError(
            f"reward_weights has {len(weights)} values for {len(rewards)} rewards {names}"
        )
    rewards = [rewards_mod.Reward(r.name, r.fn, w) for r, w in zip(rewards, weights)]

    lm = load_model(cfg.model, cfg.dtype)
    if cfg.adapter:
        start = Adapter.load(cfg.adapter)
        start.attach(lm.model)
        _adopt_adapter_shape(cfg, start)
        paths = start.modules
    else:
        layers = parse_layers(cfg.lora_layers, len(lm.model.layers))
        paths = apply_lora(
            lm.model, cfg.lora_rank, cfg.lora_scale, cfg.lora_dropout, cfg.lora_targets, layers
        )
    if cfg.grad_checkpoint:
        _checkpoint_layers(lm.model)
    mx.eval(lm.model.parameters())

    max_prompt = cfg.max_prompt_length or lm.config.get("max_position_embeddings")
    rows = data_mod.load_prompts(
        cfg.data,
        lm.tokenizer,
        cfg.prompt_column,
        cfg.system_prompt,
        cfg.enable_thinking,
        max_prompt,
    )
    optimizer = optim.AdamW(
        learning_rate=cfg.learning_rate,
        betas=[cfg.adam_beta1, cfg.adam_beta2],
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        bias_correction=True,  # as torch.optim.AdamW
    )
    cfg.save(output_dir / "config.yaml")
    return Run(
        cfg, lm, paths, rewards, rows, optimizer, output_dir, np.random.default_rng(cfg.seed)
    )


def _adopt_adapter_shape(cfg: TrainConfig, adapter: Adapter) -> None:
    """Record the starting adapter's LoRA shape in the run's settings."""
    cfg.lora_rank, cfg.lora_alpha, cfg.use_rslora = adapter.rank, adapter.alpha, adapter.rslora
    cfg.lora_targets = sorted({p.rsplit(".", 1)[-1] for p in adapter.modules})
    indices = sorted(
        {int(part) for p in adapter.modules for part in p.split(".") if part.isdigit()}
    )
    cfg.lora_layers = ",".join(map(str, indices))


def _prepare_output(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    if (out / METRICS_FILE).exists() and not cfg.overwrite:
        raise ValueError(
            f"output directory {out} already holds a run ({METRICS_FILE}); "
            "choose another --output-dir or pass --overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        for name in (METRICS_FILE, "completions.jsonl"):
            (out / name).unlink(missing_ok=True)
    return out


def _checkpoint_layers(model: nn.Module) -> None:
    """Recompute each transformer block's activations during backward.

    Only blocks marked here and only in training mode are affected, so other
    models of the same class in the process keep their plain forward.
    """
    cls = type(model.layers[0])
    for layer in model.layers:
        layer._grad_checkpoint = True
    if getattr(cls, "_plain_call", None) is not None:
        return
    cls._plain_call = plain = cls.__call__

    def call(self, x, mask=None, cache=None, **kwargs):
        if not (self.training and getattr(self, "_grad_checkpoint", False)):
            return plain(self, x, mask, cache, **kwargs)
        # The block's keys and values pass through the checkpoint as explicit
        # inputs and outputs: later blocks' gradients reach them only that way.
        # The backward pass calls `inner` again, on the cache as it was before.
        before = dict(vars(cache)) if cache is not None else {}
        state = [a for a in (before.get("keys"), before.get("values")) if a is not None]

        def inner(params, h, *state):
            if cache is None:
                self.update(params)
                return (plain(self, h, mask, None, **kwargs),)
            vars(cache).update(before)
            if state:
                cache.keys, cache.values = state
            self.update(params)
            out = plain(self, h, mask, cache, **kwargs)
            return out, cache.keys, cache.values

        outs = mx.checkpoint(inner)(self.trainable_parameters(), x, *state)
        if cache is not None:
            cache.keys, cache.values = outs[1], outs[2]
        return outs[0]

    cls.__call__ = call


def _summary(run: Run) -> str:
    n_train, n_total = trainable_count(run.lm.model), total_count(run.lm.model)
    cfg = run.cfg
    return (
        f"model {cfg.model} | LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on "
        f"{len(run.lora_paths)} modules\n"
        f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%)\n"
        f"{len(run.rows)} prompts | {cfg.prompts_per_step} prompts x {cfg.num_generations} "
        f"completions per step | {cfg.max_steps} steps | output {run.output_dir}"
    )


def next_prompts(run: Run) -> list[data_mod.PromptRow]:
    """The next B prompts of a seeded shuffle, reshuffled every epoch."""
    picked = []
    while len(picked) < run.cfg.prompts_per_step:
        if not run.queue:
            run.queue = run.order.permutation(len(run.rows)).tolist()
            run.epoch += 1
        picked.append(run.rows[run.queue.pop(0)])
    return picked


def train_step(run: Run, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One rollout and its mu updates; returns the step's metrics and samples."""
    cfg, model = run.cfg, run.lm.model
    rows = next_prompts(run)
    mx.reset_peak_memory()  # so peak_memory_gb is this step's peak
    t0 = time.perf_counter()
    model.eval()
    sampling = SamplingSettings(
        cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p, cfg.max_completion_length
    )
    batch = rollout(
        model,
        [r.prompt_ids for r in rows],
        cfg.num_generations,
        sampling,
        run.lm.eos_ids,
        run.lm.pad_id,
    )
    t_rollout = time.perf_counter() - t0
    peaks = {"memory/rollout_gb": mx.get_peak_memory() / 1e9}

    ids = batch.completion_lists()
    texts = [run.lm.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    g = cfg.num_generations
    per_func = rewards_mod.score_groups(run.rewards, rows, g, texts, ids)
    weights = np.array([r.weight for r in run.rewards], dtype=np.float32)
    adv = group_advantages(per_func, weights, g, cfg.scale_rewards)

    t1 = time.perf_counter()
    mx.reset_peak_memory()
    micro = micro_batches(model, batch, mx.array(adv.advantages), cfg)
    t_reference = time.perf_counter() - t1
    peaks["memory/reference_gb"] = mx.get_peak_memory() / 1e9

    t2 = time.perf_counter()
    mx.reset_peak_memory()
    update = optimise(model, run.optimizer, micro, cfg, lr_at(step, cfg))
    t_update = time.perf_counter() - t2
    peaks["memory/update_gb"] = mx.get_peak_memory() / 1e9

    n_completion = int(batch.completion_mask.sum().item())
    run.num_tokens += n_completion + int(
        (batch.prompt_tokens.shape[1] - batch.prompt_padding).sum().item()
    )
    metrics = {
        "step": step + 1,
        "epoch": run.epoch,
        **reward_metrics([r.name for r in run.rewards], per_func, adv),
        **length_metrics(batch.lengths, batch.truncated),
        **update,
        "num_tokens": run.num_tokens,
        "tokens_per_second": n_completion / max(t_rollout, 1e-9),
        "time/rollout": t_rollout,
        "time/reference": t_reference,
        "time/update": t_update,
        "peak_memory_gb": max(peaks.values()),
        **peaks,
    }
    samples = [
        {
            "prompt": rows[i // g].prompt,
            "completion": texts[i],
            "rewards": {
                r.name: rewards_mod.optional_float(per_func[i, k])
                for k, r in enumerate(run.rewards)
            },
            "advantage": float(adv.advantages[i]),
        }
        for i in range(g)
    ]
    return metrics, samples


def _save(run: Run) -> Path:
    cfg = run.cfg
    adapter = Adapter.from_model(
        run.lm.model, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, base_model=cfg.model
    )
    return adapter.save(run.output_dir)
