"""Setting a run up: lock its folder, load and check every input, restore a checkpoint.

`setup` locks the run folder, loads everything a run needs (model, adapters,
data, optimizer, and last the rewards, whose code it imports) and checks every
input before anything is written. A `Run` is what it returns: the loaded
parts and the `RunState` (state.py) that checkpoints save and restore, handed
from process 0 to the others in a distributed run. The loop that moves a run
forward is in trainer.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo.core import __version__, checkpoint, evaluation, memory, models, outputs, runfolder
from mlx_grpo.core import data as data_mod
from mlx_grpo.core import rewards as rewards_mod
from mlx_grpo.core.adapters import MLX_CONFIG, MLX_WEIGHTS, Adapter, load_adapted
from mlx_grpo.core.agent import Agent, AgentCode, refuse_unsupported
from mlx_grpo.core.batches import computes_in_float32
from mlx_grpo.core.caches import allow_token_positions, recompute_activations
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.distributed import Peers
from mlx_grpo.core.lora import apply_lora, parse_layers, total_count, trainable_count
from mlx_grpo.core.models import LoadedModel
from mlx_grpo.core.reporting import CONFIG_FILE, check_logs, rewrite_logs
from mlx_grpo.core.runfolder import LOCK_FILE, RunLock
from mlx_grpo.core.state import RunState
from mlx_grpo.core.update import LossAndGrad


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
    state: RunState  # where the run stands: what a checkpoint restores
    saved_step: int = 0  # step of the newest checkpoint on disk
    resume_notes: list[str] = field(default_factory=list)  # checkpoints not used, and why, ...
    model_fingerprint: str | None = None  # of the local model folder, taken once at setup
    data_fingerprint: dict[str, Any] = field(default_factory=dict)  # rows and hash, at setup
    peers: Peers = field(default_factory=Peers)  # the processes of a data-parallel run
    last: checkpoint.Snapshot | None = None  # state after the last completed step
    lock: RunLock | None = None  # of the output directory, held by process 0 until the end
    unsaved_step: int = -1  # a step whose checkpoint failed for a full disk: not retried
    plan: memory.Plan | None = None  # decode batch and update chunks (set by setup)
    loss_and_grad: LossAndGrad | None = None  # the compiled loss, built once (set by setup)
    eval_rows: list[data_mod.PromptRow] = field(default_factory=list)  # eval_data's prompts
    agent: Agent | None = None  # tools and environments, when the run trains an agent

    def release(self) -> None:
        """Free the run folder for another process (the end of `train`)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def snapshot(run: Run) -> checkpoint.Snapshot:
    """The run's state after its last completed step (array references: no copy)."""
    cfg = run.cfg
    adapter = Adapter.from_model(
        run.lm.model, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, base_model=cfg.model
    )
    state = {
        **run.state.to_json(),
        "rewards": [r.name for r in run.rewards],
        "model_sha256": run.model_fingerprint,
        "data": run.data_fingerprint,
        "processes": run.peers.size,
        "config": cfg.to_dict(),
    }
    return checkpoint.Snapshot(
        run.state.step, adapter, dict(tree_flatten(run.optimizer.state)), state
    )


def restore(run: Run, saved: checkpoint.Loaded) -> None:
    """Put a checked checkpoint's adapter, optimizer, data position and RNG into `run`.

    Then the logs are set back to its step and surplus checkpoints pruned.
    """
    state = saved.state
    weights = _adapter_weights(saved)
    run.lm.model.update(tree_unflatten(list(weights.items())))
    run.optimizer.state = tree_unflatten(list(saved.optimizer.items()))
    mx.eval(run.lm.model.parameters(), run.optimizer.state)
    run.state = RunState.from_json(state, run.cfg.entropy_coef)
    run.saved_step = run.state.step
    run.resume_notes = [f"not used: {why}" for why in saved.skipped]
    before = state.get("processes", 1)
    if before != run.peers.size:
        run.resume_notes.append(
            f"the run used {before} process(es), now {run.peers.size}: each step now takes "
            f"{run.peers.size} x {run.cfg.prompts_per_step} prompts (it continues, but not "
            "as the original run would have)"
        )
    run.resume_notes += rewrite_logs(run.output_dir, run.state.history, run.state.step)
    checkpoint.tidy(run.output_dir, run.cfg.save_total_limit, saved.path)


