"""A run's memory plan: sequences decoded at once and tokens per update chunk.

Both are chosen so that every phase's estimated peak stays under a budget.
The estimate adds, per phase, what MLX holds at its peak: the weights and
optimizer state, the rollout's KV cache and one decode step's vocabulary-wide
arrays, and for the reference and update passes one chunk's activations (each
layer's input kept for the backward pass, the prompt's keys and values, one
layer recomputed, the LM head's chunk). The constants were measured on
models of 5M and 0.6B parameters. Neither knob changes what is computed:
decode chunks draw the same random numbers per sequence, and update chunks
are normalised by the micro-batch they belong to, so only the float rounding
of batch-size-dependent kernels differs.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import mlx.core as mx

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b?|b)\s*", re.IGNORECASE)
_UNITS = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}

# Measured multiples (see the module docstring): vocabulary-wide float32 arrays alive at
# once in a decode step, in an LM-head chunk of the scoring passes, and one layer's
# activations kept while it is recomputed in the backward pass.
DECODE_VOCAB_ARRAYS = 5
REFERENCE_VOCAB_ARRAYS = 3  # the reference pass evaluates one head chunk at a time
HEAD_VOCAB_ARRAYS = 3  # per update chunk, plus two for each of the chunks that overlap
OVERLAPPING_CHUNKS = 3
LAYER_COPIES = 2.5
MARGIN = 1.05  # kernels' scratch buffers and allocator rounding
SMALL_ARRAYS = 2**20  # tokens, masks, random numbers, per-row values: what no term counts
GB = 1e9


def parse_size(text: str) -> int:
    """'12GB', '500MB', '16GiB', '1.5 TB' -> bytes (powers of 1000, or 1024 with 'i')."""
    match = _SIZE_RE.fullmatch(str(text))
    if not match:
        raise ValueError(
            f"max_memory {text!r} is not a size: write a number and a unit, e.g. 12GB, 8GiB or "
            "900MB"
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    scale = _UNITS[unit[0]]
    if "i" in unit:
        scale = 1024 ** "bkmgt".index(unit[0])
    return int(number * scale)


def default_budget() -> int:
    """A safe share of this machine's memory: on Apple silicon the GPU's recommended
    working set, elsewhere 70% of the physical memory."""
    if mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        return int(info["max_recommended_working_set_size"])
    return int(0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs to know about the model and the run."""

    layers: int
    hidden: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # kv heads x head_dim
    heads: int
    intermediate: int
    vocab: int
    weight_bytes: int  # every parameter, frozen and trainable
    trainable_bytes: int
    act_bytes: int  # bytes per activation: 4 in float32, 2 in 16-bit models
    chunk: int  # logits_chunk_size
    checkpointed: bool  # gradient checkpointing

    @staticmethod
    def of(
        config: dict,
        weight_bytes: int,
        trainable_bytes: int,
        act_bytes: int,
        chunk: int,
        checkpointed: bool,
    ) -> Shapes:
        """The shapes in a model's config.json, with the byte counts and settings given."""
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return Shapes(
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            q_dim=heads * head_dim,
            kv_dim=config.get("num_key_value_heads", heads) * head_dim,
            heads=heads,
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            weight_bytes=weight_bytes,
            trainable_bytes=trainable_bytes,
            act_bytes=act_bytes,
            chunk=chunk,
            checkpointed=checkpointed,
        )


@dataclass(frozen=True)
class Work:
    """The step's shape: prompts, completions per prompt, prompt and completion tokens."""

    prompts: int  # this process's prompts per step
    generations: int
    prompt_tokens: int  # the longest prompt
    completion_tokens: int  # max_completion_length
    micro_batches: int  # the rollout's: steps_per_generation
    beta: bool  # a reference pass runs

    @property
    def sequences(self) -> int:
        return self.prompts * self.generations


@dataclass(frozen=True)
class Plan:
    """Sequences decoded together and tokens per update chunk, with the estimated peaks."""

    budget: int
    work: Work
    decode_rows: int
    update_tokens: int  # rows x (prompt + longest completion) per chunk, at most
    rollout: int
    reference: int
    update: int

    @property
    def peak(self) -> int:
        return max(self.rollout, self.reference, self.update)

    def describe(self) -> str:
        """The plan in one line."""
        rows = _chunk_rows(self.work, self.update_tokens)
        return (
            f"memory plan: budget {self.budget / GB:.1f} GB | decode {self.decode_rows} of "
            f"{self.work.sequences} sequences at once | update chunks of up to "
            f"{self.update_tokens:,} tokens ({rows} sequences) | estimated peak "
            f"{self.peak / GB:.2f} GB (rollout {self.rollout / GB:.2f}, "
            + (f"reference {self.reference / GB:.2f}, " if self.work.beta else "")
            + f"update {self.update / GB:.2f})"
        )


def _base(s: Shapes) -> int:
    return s.weight_bytes + 2 * s.trainable_bytes  # AdamW's two moments


def rollout_bytes(s: Shapes, w: Work, rows: int) -> int:
    """Peak of a rollout decoding `rows` sequences at a time: the prefill of their prompts,
    or the decode steps with the whole KV cache."""
    p, t = w.prompt_tokens, w.completion_tokens
    prompts = max(1, math.ceil(rows / w.generations))
    prefill = prompts * p * (s.vocab + _layer_width(s)) * s.act_bytes
    prefill += prompts * s.heads * p * p * 4 * 2
    kv = s.layers * 2 * rows * s.kv_dim * (p + t) * s.act_bytes
    # while the prompts' cache is copied for each sequence: one layer's copy in flight
    copying = kv + 2 * rows * s.kv_dim * p * s.act_bytes * 2
    decode = DECODE_VOCAB_ARRAYS * rows * s.vocab * 4
    logits = rows * s.vocab * 4  # the next-token logits, from the prefill on
    return _base(s) + logits + max(prefill, copying, kv + decode)


