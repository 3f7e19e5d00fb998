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

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from mlx_grpo import checkpoint
from mlx_grpo import data as data_mod
from mlx_grpo import rewards as rewards_mod
from mlx_grpo.adapters import Adapter
from mlx_grpo.config import TrainConfig, resolve
from mlx_grpo.interrupts import Interrupted, stop_on_signals
from mlx_grpo.lora import apply_lora, parse_layers, total_count, trainable_count
from mlx_grpo.models import LoadedModel, checkpoint_blocks, load_model
from mlx_grpo.objective import group_advantages
from mlx_grpo.reporting import (
    CONFIG_FILE,
    REWARD_ERRORS_FILE,
    Reporter,
    clean_record,
    length_metrics,
    reward_metrics,
    rewrite_logs,
)
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
    bad_updates: int = 0  # updates skipped in a row for non-finite values
    step: int = 0  # steps completed
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics, JSON-ready
    saved_step: int = 0  # step of the newest checkpoint on disk
    skipped_checkpoints: list[str] = field(default_factory=list)  # on resume, and why
    model_fingerprint: str | None = None  # of the local model folder, taken once at setup


@dataclass
class TrainResult:
    output_dir: Path
    metrics: list[dict[str, Any]]


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite updates); its last good state is saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(
    config: TrainConfig | str | Path | None = None,
    *,
    reward_funcs: list[Callable] | None = None,
    show_progress: bool = True,
    resume: str | Path | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a LoRA adapter with GRPO; return the output directory and metrics.

    `config` is a TrainConfig or a YAML path; keyword overrides win over it.
    `reward_funcs` adds Python callables (TRL signature) after the named
    rewards; `reward_weights` then covers both, in that order. Given alone
    (no `rewards`, no config), the callables are the only rewards.

    `resume` continues the run in that output directory from its newest
    checkpoint, with the settings it started with (`overrides` may change
    only `checkpoint.RESUMABLE` ones, e.g. max_steps). The result equals an
    uninterrupted run's. Ctrl-C or SIGTERM saves a checkpoint and raises
    TrainingInterrupted; any other error saves one too before propagating.

    Example:
        >>> import mlx_grpo
        >>> def short(prompts, completions, completion_ids, **kw):
        ...     return [-len(c) / 100 for c in completions]
        >>> result = mlx_grpo.train(model="Qwen/Qwen3-0.6B", data="train.jsonl",
        ...                         rewards=["math_answer"], reward_funcs=[short],
        ...                         max_steps=50, output_dir="runs/demo")
        >>> result.metrics[-1]["reward"]
        >>> mlx_grpo.train(resume="runs/demo", max_steps=100)  # 50 more steps
    """
    if resume is not None:
        cfg = checkpoint.resume_settings(resume, config, overrides)
    else:
        if reward_funcs and config is None and "rewards" not in overrides:
            overrides["rewards"] = []  # callables alone, not the default math_answer too
        if isinstance(config, TrainConfig):
            cfg = resolve(None, **{**config.to_dict(), **overrides})
        else:
            cfg = resolve(config, **overrides)
    run = setup(cfg, reward_funcs or [], resume=resume is not None)
    # A time limit makes the step count unknown: show elapsed time and rate instead.
    total = None if cfg.max_minutes else cfg.max_steps
    reporter = Reporter(run.output_dir, total, show_progress, initial=run.step)
    reporter.write(_summary(run))
    if resume is not None:
        reporter.write(_resumed(run))
    try:
        with stop_on_signals():
            _loop(run, reporter)
    finally:
        reporter.close()
    return TrainResult(run.output_dir, run.history)


def _loop(run: Run, reporter: Reporter) -> None:
    """Steps until max_steps or max_minutes; checkpoints; saving on every way out."""
    cfg = run.cfg
    last = snapshot(run)
    started = time.perf_counter()
    try:
        for step in range(run.step, cfg.max_steps):
            metrics, samples = train_step(run, step)
            last = snapshot(run)  # before the logs show the step, so a save includes it
            reporter.log(metrics)
            if step % cfg.logging_steps == 0:
                reporter.samples(step + 1, samples)
            if cfg.save_steps and run.step % cfg.save_steps == 0:
                _save_checkpoint(run, last)
            if run.bad_updates >= cfg.max_nonfinite_updates:
                raise TrainingStopped(
                    f"{run.bad_updates} updates in a row had a NaN or Inf loss or gradient "
                    f"(up to step {run.step}); none was applied, so the adapter holds its last "
                    "finite weights. Lower learning_rate, check the rewards and data for extreme "
                    f"values, then continue with `mlx-grpo train --resume {run.output_dir}`."
                )
            if cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes:
                reporter.write(f"stopping after {step + 1} steps: {cfg.max_minutes:g} minutes")
                break
        _save_checkpoint(run, last)
        _save(run)
    except Interrupted as exc:
        where = _save_checkpoint(run, last)
        raise TrainingInterrupted(
            f"{exc} received: stopped after step {last.step}; {where}. "
            f"Resume with: mlx-grpo train --resume {run.output_dir}",
            exc.exit_code,
        ) from None
    except BaseException:
        reporter.write(f"run stopped by an error; {_save_checkpoint(run, last)}")
        raise


def _save_checkpoint(run: Run, snap: checkpoint.Snapshot) -> str:
    """Write `snap` unless it is already on disk; say where the progress is."""
    if snap.step > run.saved_step:
        checkpoint.write(run.output_dir, snap, run.cfg.save_total_limit)
        run.saved_step = snap.step
    if run.saved_step == 0:
        return "no step completed, nothing to save"
    return (
        f"checkpoint of step {run.saved_step} in {checkpoint.path(run.output_dir, run.saved_step)}"
    )


def snapshot(run: Run) -> checkpoint.Snapshot:
    """The run's state after its last completed step (array references: no copy)."""
    cfg = run.cfg
    adapter = Adapter.from_model(
        run.lm.model, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, base_model=cfg.model
    )
    state = {
        "step": run.step,
        "epoch": run.epoch,
        "queue": list(run.queue),
        "order": checkpoint.order_state(run.order),
        "rng": checkpoint.take_rng(),
        "num_tokens": run.num_tokens,
        "bad_updates": run.bad_updates,
        "metrics": list(run.history),
        "rewards": [r.name for r in run.rewards],
        "model_fingerprint": run.model_fingerprint,
        "config": cfg.to_dict(),
    }
    return checkpoint.Snapshot(run.step, adapter, dict(tree_flatten(run.optimizer.state)), state)


def restore(run: Run, saved: checkpoint.Loaded) -> None:
    """Put a checkpoint's adapter, optimizer, data position and RNG into `run`."""
    state = saved.state
    checkpoint.check_compatible(saved, run.cfg, [r.name for r in run.rewards])
    weights = {f"{p}.lora_a": a for p, a in saved.adapter.lora_a.items()}
    weights |= {f"{p}.lora_b": b for p, b in saved.adapter.lora_b.items()}
    current = dict(tree_flatten(run.lm.model.trainable_parameters()))
    if set(weights) != set(current) or any(weights[k].shape != current[k].shape for k in current):
        raise ValueError(
            f"the adapter in {saved.path} does not fit the model as this run configures it "
            f"({len(weights)} factors saved, {len(current)} expected); the checkpoint belongs "
            "to another model or LoRA shape. Resume with the run's own model, or start anew."
        )
    run.lm.model.update(tree_unflatten(list(weights.items())))
    run.optimizer.state = tree_unflatten(list(saved.optimizer.items()))
    mx.eval(run.lm.model.parameters(), run.optimizer.state)
    run.step = run.saved_step = saved.step
    run.epoch, run.queue = state["epoch"], list(state["queue"])
    run.order = checkpoint.order_from_state(state["order"])
    run.num_tokens, run.bad_updates = state["num_tokens"], state["bad_updates"]
    run.history = list(state["metrics"])
    run.skipped_checkpoints = saved.skipped
    checkpoint.restore_rng(state["rng"])
    rewrite_logs(run.output_dir, run.history, run.step)


def _resumed(run: Run) -> str:
    notes = "".join(f"\n  not used: {why}" for why in run.skipped_checkpoints)
    return f"resumed at step {run.step} from {checkpoint.path(run.output_dir, run.step)}{notes}"


def setup(cfg: TrainConfig, reward_funcs: list[Callable], resume: bool = False) -> Run:
    """Seed, load rewards, model, adapters and data, then prepare the output directory.

    With `resume`, the output directory's newest checkpoint is restored.
    Nothing is written before every input has been checked.
    """
    output_dir = checkpoint.check_output(cfg, resume)
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
        checkpoint_blocks(lm.model)
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
    optimizer.init(lm.model.trainable_parameters())  # so a checkpoint before step 1 has it
    run = Run(cfg, lm, paths, rewards, rows, optimizer, output_dir, np.random.default_rng(cfg.seed))
    run.model_fingerprint = checkpoint.fingerprint(cfg.model)
    if resume:
        restore(run, checkpoint.latest(output_dir))
    else:
        checkpoint.prepare_output(cfg)
        cfg.save(output_dir / CONFIG_FILE)
    return run


def _adopt_adapter_shape(cfg: TrainConfig, adapter: Adapter) -> None:
    """Record the starting adapter's LoRA shape in the run's settings."""
    cfg.lora_rank, cfg.lora_alpha, cfg.use_rslora = adapter.rank, adapter.alpha, adapter.rslora
    cfg.lora_targets = sorted({p.rsplit(".", 1)[-1] for p in adapter.modules})
    indices = sorted(
        {int(part) for p in adapter.modules for part in p.split(".") if part.isdigit()}
    )
    cfg.lora_layers = ",".join(map(str, indices))


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
    per_func = rewards_mod.score_groups(
        run.rewards, rows, g, texts, ids, cfg.on_reward_error, _reward_error_log(run, step)
    )
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
    for applied in update.applied:
        run.bad_updates = 0 if applied else run.bad_updates + 1
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
        **update.metrics,
        "num_tokens": run.num_tokens,
        "tokens_per_second": n_completion / max(t_rollout, 1e-9),
        "time/rollout": t_rollout,
        "time/reference": t_reference,
        "time/update": t_update,
        "peak_memory_gb": max(peaks.values()),
        **peaks,
    }
    run.step = step + 1
    run.history.append(clean_record(metrics))
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


def _reward_error_log(run: Run, step: int) -> Callable[[dict[str, Any]], None]:
    """Append a reward failure to reward_errors.jsonl and say so on the console."""

    def log(record: dict[str, Any]) -> None:
        with open(run.output_dir / REWARD_ERRORS_FILE, "a") as f:
            f.write(json.dumps({"step": step + 1, **record}) + "\n")
        action = {"raise": "stopping", "zero": "scored 0", "skip": "left unscored"}
        tqdm.write(
            f"reward {record['function']} failed on {record['row']} at step {step + 1} "
            f"({record['error']}); {action[record['action']]}. Details in "
            f"{run.output_dir / REWARD_ERRORS_FILE}",
            file=sys.stderr,
        )

    return log


def _save(run: Run) -> Path:
    cfg = run.cfg
    adapter = Adapter.from_model(
        run.lm.model, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, base_model=cfg.model
    )
    return adapter.save(run.output_dir)