def _adapter_weights(saved: checkpoint.Loaded) -> dict[str, mx.array]:
    weights = {f"{p}.lora_a": a for p, a in saved.adapter.lora_a.items()}
    return weights | {f"{p}.lora_b": b for p, b in saved.adapter.lora_b.items()}


def _check_adapter_fits(model: Any, saved: checkpoint.Loaded) -> None:
    weights = _adapter_weights(saved)
    current = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(current) or any(weights[k].shape != current[k].shape for k in current):
        raise ValueError(
            f"the adapter in {saved.path} does not fit the model as this run configures it "
            f"({len(weights)} factors saved, {len(current)} expected); the checkpoint belongs "
            "to another model or LoRA shape. Resume with the run's own model, or start anew."
        )


def setup(
    cfg: TrainConfig,
    reward_funcs: list[Callable],
    resume: bool = False,
    peers: Peers | None = None,
    code: AgentCode | None = None,
) -> Run:
    """Lock the output directory, load and check every input, then prepare the directory.

    With `resume`, the newest usable checkpoint is checked against the model,
    data and LoRA shape, then restored. Nothing is written before every input
    has been checked, and the reward code is imported last, after every other
    check passed. The returned run holds the folder's lock: call
    `run.release()` when done. In a distributed run only process 0 locks and
    touches the output directory; it hands its state (adapter, optimizer,
    data position, RNG) to the others. `code` holds the Python API's tools
    and environment factory.
    """
    peers = peers or Peers()
    refuse_unsupported(cfg, peers.size, code)
    if cfg.dynamic_sampling and peers.size > 1:
        raise ValueError(
            "dynamic_sampling is not available in distributed runs yet (each process would "
            "need the others' completions); run it on one machine, or without "
            "--dynamic-sampling."
        )
    output_dir, lock, saved = Path(cfg.output_dir), None, None
    if peers.main:
        output_dir = check_output(cfg, resume)
        if resume:
            lock = runfolder.lock(output_dir)
        elif output_dir.is_dir():
            runfolder.check_unlocked(output_dir)
    try:
        if peers.main:
            runfolder.refuse_symlinks(output_dir, checkpoint.RUN_FILES)
            if resume:
                saved = checkpoint.latest(output_dir)
                check_logs(output_dir)
        run = _load(cfg, reward_funcs, peers, output_dir, saved, code or AgentCode())
        if saved is not None:
            restore(run, saved)
        elif peers.main:
            lock = _start_output(cfg, output_dir)
        run.lock = lock
        share_state(run)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return run


