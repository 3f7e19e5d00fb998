"""A training run's state: set up from its settings, saved to and restored from
checkpoints, and handed from process 0 to the others in a distributed run.

`setup` loads everything a run needs (rewards, model, adapters, data,
optimizer) and checks every input before anything is written; the step loop
that moves a `Run` forward is in trainer.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo import __version__, checkpoint
from mlx_grpo import data as data_mod
from mlx_grpo import rewards as rewards_mod
from mlx_grpo.adapters import Adapter
from mlx_grpo.config import TrainConfig
from mlx_grpo.distributed import Peers
from mlx_grpo.lora import apply_lora, parse_layers, total_count, trainable_count
from mlx_grpo.models import LoadedModel, checkpoint_blocks, load_model
from mlx_grpo.reporting import CONFIG_FILE, rewrite_logs


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
    resume_notes: list[str] = field(default_factory=list)  # checkpoints not used, and why, ...
    model_fingerprint: str | None = None  # of the local model folder, taken once at setup
    peers: Peers = field(default_factory=Peers)  # the processes of a data-parallel run
    last: checkpoint.Snapshot | None = None  # state after the last completed step


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
        "processes": run.peers.size,
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
    run.resume_notes = [f"not used: {why}" for why in saved.skipped]
    before = state.get("processes", 1)
    if before != run.peers.size:
        run.resume_notes.append(
            f"the run used {before} process(es), now {run.peers.size}: each step now takes "
            f"{run.peers.size} x {run.cfg.prompts_per_step} prompts (it continues, but not "
            "as the original run would have)"
        )
    checkpoint.restore_rng(state["rng"])
    rewrite_logs(run.output_dir, run.history, run.step)


def setup(
    cfg: TrainConfig,
    reward_funcs: list[Callable],
    resume: bool = False,
    peers: Peers | None = None,
) -> Run:
    """Seed, load rewards, model, adapters and data, then prepare the output directory.

    With `resume`, the output directory's newest checkpoint is restored.
    Nothing is written before every input has been checked. In a distributed
    run only process 0 touches the output directory; it hands its state
    (adapter, optimizer, data position, RNG) to the others.
    """
    peers = peers or Peers()
    output_dir = checkpoint.check_output(cfg, resume) if peers.main else Path(cfg.output_dir)
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
    run.peers = peers
    peers.check_same(
        {
            "versions": [mx.__version__, __version__],
            "model": [lm.config, run.model_fingerprint, paths],
            "data": [r.prompt_ids for r in rows],
            "rewards": [[r.name, r.weight] for r in rewards],
        }
    )
    if peers.main:
        if resume:
            restore(run, checkpoint.latest(output_dir))
        else:
            checkpoint.prepare_output(cfg)
            cfg.save(output_dir / CONFIG_FILE)
    share_state(run)
    return run


def share_state(run: Run) -> None:
    """Give every process process 0's adapter, optimizer, data position and RNG."""
    peers = run.peers
    if peers.size == 1:
        return
    model = run.lm.model
    params = peers.broadcast(dict(tree_flatten(model.trainable_parameters())), "the adapter")
    model.update(tree_unflatten(list(params.items())))
    moments = peers.broadcast(dict(tree_flatten(run.optimizer.state)), "the optimizer state")
    run.optimizer.state = tree_unflatten(list(moments.items()))
    mx.eval(model.parameters(), run.optimizer.state)
    state = peers.broadcast_json(
        {
            "step": run.step,
            "epoch": run.epoch,
            "queue": run.queue,
            "order": checkpoint.order_state(run.order),
            "rng": checkpoint.take_rng(),
            "num_tokens": run.num_tokens,
            "bad_updates": run.bad_updates,
            "history": run.history,
        },
        "the run's state",
    )
    run.step, run.epoch, run.queue = state["step"], state["epoch"], state["queue"]
    run.order = checkpoint.order_from_state(state["order"])
    run.num_tokens, run.bad_updates = state["num_tokens"], state["bad_updates"]
    run.history = state["history"]
    checkpoint.restore_rng(state["rng"])


def _adopt_adapter_shape(cfg: TrainConfig, adapter: Adapter) -> None:
    """Record the starting adapter's LoRA shape in the run's settings."""
    cfg.lora_rank, cfg.lora_alpha, cfg.use_rslora = adapter.rank, adapter.alpha, adapter.rslora
    cfg.lora_targets = sorted({p.rsplit(".", 1)[-1] for p in adapter.modules})
    indices = sorted(
        {int(part) for p in adapter.modules for part in p.split(".") if part.isdigit()}
    )
    cfg.lora_layers = ",".join(map(str, indices))


def summary(run: Run) -> str:
    n_train, n_total = trainable_count(run.lm.model), total_count(run.lm.model)
    cfg, peers = run.cfg, run.peers
    per_step = f"{cfg.prompts_per_step} prompts x {cfg.num_generations} completions per step"
    if peers.size > 1:
        per_step = (
            f"{peers.size} processes x {per_step} = {peers.size * cfg.prompts_per_step} prompts"
        )
    return (
        f"model {cfg.model} | LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on "
        f"{len(run.lora_paths)} modules\n"
        f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%)\n"
        f"{len(run.rows)} prompts | {per_step} | {cfg.max_steps} steps | output {run.output_dir}"
    )


def next_prompts(run: Run) -> list[data_mod.PromptRow]:
    """The next B prompts of a seeded shuffle, reshuffled every epoch (N x B for N processes)."""
    picked = []
    while len(picked) < run.cfg.prompts_per_step * run.peers.size:
        if not run.queue:
            run.queue = run.order.permutation(len(run.rows)).tolist()
            run.epoch += 1
        picked.append(run.rows[run.queue.pop(0)])
    return picked