def _layer_width(s: Shapes) -> int:
    """Activations per token inside one transformer block (values, not bytes)."""
    return 3 * s.intermediate + 2 * s.q_dim + 4 * s.kv_dim + 4 * s.hidden


def _chunk_rows(w: Work, tokens: int) -> int:
    return max(1, tokens // (w.prompt_tokens + w.completion_tokens))


def scoring_bytes(s: Shapes, w: Work, tokens: int, backward: bool) -> int:
    """Peak of scoring one chunk of at most `tokens` tokens (rows x (P + T)); with
    `backward`, the update's forward and backward passes, else the reference pass
    (the body's forward, then the LM head chunk by chunk)."""
    m, p, t = _chunk_rows(w, tokens), w.prompt_tokens, w.completion_tokens
    u = min(m, math.ceil(m / w.generations) + 1)  # prompts the chunk's rows come from
    positions = u * p + m * t
    kv = s.layers * 2 * m * s.kv_dim * (p + t) * s.act_bytes
    layer = positions * _layer_width(s) * s.act_bytes + m * s.heads * t * (p + t) * 4 * 2
    hidden = m * t * s.hidden * s.act_bytes
    head = min(s.chunk, m * t) * s.vocab * 4
    if not backward:  # each layer's activations are freed as the next one runs
        return _base(s) + hidden + max(kv + layer / 2, REFERENCE_VOCAB_ARRAYS * head)
    kept = s.layers * positions * s.hidden * s.act_bytes
    if not s.checkpointed:
        kept = s.layers * positions * _layer_width(s) * s.act_bytes
    head *= HEAD_VOCAB_ARRAYS + 2 * min(math.ceil(m * t / s.chunk), OVERLAPPING_CHUNKS)
    grads = 2 * s.trainable_bytes
    return _base(s) + grads + kv + kept + 3 * hidden + max(LAYER_COPIES * layer, head)


def _decode_candidates(w: Work) -> list[int]:
    """Decode batch sizes from all sequences down: whole groups, then divisors of G."""
    groups = [k * w.generations for k in range(w.prompts, 0, -1)]
    return groups + [d for d in range(w.generations - 1, 0, -1) if w.generations % d == 0]


def _update_candidates(w: Work) -> list[int]:
    """Update chunk budgets from a whole micro-batch down to one sequence, halving rows."""
    per_row = w.prompt_tokens + w.completion_tokens
    rows = w.sequences // w.micro_batches
    out = []
    while rows >= 1:
        out.append(rows * per_row)
        rows = rows // 2 if rows > 1 else 0
    return out


def make_plan(s: Shapes, w: Work, budget: int) -> Plan:
    """The largest decode batch and update chunk whose estimated peaks fit `budget`.

    Raises ValueError, saying what to lower and by how much, when even one
    sequence at a time does not fit.
    """
    decode = next((r for r in _decode_candidates(w) if _est(rollout_bytes(s, w, r)) <= budget), 0)
    tokens = next((n for n in _update_candidates(w) if _est(_scoring(s, w, n)) <= budget), 0)
    if not decode or not tokens:
        raise ValueError(_refusal(s, w, budget))
    return Plan(
        budget,
        w,
        decode,
        tokens,
        rollout=_est(rollout_bytes(s, w, decode)),
        reference=_est(scoring_bytes(s, w, tokens, backward=False)) if w.beta else 0,
        update=_est(scoring_bytes(s, w, tokens, backward=True)),
    )


def _scoring(s: Shapes, w: Work, tokens: int) -> int:
    return max(scoring_bytes(s, w, tokens, backward=True), scoring_bytes(s, w, tokens, False))


def _est(n: float) -> int:
    return int(MARGIN * n) + SMALL_ARRAYS


def smallest_peak(s: Shapes, w: Work) -> int:
    """The estimated peak of the smallest plan: one sequence at a time everywhere."""
    return _est(max(rollout_bytes(s, w, 1), _scoring(s, w, w.prompt_tokens + w.completion_tokens)))


def _refusal(s: Shapes, w: Work, budget: int) -> str:
    need = smallest_peak(s, w)
    fixed = _est(_base(s) + 2 * s.trainable_bytes)
    text = (
        f"no memory plan fits max_memory {budget / GB:.2f} GB: even one sequence at a time "
        f"needs an estimated {need / GB:.2f} GB (the model's weights and optimizer state "
        f"{fixed / GB:.2f} GB). "
    )
    raise_it = f"Raise --max-memory to at least {math.ceil(need / 1e8) / 10:.1f}GB, or "
    if fixed >= budget:
        return text + raise_it + "train a smaller model (or one stored in 16 bits on a GPU)."
    lengths = range(w.completion_tokens - 1, 0, -1)
    fits = next(
        (t for t in lengths if smallest_peak(s, replace(w, completion_tokens=t)) <= budget), None
    )
    shorter = f"lower --max-completion-length to {fits}, or " if fits else ""
    return text + raise_it + shorter + "shorten the prompts."


@contextlib.contextmanager
def limits(plan: Plan) -> Iterator[None]:
    """MLX's memory limit at the budget and its buffer cache at what the plan leaves free,
    for the duration; the previous limits afterwards."""
    memory = mx.set_memory_limit(plan.budget)
    cache = mx.set_cache_limit(max(0, plan.budget - plan.peak))
    try:
        yield
    finally:
        mx.set_memory_limit(memory)
        mx.set_cache_limit(cache)