def _load(
    cfg: TrainConfig,
    reward_funcs: list[Callable],
    peers: Peers,
    output_dir: Path,
    saved: checkpoint.Loaded | None,
    code: AgentCode,
) -> Run:
    """Model, data and optimizer, checked against `saved`; then the agent's tools and the
    rewards."""
    mx.random.seed(cfg.seed)
    lm, paths = _load_model(cfg)
    model_sha256 = models.fingerprint(cfg.model)
    max_prompt = cfg.prompt_limit(lm.config.get("max_position_embeddings"), cfg.model)
    rows = data_mod.load_prompts(
        cfg.data,
        lm.tokenizer,
        cfg.prompt_column,
        cfg.system_prompt,
        cfg.enable_thinking,
        max_prompt,
    )
    data = data_mod.fingerprint(rows)
    eval_rows = _eval_rows(cfg, lm, max_prompt)
    plan = memory_plan(cfg, lm, rows + eval_rows)  # refuses a budget no plan fits, unwritten
    if saved is not None:
        checkpoint.check_compatible(saved, cfg, model_sha256, data)
        _check_adapter_fits(lm.model, saved)
    # user code is imported after every other check: the tools, then the rewards
    agent = Agent.build(cfg, code.tools, code.environment_factory, lm.tokenizer)
    if agent is not None:
        agent.check_rows(rows)
        plan = memory_plan(cfg, lm, rows, agent.schema_tokens())  # prompts show the tools
    rewards = _load_rewards(cfg, reward_funcs, agent)
    offered = [k for r in rows for k in r.columns] + (["environments"] if agent else [])
    rewards_mod.check_arguments(rewards, offered, cfg.data)
    _check_evaluation(cfg, eval_rows, rewards)
    if saved is not None:
        checkpoint.check_rewards(saved, [r.name for r in rewards])
    state = RunState.start(cfg.seed, cfg.entropy_coef)
    run = Run(cfg, lm, paths, rewards, rows, _optimizer(cfg, lm.model), output_dir, state)
    run.model_fingerprint, run.data_fingerprint, run.peers = model_sha256, data, peers
    run.plan, run.loss_and_grad = plan, LossAndGrad(lm.model, cfg)
    run.eval_rows, run.agent = eval_rows, agent
    peers.check_same(
        {
            "versions": [mx.__version__, __version__],
            "model": [lm.config, run.model_fingerprint, paths],
            "data": [r.prompt_ids for r in rows],
            "rewards": [[r.name, r.weight] for r in rewards],
        }
    )
    return run


def _eval_rows(
    cfg: TrainConfig, lm: LoadedModel, max_prompt: int | None
) -> list[data_mod.PromptRow]:
    """eval_data's prompts (the first eval_limit), read as the training data is."""
    if cfg.eval_data is None:
        return []
    rows = data_mod.load_prompts(
        cfg.eval_data,
        lm.tokenizer,
        cfg.prompt_column,
        cfg.system_prompt,
        cfg.enable_thinking,
        max_prompt,
    )
    return rows[: cfg.eval_limit]


def _check_evaluation(
    cfg: TrainConfig, rows: list[data_mod.PromptRow], rewards: list[rewards_mod.Reward]
) -> None:
    """The reward functions can score the held-out rows, and keep_best names a metric the
    evaluation gives."""
    if not rows:
        return
    rewards_mod.check_arguments(rewards, (k for r in rows for k in r.columns), cfg.eval_data)
    names = evaluation.metric_names(cfg.eval_samples, rewards)
    if cfg.keep_best is not None and cfg.keep_best not in names:
        raise ValueError(
            f"keep_best {cfg.keep_best!r} is not a metric the evaluation logs; name one of "
            f"{', '.join(names)}."
        )


def _optimizer(cfg: TrainConfig, model: nn.Module) -> optim.AdamW:
    """AdamW as torch.optim.AdamW, its state made now (so a checkpoint before step 1 has it)."""
    optimizer = optim.AdamW(
        learning_rate=cfg.learning_rate,
        betas=[cfg.adam_beta1, cfg.adam_beta2],
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        bias_correction=True,
    )
    optimizer.init(model.trainable_parameters())
    return optimizer


def _load_model(cfg: TrainConfig) -> tuple[LoadedModel, list[str]]:
    """The base model with LoRA applied (or the starting adapter attached)."""
    lm, start = load_adapted(cfg.model, cfg.adapter, cfg.dtype)
    if start is not None:
        _adopt_adapter_shape(cfg, start)
        paths = start.modules
    else:
        layers = parse_layers(cfg.lora_layers, len(lm.model.layers))
        paths = apply_lora(
            lm.model, cfg.lora_rank, cfg.lora_scale, cfg.lora_dropout, cfg.lora_targets, layers
        )
    if cfg.grad_checkpoint:
        recompute_activations(lm.model)
    allow_token_positions(lm.model)  # the update packs completions where it can
    mx.eval(lm.model.parameters())
    return lm, paths


