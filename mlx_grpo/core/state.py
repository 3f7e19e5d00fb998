"""Where a run stands between steps, as one record that writes and reads itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np


@dataclass
class EntropyControl:
    """The entropy bonus's coefficient and, for adaptive control, the mean entropy of the
    tokens the last update counted (None before the first: above any target)."""

    coef: float
    last_entropy: float | None = None


@dataclass
class RunState:
    """The run's position: steps done, data order, counters and logged metrics.

    `to_json` and `from_json` are the one place its checkpoint keys are
    spelled; the global MLX random key travels with it.
    """

    order: np.random.Generator  # shuffles the prompts each epoch
    queue: list[int] = field(default_factory=list)  # prompt indices left in this epoch
    epoch: int = 0
    step: int = 0  # steps completed
    num_tokens: int = 0  # prompt and completion tokens of every step so far
    bad_updates: int = 0  # updates skipped in a row for non-finite values
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics, JSON-ready
    entropy: EntropyControl = field(default_factory=lambda: EntropyControl(0.0))
    best: dict[str, Any] | None = None  # keep_best: {"metric", "step", "value"} of the best

    @classmethod
    def start(cls, seed: int, entropy_coef: float = 0.0) -> RunState:
        return cls(order=np.random.default_rng(seed), entropy=EntropyControl(entropy_coef))

    def take_prompts(self, n_rows: int, count: int) -> list[int]:
        """Indices of the next `count` prompts of a seeded shuffle, reshuffled every epoch."""
        picked = []
        while len(picked) < count:
            if not self.queue:
                self.queue = self.order.permutation(n_rows).tolist()
                self.epoch += 1
            picked.append(self.queue.pop(0))
        return picked

    def data_used(self, n_rows: int) -> float:
        """Epochs of the data used so far, fractional (TRL's `state.epoch`)."""
        return self.epoch - len(self.queue) / n_rows

    def count_updates(self, applied: list[bool]) -> None:
        """Track how many updates in a row were skipped for NaN or Inf."""
        for ok in applied:
            self.bad_updates = 0 if ok else self.bad_updates + 1

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, with the global MLX random key."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "queue": list(self.queue),
            "order": self.order.bit_generator.state,
            "rng": [int(v) for v in mx.random.state[0].tolist()],
            "num_tokens": self.num_tokens,
            "bad_updates": self.bad_updates,
            "metrics": list(self.history),
            "entropy_coef": self.entropy.coef,
            "last_entropy": self.entropy.last_entropy,
            "best": self.best,
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any], entropy_coef: float = 0.0) -> RunState:
        """The state `to_json` wrote; sets the global MLX random key back too.

        `entropy_coef` is the setting, for a checkpoint written before the
        coefficient was saved.
        """
        order = np.random.default_rng()
        order.bit_generator.state = saved["order"]
        key = saved["rng"]
        mx.random.seed((int(key[0]) << 32) | int(key[1]))
        return cls(
            order=order,
            queue=list(saved["queue"]),
            epoch=saved["epoch"],
            step=saved["step"],
            num_tokens=saved["num_tokens"],
            bad_updates=saved["bad_updates"],
            history=list(saved["metrics"]),
            entropy=EntropyControl(
                saved.get("entropy_coef", entropy_coef), saved.get("last_entropy")
            ),
            best=saved.get("best"),
        )
