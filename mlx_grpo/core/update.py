"""Policy optimisation on one rollout: the loss, its AdamW updates.

Each of the mu passes over the rollout makes steps_per_generation /
gradient_accumulation_steps updates (`windows`); each update sums the
gradients of its micro-batches' chunks (batches.py; from `LossAndGrad`,
compiled once per run), clips their global norm and makes one AdamW step at
the schedule's rate for that update. The entropy mask's threshold over a
micro-batch cut into chunks, and the adaptive entropy bonus's coefficient,
are set here between passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_grpo.core.batches import MicroBatch, score
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.distributed import Peers
from mlx_grpo.core.objective import (
    METRICS,
    LossSettings,
    Normalizer,
    entropy_threshold,
    grpo_loss,
    k3_kl,
)
from mlx_grpo.core.state import EntropyControl


@dataclass
class Update:
    """What `optimise` did: its metrics, and per pass whether the update was applied."""

    metrics: dict[str, float]
    applied: list[bool]  # False: a NaN/Inf loss or gradient skipped that pass


def lr_at(step: float, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based, counted in rollouts; the k-th of a rollout's U
    updates is at step + k / U): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * step / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_scheduler == "linear":
        return cfg.learning_rate * max(0.0, 1.0 - progress)
    if cfg.lr_scheduler == "cosine":
        return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.learning_rate


def micro_loss(
    model: nn.Module,
    mb: MicroBatch,
    cfg: TrainConfig,
    settings: LossSettings,
    normalizer: Normalizer,
) -> tuple[mx.array, dict[str, mx.array]]:
    exact = cfg.beta != 0.0 and cfg.kl_estimator == "exact"
    ref_hidden = mb.ref if exact else None
    scores = score(model, mb, cfg, ref_hidden=ref_hidden, entropy=settings.entropy_bonus)
    kl = None
    if cfg.beta != 0.0:
        kl = scores.kl if exact else k3_kl(scores.logp, mb.ref)
    normalizer = replace(
        normalizer,
        rows=mb.group_rows,
        tokens=mb.group_tokens,
        entropy_threshold=mb.entropy_threshold,
        entropy_tokens=mb.entropy_tokens,
    )
    return grpo_loss(
        scores.logp, mb.old_logp, mb.advantages, mb.mask, settings, normalizer, kl, scores.entropy
    )


class LossAndGrad:
    """A chunk's loss, metric sums and adapter gradient: `micro_loss` differentiated,
    built once per run and compiled with `mx.compile`.

    One trace per shape of chunk (rows, prompt width, completion length) is
    kept; everything else that changes between calls (the adapter, the
    normaliser's counts, the random state of LoRA dropout) is an input, so a
    kept trace gives what the plain function would. Past MAX_TRACES shapes
    the traces are dropped and made again as needed. MLX_DISABLE_COMPILE=1
    (MLX's own switch) runs it uncompiled.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.shapes: set[tuple] = set()
        self.fn = _compiled_loss(model, cfg)

    def __call__(self, mb: MicroBatch, normalizer: Normalizer):
        arrays = {k: getattr(mb, k) for k in ARRAYS if getattr(mb, k) is not None}
        shape = tuple((k, v.shape) for k, v in tree_flatten(arrays))
        if shape not in self.shapes and len(self.shapes) >= MAX_TRACES:
            self.fn, self.shapes = _compiled_loss(self.model, self.cfg), set()
        self.shapes.add(shape)
        counts = {
            "chunk": {k: getattr(mb, k) for k in COUNTS if getattr(mb, k) is not None},
            "update": {
                "accumulation_steps": normalizer.accumulation_steps,
                "tokens_in_batch": normalizer.tokens_in_batch,
                "entropy_coef": normalizer.entropy_coef,
            },
        }
        counts = tree_map(lambda x: mx.array(float(x)), counts)
        params = self.model.trainable_parameters()
        try:
            return self.fn(params, arrays, counts)
        finally:
            self.model.update(params)  # a trace leaves its placeholders in the model


def _compiled_loss(model: nn.Module, cfg: TrainConfig) -> Callable:
    # Not a method: the compiled function lives as long as what it refers to,
    # so a reference back to its owner would keep both (and the model) alive.
    settings = cfg.loss_settings()

    def loss(params: dict, arrays: dict, counts: dict):
        model.update(params)
        mb = MicroBatch(**{**dict.fromkeys(ARRAYS), **arrays}, **counts["chunk"])
        return micro_loss(model, mb, cfg, settings, Normalizer(**counts["update"]))

    state = mx.random.state
    return mx.compile(mx.value_and_grad(loss), inputs=state, outputs=state)


# MicroBatch's counts, inputs of the compiled loss as scalars (the index is not one); the
# other fields are arrays (or trees of them) or None
COUNTS = ("group_rows", "group_tokens", "entropy_threshold", "entropy_tokens")
ARRAYS = tuple(f.name for f in fields(MicroBatch) if f.name not in (*COUNTS, "index"))
MAX_TRACES = 64


def windows(cfg: TrainConfig) -> list[range]:
    """Per update of a rollout, in order: the micro-batches (`MicroBatch.index`) it takes.

    mu passes, each over the rollout's steps_per_generation micro-batches,
    gradient_accumulation_steps to an update (TRL's order: a pass over every
    slice of the generation, then the next pass).
    """
    ga = cfg.gradient_accumulation_steps
    one_pass = [range(start, start + ga) for start in range(0, cfg.slices, ga)]
    return one_pass * cfg.num_iterations


def tokens_per_update(tokens: float, cfg: TrainConfig) -> float:
    """What dapo, cispo and vespo divide an update's loss by: the rollout's completion
    `tokens` per update of a pass (TRL: its generation batch's, x gradient_accumulation_steps
    / steps_per_generation)."""
    return tokens * cfg.gradient_accumulation_steps / cfg.slices


def optimise(
    model: nn.Module,
    optimizer: optim.Optimizer,
    micro: list[MicroBatch],
    cfg: TrainConfig,
    step: int,
    peers: Peers | None = None,
    loss_and_grad: LossAndGrad | None = None,
    entropy: EntropyControl | None = None,
) -> Update:
    """The rollout's updates (`windows`) of step `step`, each an accumulated AdamW update.

    An update whose loss or gradient norm is not finite is not applied. With
    `peers` (a data-parallel run), `micro` is this process's share: losses
    are divided for the micro-batches of all processes, and the gradients
    and metric sums are summed over them before the update. `entropy` (the
    run's entropy bonus control) is adapted after each update when adaptive.
    """
    peers = peers or Peers()
    control = entropy or EntropyControl(cfg.entropy_coef)
    model.train()
    local_tokens = mx.array(sum(mb.mask.sum().item() for mb in micro))
    tokens = peers.sum({"tokens": local_tokens}, "the token count")["tokens"].item()
    normalizer = Normalizer(
        accumulation_steps=cfg.gradient_accumulation_steps * peers.size,
        tokens_in_batch=tokens_per_update(tokens, cfg),
    )
    loss_and_grad = loss_and_grad or LossAndGrad(model, cfg)
    totals: dict[str, float] = {}
    losses, norms, finite = [], [], []
    updates = windows(cfg)
    for k, window in enumerate(updates):
        lr = lr_at(step + k / len(updates), cfg)
        optimizer.learning_rate = lr
        part = [mb for mb in micro if mb.index in window]
        if cfg.top_entropy_quantile < 1.0:
            entropy_thresholds(model, part, cfg)
        coef = applied_entropy_coef(control, cfg)
        grads, sums = _pass(part, replace(normalizer, entropy_coef=coef), loss_and_grad)
        grads, sums = _summed(peers, grads, sums)
        loss_sum = sums.pop("loss").item()
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v.item()
        if cfg.use_adaptive_entropy:
            adapt_entropy_coef(control, sums, cfg)
        grads, norm = _clipped(grads, cfg.max_grad_norm)
        losses.append(loss_sum)
        norms.append(norm.item())
        # A NaN or Inf anywhere in the gradients shows in its norm: skip the
        # update so the adapter and AdamW moments keep their last finite values.
        finite.append(math.isfinite(loss_sum) and math.isfinite(norms[-1]))
        if finite[-1]:
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state)
    metrics = _metrics(losses, norms, finite, totals, lr, cfg.importance_sampling_level)
    if cfg.entropy_coef != 0.0 or cfg.use_adaptive_entropy:
        metrics["entropy_coef"] = control.coef if cfg.use_adaptive_entropy else cfg.entropy_coef
    return Update(metrics, finite)


def _clipped(grads: dict, max_norm: float) -> tuple[dict, mx.array]:
    """The gradients clipped to global norm `max_norm` (0: as they are), and their norm."""
    if max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    return grads, mx.sqrt(sum((v * v).sum() for _, v in tree_flatten(grads)))


def _pass(
    micro: list[MicroBatch], normalizer: Normalizer, loss_and_grad: LossAndGrad
) -> tuple[dict, dict[str, mx.array]]:
    """The chunks' gradients and metric sums (with the loss and the rows), added up: one
    update's."""
    grads, sums = None, {}
    for mb in micro:
        (loss, stats), g = loss_and_grad(mb, normalizer)
        stats["rows"] = mx.array(float(mb.mask.shape[0]))
        grads = g if grads is None else tree_map(mx.add, grads, g)
        sums = {k: sums[k] + v if k in sums else v for k, v in {"loss": loss, **stats}.items()}
        mx.eval(grads, sums)
    return grads, sums


def entropy_thresholds(model: nn.Module, micro: list[MicroBatch], cfg: TrainConfig) -> None:
    """For each micro-batch cut into several chunks: the entropy quantile over all of its
    tokens and how many are at or above it, from the current weights (no gradient), set
    on its chunks. A micro-batch of one chunk finds them in its own loss."""
    parts: dict[int, list[MicroBatch]] = {}
    for mb in micro:
        parts.setdefault(mb.index, []).append(mb)
    for chunks in parts.values():
        if len(chunks) == 1:
            continue
        entropy = [score(model, mb, cfg, no_grad=True, entropy=True).entropy for mb in chunks]
        flat = mx.concatenate([e.reshape(-1) for e in entropy])
        mask = mx.concatenate([mb.mask.reshape(-1) for mb in chunks])
        threshold = entropy_threshold(flat, mask, 1.0 - cfg.top_entropy_quantile)
        kept = ((flat * mask >= threshold) & (mask > 0)).sum()
        mx.eval(threshold, kept)
        for mb in chunks:
            mb.entropy_threshold, mb.entropy_tokens = threshold, kept


def applied_entropy_coef(control: EntropyControl, cfg: TrainConfig) -> float:
    """This update's entropy bonus coefficient: the setting, or under adaptive control the
    current coefficient, applied only while the last update's entropy was at or below
    entropy_target."""
    if not cfg.use_adaptive_entropy:
        return cfg.entropy_coef
    last = control.last_entropy
    return control.coef if last is not None and last <= cfg.entropy_target else 0.0


def adapt_entropy_coef(control: EntropyControl, sums: dict[str, mx.array], cfg: TrainConfig):
    """Skywork-OR1's control, after an update: the mean entropy of the tokens it counted
    (the kept ones under an entropy mask); below or at the target the coefficient rises by
    entropy_coef_delta (to at most entropy_coef_max), above it falls (to at least the min)."""
    kept = "entropy_kept" in sums
    total = sums["entropy_kept" if kept else "entropy"].item()
    entropy = total / max(sums["tokens_kept" if kept else "tokens"].item(), 1.0)
    if entropy <= cfg.entropy_target:
        control.coef = min(control.coef + cfg.entropy_coef_delta, cfg.entropy_coef_max)
    else:
        control.coef = max(control.coef - cfg.entropy_coef_delta, cfg.entropy_coef_min)
    control.last_entropy = entropy


def _metrics(
    losses: list[float],
    norms: list[float],
    finite: list[bool],
    totals: dict[str, float],
    lr: float,
    level: str,
) -> dict[str, float]:
    """TRL's update metrics: means over the passes, ratios per token or per sequence."""
    metrics = {
        "loss": float(np.mean(losses)),
        "grad_norm": float(np.mean(norms)),
        "skipped_updates": float(finite.count(False)),
        "learning_rate": lr,
        "entropy": totals["entropy"] / max(totals["tokens"], 1.0),
    }
    per = {"rows": totals["rows"], "ratios": totals["tokens" if level == "token" else "rows"]}
    for key, unit in METRICS.items():
        if key in totals:
            metrics[key] = totals[key] / max(per[unit], 1.0)
    if "kl" in totals:
        metrics["kl"] = totals["kl"] / max(totals["tokens"], 1.0)
    if "policy_loss" in totals:  # the loss before the entropy bonus
        metrics["policy_loss"] = totals["policy_loss"] / len(losses)
    return metrics


def _summed(peers: Peers, grads: dict, sums: dict[str, mx.array]) -> tuple[dict, dict]:
    """Gradients and metric sums of one pass, summed over the run's processes."""
    if peers.size == 1:
        return grads, sums
    flat = {f"grad:{k}": v for k, v in tree_flatten(grads)}
    flat |= {f"sum:{k}": v.astype(mx.float32) for k, v in sums.items()}
    out = peers.sum(flat, "the gradient sum")
    grads = tree_unflatten([(k[5:], v) for k, v in out.items() if k.startswith("grad:")])
    return grads, {k[4:]: v for k, v in out.items() if k.startswith("sum:")}