def _load_rewards(
    cfg: TrainConfig, reward_funcs: list[Callable], agent: Agent | None
) -> list[rewards_mod.Reward]:
    """The named rewards (imported here), then the callables, with their weights; then the
    environment's own reward (weight 1), which may be the only one."""
    own = agent.rewards() if agent is not None else []
    if own and not cfg.rewards and not reward_funcs:
        return own
    return rewards_mod.load_rewards(cfg.rewards, cfg.reward_weights, reward_funcs) + own


def _start_output(cfg: TrainConfig, output_dir: Path) -> RunLock:
    """Lock a new run's output directory, clear it (--overwrite), write config.yaml."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = runfolder.lock(output_dir)
    try:
        check_output(cfg, False)  # again: another run may have started meanwhile
        runfolder.refuse_symlinks(output_dir, checkpoint.RUN_FILES)
        prepare_output(cfg)
        runfolder.refuse_symlinks(output_dir, [CONFIG_FILE])
        try:
            cfg.save(output_dir / CONFIG_FILE)
        except OSError as exc:
            if not runfolder.is_disk_full(exc):
                raise
            what, where = "the run's settings", output_dir / CONFIG_FILE
            kept, then = "Nothing else was written yet.", "start the run again"
            raise runfolder.disk_full(what, where, kept, then) from None
    except BaseException:
        lock.release()
        raise
    return lock


def check_output(cfg: TrainConfig, resume: bool) -> Path:
    """Refuse an output directory that cannot be written or holds something (writes nothing).

    A run goes into a new or empty folder, or into a run this program marked
    (outputs.MARKER): resumed with --resume, replaced with --overwrite. Any
    other non-empty folder is refused, --overwrite or not: nothing of the
    user's is deleted.
    """
    out = Path(cfg.output_dir).expanduser()
    outputs.check_creatable(out, "output directory", "--output-dir")
    if resume:  # resume_settings found the run's config.yaml; resuming deletes nothing
        return out
    outputs.check_protected(
        out, {"the model": cfg.model, "the starting adapter": cfg.adapter}, "--output-dir"
    )
    names = [n for n in outputs.entries(out) if n != LOCK_FILE]
    held = [n for n in (*checkpoint.RUN_FILES, MLX_WEIGHTS) if n in names]
    ours = outputs.kind_of(out) == "run"
    if not names or (ours and (cfg.overwrite or not held)):
        return out
    if held and ours:
        raise ValueError(
            f"output directory {out} already holds a run ({', '.join(held)}). Continue it with "
            f"`mlx-grpo train --resume {out}`, choose another --output-dir, or pass --overwrite "
            "to replace it."
        )
    if held:  # a run of an mlx-grpo before the marker, or someone's adapter
        what = "a run" if set(held) & set(checkpoint.RUN_FILES) else "an adapter"
        raise ValueError(
            f"output directory {out} already holds {what} ({', '.join(held)}) without the "
            f"{outputs.MARKER} marker of a run this program made, so it is never deleted, "
            f"--overwrite or not. Choose another --output-dir, resume a run of an earlier "
            f"mlx-grpo with `mlx-grpo train --resume {out}`, or delete it yourself to start over."
        )
    found = outputs.kind_of(out)
    what = f"{outputs.KINDS.get(found, found)} made by mlx-grpo" if found else "files"
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    why = (
        "--overwrite replaces only a run that mlx-grpo made, never other files"
        if cfg.overwrite
        else "a run needs a new or empty folder"
    )
    raise ValueError(
        f"output directory {out} is not empty and is not an mlx-grpo run: it holds {what} "
        f"({listed}); {why}. Choose another --output-dir."
    )


def prepare_output(cfg: TrainConfig) -> None:
    """Create and mark the output directory; with overwrite, remove the previous run's files.

    Only the files a run writes are removed, and only from a folder marked as
    a run (check_output refused any other).
    """
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and outputs.kind_of(out) == "run":
        for name in (*checkpoint.RUN_FILES, MLX_WEIGHTS, MLX_CONFIG):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    outputs.mark(out, "run")


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
    run.state = RunState.from_json(peers.broadcast_json(run.state.to_json(), "the run's state"))


def _adopt_adapter_shape(cfg: TrainConfig, adapter: Adapter) -> None:
    """Record the starting adapter's LoRA shape in the run's settings."""
    cfg.lora_rank, cfg.lora_alpha, cfg.use_rslora = adapter.rank, adapter.alpha, adapter.rslora
    cfg.lora_targets = sorted({p.rsplit(".", 1)[-1] for p in adapter.modules})
    indices = sorted(
        {int(part) for p in adapter.modules for part in p.split(".") if part.isdigit()}
    )
    cfg.lora_layers = ",".join(map(str, indices))


def _limit(cfg: TrainConfig) -> str:
    if cfg.max_minutes:
        return f"{cfg.max_minutes:g} minutes (at most {cfg.max_steps} steps)"
    return f"{cfg.max_steps} steps"


def memory_plan(
    cfg: TrainConfig, lm: LoadedModel, rows: list[data_mod.PromptRow], added: int = 0
) -> memory.Plan:
    """The decode batch and update chunks whose estimated peaks fit the memory budget
    (`added`: tokens every prompt gains, an agent's tool schemas)."""
    budget = memory.parse_size(cfg.max_memory) if cfg.max_memory else memory.default_budget()
    return memory.make_plan(memory_shapes(cfg, lm), memory_work(cfg, rows, added), budget)


def memory_shapes(cfg: TrainConfig, lm: LoadedModel) -> memory.Shapes:
    """What the memory estimate needs from the model (LoRA applied) and the settings."""
    model = lm.model
    return memory.Shapes.of(
        lm.config.get("text_config", lm.config),
        weight_bytes=sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        trainable_bytes=sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters())),
        act_bytes=4 if computes_in_float32(model) else 2,
        chunk=cfg.logits_chunk_size,
        checkpointed=cfg.grad_checkpoint,
    )


