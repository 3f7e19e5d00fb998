"""Data-parallel runs over MLX's distributed engine (`mlx.core.distributed`).

`mlx.launch` starts the same `mlx-grpo train` command in N processes (ring,
MPI or RDMA backend) and `connect` joins them. Every process holds the whole
adapter and optimizer, and each step:

1. takes its B prompts of the step's N x B (one shared, seeded order), and
   samples with noise that depends only on a row's place in those N x B x G
   rows, so the completions are the ones one process would sample;
2. scores its own groups; the rewards and lengths are gathered, so
   advantages (per group, or with scale_rewards "batch" over all rows) and
   metrics are computed on the whole step, identically everywhere;
3. computes gradients of its micro-batches, each loss divided as if the step
   were one process's N x accumulation micro-batches (dapo: by the step's
   completion tokens, summed over processes); the gradients and metric sums
   are summed over processes and every process makes the same update.

N processes with B prompts each therefore train like one process with N x B
prompts and N x gradient_accumulation_steps micro-batches, whose micro-batches
are the processes' own (up to float32 rounding; for dapo the micro-batching
does not matter). Only LoRA dropout differs: the processes' random streams
stay in step, so each draws the same masks for its own rows.

Collectives run on the CPU stream, as mlx-lm's trainer runs its own (on
Apple silicon the GPU's arrays live in the same memory). Every collective
goes through `Peers`: it is evaluated at once, a peer that died (its
sockets closed) becomes `PeerLost`, and a watchdog ends a process that has
waited `timeout` seconds for the others (a hung peer, a broken network)
after letting process 0 save its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np


class PeerLost(RuntimeError):
    """Another process of a distributed run stopped or cannot be reached."""


@dataclass
class Peers:
    """The processes of a run; one process alone when not launched distributed."""

    group: Any = None  # mx.distributed.Group, None for a single process
    timeout: float = 1800.0  # seconds to wait for the others at a collective
    on_timeout: Callable[[], str] | None = None  # runs before a timed-out process exits
    _waiting: tuple[str, float] | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return self.group.rank() if self.group is not None else 0

    @property
    def size(self) -> int:
        return self.group.size() if self.group is not None else 1

    @property
    def main(self) -> bool:
        """Process 0: the one that writes checkpoints, metrics and the adapter."""
        return self.rank == 0

    def label(self) -> str:
        return f"process {self.rank} of {self.size}"

    def part(self, n: int) -> slice:
        """This process's share of `n` items split evenly in rank order."""
        share = n // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    # ---------------------------------------------------------------- collectives

    def sum(self, arrays: dict[str, mx.array], what: str) -> dict[str, mx.array]:
        """Element-wise sums over processes (one collective per dtype)."""
        if self.size == 1:
            return arrays
        return self._packed(arrays, self._all_sum, what)

    def broadcast(self, arrays: dict[str, mx.array], what: str) -> dict[str, mx.array]:
        """Process 0's values of `arrays` on every process (same names and shapes)."""
        if self.size == 1:
            return arrays
        mine = arrays if self.main else {k: mx.zeros_like(v) for k, v in arrays.items()}
        return self._packed(mine, self._all_sum, what)  # x + 0 + ... + 0 == x, bit for bit

    def gather(self, rows: np.ndarray, what: str) -> np.ndarray:
        """Every process's `rows` (same shape everywhere), concatenated in rank order.

        Exact for any dtype: the bytes travel, not the values.
        """
        if self.size == 1:
            return rows
        rows = np.ascontiguousarray(rows)
        raw = rows.view(np.uint8).reshape(rows.shape[0], -1)
        out = self._collective(
            lambda: mx.distributed.all_gather(mx.array(raw), group=self.group, stream=mx.cpu), what
        )
        flat = np.array(out).reshape(-1).view(rows.dtype)
        return flat.reshape(self.size * rows.shape[0], *rows.shape[1:])

    def broadcast_json(self, value: Any, what: str) -> Any:
        """Process 0's JSON-ready `value` on every process."""
        if self.size == 1:
            return value
        data = json.dumps(value).encode() if self.main else b""
        n = int(self.broadcast({"n": mx.array([len(data)])}, what)["n"].item())
        payload = np.frombuffer(data, dtype=np.uint8) if self.main else np.zeros(n, np.uint8)
        out = self.broadcast({"bytes": mx.array(payload)}, what)["bytes"]
        return json.loads(bytes(np.array(out)))

    def gather_json(self, value: Any, what: str) -> list[Any]:
        """Every process's JSON-ready `value`, in rank order."""
        if self.size == 1:
            return [value]
        data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
        sizes = self.gather(np.array([len(data)], dtype=np.int64), what)
        padded = np.zeros((1, int(sizes.max())), dtype=np.uint8)
        padded[0, : len(data)] = data
        every = self.gather(padded, what)
        return [json.loads(bytes(row[:n])) for row, n in zip(every, sizes)]

    def any(self, flag: bool, what: str) -> bool:
        """True on every process when `flag` is true on one of them."""
        if self.size == 1:
            return flag
        out = self._collective(
            lambda: mx.distributed.all_max(mx.array([int(flag)]), group=self.group, stream=mx.cpu),
            what,
        )
        return bool(out.item())

    def check_same(self, facts: dict[str, Any]) -> None:
        """Refuse to start when the processes differ in any of `facts` (name -> JSON value)."""
        if self.size == 1:
            return
        texts = [json.dumps(v, sort_keys=True).encode() for v in facts.values()]
        digests = np.stack([np.frombuffer(hashlib.sha256(t).digest(), np.uint8) for t in texts])
        digests = digests[None]
        every = self.gather(digests, "the start-up check")  # (N, F, 32)
        differ = [
            name
            for k, name in enumerate(facts)
            if any(not np.array_equal(every[r, k], every[0, k]) for r in range(self.size))
        ]
        if differ:
            ranks = [r for r in range(self.size) if not np.array_equal(every[r], every[0])]
            raise ValueError(
                f"the processes of this distributed run differ in {', '.join(differ)} "
                f"(processes {ranks} vs process 0). Every process must run the same mlx-grpo "
                "and MLX versions on the same model and data: copy them to the same paths on "
                "each machine."
            )

    # ---------------------------------------------------------------- plumbing

    def _all_sum(self, flat: mx.array) -> mx.array:
        return mx.distributed.all_sum(flat, group=self.group, stream=mx.cpu)

    def _packed(
        self,
        arrays: dict[str, mx.array],
        op: Callable[[mx.array], mx.array],
        what: str,
    ) -> dict[str, mx.array]:
        """Apply `op` to all arrays at once: one flat buffer per dtype.

        Names and dtypes are sorted, so every process sends the same layout
        whatever order its dict happens to have.
        """
        out: dict[str, mx.array] = {}
        by_dtype: dict[str, list[str]] = {}
        for name in sorted(arrays):
            by_dtype.setdefault(str(arrays[name].dtype), []).append(name)
        for _, names in sorted(by_dtype.items()):
            flat = mx.concatenate([arrays[n].reshape(-1) for n in names])
            mx.eval(flat)
            reduced = self._collective(lambda flat=flat: op(flat), what)
            start = 0
            for n in names:
                size = arrays[n].size
                out[n] = reduced[start : start + size].reshape(arrays[n].shape)
                start += size
        return {n: out[n] for n in arrays}

    def _collective(self, op: Callable[[], mx.array], what: str) -> mx.array:
        self._waiting = (what, time.monotonic())
        try:
            result = op()
            mx.eval(result)
        except RuntimeError as err:
            raise PeerLost(
                "another process of this distributed run stopped or lost its "
                f"connection (at {what}: {err}). Its own output says why."
            ) from None
        finally:
            self._waiting = None
        return result

    def _watch(self) -> None:
        """Watchdog thread: end this process when a collective waits past `timeout`."""
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            waiting = self._waiting
            if waiting is None or time.monotonic() - waiting[1] <= self.timeout:
                continue
            note = ""
            if self.on_timeout is not None:
                try:
                    note = f"; {self.on_timeout()}"
                except BaseException as err:  # noqa: BLE001 - the exit below must happen
                    note = f"; saving failed: {err}"
            sys.stderr.write(
                f"\n{self.label()}: waited {self.timeout:g} s for the other processes at "
                f"{waiting[0]}; one of them hangs or the network between them is down. "
                f"Stopping{note}. Raise distributed_timeout if a step legitimately takes "
                "that long on one machine.\n"
            )
            sys.stderr.flush()
            os._exit(1)


_PEERS: Peers | None = None


def connect() -> Peers:
    """Join the run's processes when started by `mlx.launch` (or mpirun); else one process."""
    global _PEERS
    if _PEERS is not None:
        return _PEERS
    group = None
    if mx.distributed.is_available() and _launched():
        group = mx.distributed.init()
        if group.size() == 1:
            group = None
    _PEERS = Peers(group)
    if group is not None:
        threading.Thread(target=_PEERS._watch, name="mlx-grpo-watchdog", daemon=True).start()
    return _PEERS


def where() -> str:
    """' (process R of N)' inside a distributed run, '' otherwise: for messages."""
    if _PEERS is None or _PEERS.size == 1:
        return ""
    return f" ({_PEERS.label()})"


def _launched() -> bool:
    """Whether a launcher set up this process as one of several."""
    keys = ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_IBV_DEVICES")
    return any(os.environ.get(k) for k in keys)