def memory_work(cfg: TrainConfig, rows: list[data_mod.PromptRow], added: int = 0) -> memory.Work:
    """The step's shape, with the data's longest prompt (plus `added` tokens)."""
    return memory.Work(
        prompts=cfg.prompts_per_step,
        generations=cfg.num_generations,
        prompt_tokens=max(len(r.prompt_ids) for r in rows) + added,
        completion_tokens=cfg.max_completion_length,
        micro_batches=cfg.slices,
        beta=cfg.beta != 0.0,
    )


def summary(run: Run) -> str:
    n_train, n_total = trainable_count(run.lm.model), total_count(run.lm.model)
    cfg, peers = run.cfg, run.peers
    per_step = f"{cfg.prompts_per_step} prompts x {cfg.num_generations} completions per step"
    if peers.size > 1:
        per_step = (
            f"{peers.size} processes x {per_step} = {peers.size * cfg.prompts_per_step} prompts"
        )
    if cfg.updates_per_step > 1:
        per_step += f", {cfg.updates_per_step} optimizer updates each"
    return (
        f"model {cfg.model} | LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on "
        f"{len(run.lora_paths)} modules\n"
        f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%)\n"
        f"{len(run.rows)} prompts | {per_step} | {_limit(cfg)} | output {run.output_dir}"
        + f"\n{run.plan.describe()}"
    )


def resume_command(run: Run) -> str:
    """The command that continues this run."""
    command = f"mlx-grpo train --resume {run.output_dir}"
    return command if run.peers.size == 1 else f"mlx.launch <same hosts> -- {command}"
