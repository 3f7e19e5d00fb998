"""LoRA adapters: y = W x + (alpha / r) * B A x, with the base W frozen.

Parameter names and shapes follow mlx-lm (`lora_a` (in, r), `lora_b` (r, out),
`scale` = alpha / r), so `mlx_lm.load(model, adapter_path=...)` reads what we
save. Unlike mlx-lm's layer, ours can be switched off, which gives the
reference policy pi_ref (the base model) without a second copy of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

# Matmuls of at most this many rows may be split over CPU streams (see split_matmul).
SMALL_MATMUL_ROWS = 8
_split_streams: list | None = None


def split_matmul(x: mx.array, weight: mx.array, streams: list) -> mx.array:
    """x @ weight.T with weight's rows split into one block per stream, run in parallel.

    On a CPU, a float32 matmul of 2-8 rows (decoding a few sequences) runs on
    one core inside OpenBLAS and reads the weights at ~5.5 GB/s; two blocks on
    two MLX CPU streams, each single-threaded, read them at ~9 GB/s (measured
    on 2 cores over Qwen3-0.6B's 196 projection matrices).
    """
    n = weight.shape[0]
    edges = [n * i // len(streams) for i in range(len(streams) + 1)]
    parts = [
        mx.matmul(x, weight[a:b].T, stream=s) for s, a, b in zip(streams, edges[:-1], edges[1:])
    ]
    return mx.concatenate(parts, axis=-1)


@contextmanager
def split_small_matmuls(streams: list | None) -> Iterator[None]:
    """Within the block, LoRA layers split small matmuls over `streams` (None: off)."""
    global _split_streams
    before, _split_streams = _split_streams, streams
    try:
        yield
    finally:
        _split_streams = before


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor of the low-rank update: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or QuantizedLinear."""
    out_dims, in_dims = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        in_dims = in_dims * 32 // layer.bits
    return in_dims, out_dims


class LoRALinear(nn.Module):
    """A Linear or QuantizedLinear with a low-rank update that can be disabled."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        in_dims, out_dims = linear_dims(base)
        self.linear = base
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        self.enabled = True
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    @property
    def in_out(self) -> tuple[int, int]:
        return self.lora_a.shape[0], self.lora_b.shape[1]

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The base layer with W + scale * B^T A^T merged in (re-quantized unless asked not to)."""
        base = self.linear
        weight = base.weight
        quantized = isinstance(base, nn.QuantizedLinear)
        if quantized:
            weight = mx.dequantize(
                weight,
                base.scales,
                base.biases,
                group_size=base.group_size,
                bits=base.bits,
                mode=base.mode,
            )
        out_dims, in_dims = weight.shape
        delta = (self.scale * (self.lora_b.T @ self.lora_a.T)).astype(weight.dtype)
        fused = nn.Linear(in_dims, out_dims, bias="bias" in base)
        fused.weight = weight + delta
        if "bias" in base:
            fused.bias = base.bias
        if quantized and not dequantize:
            return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)
        return fused

    def __call__(self, x: mx.array) -> mx.array:
        if (
            _split_streams
            and x.size <= SMALL_MATMUL_ROWS * x.shape[-1]
            and type(self.linear) is nn.Linear
        ):
            y = split_matmul(x, self.linear.weight, _split_streams)
            if "bias" in self.linear:
                y = y + self.linear.bias
        else:
            y = self.linear(x)
        if not self.enabled:
            return y
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'all' | 'last:N' | '0,1,5' -> sorted layer indices."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(num_layers))
    usage = "use all, last:N or comma-separated indices like 0,1,5"
    if spec.startswith("last:"):
        try:
            n = int(spec[5:])
        except ValueError:
            raise ValueError(f"lora_layers '{spec}': {usage}") from None
        if not 0 < n <= num_layers:
            raise ValueError(
                f"lora_layers '{spec}': the model has {num_layers} layers; use last:N with N "
                f"from 1 to {num_layers}."
            )
        return list(range(num_layers - n, num_layers))
    try:
        layers = sorted({int(i) for i in spec.split(",") if i.strip()})
    except ValueError:
        raise ValueError(f"lora_layers '{spec}': {usage}") from None
    if not layers:
        raise ValueError(f"lora_layers '{spec}' names no layer: {usage}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"lora_layers '{spec}': the model has {num_layers} layers, so indices must be in "
            f"0..{num_layers - 1}; use all, last:N or indices in that range."
        )
    return layers


def apply_lora(
    model: nn.Module,
    rank: int,
    scale: float,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] = LORA_TARGETS,
    layers: list[int] | None = None,
) -> list[str]:
    """Freeze `model` and wrap every target linear of the chosen layers.

    Returns the full paths of the adapted modules, e.g.
    `model.layers.0.self_attn.q_proj`.
    """
    layers = list(range(len(model.layers))) if layers is None else layers
    prefix = _layers_prefix(model)
    paths = [
        f"{prefix}.{i}.{name}"
        for i in layers
        for name, module in model.layers[i].named_modules()
        if name.rsplit(".", 1)[-1] in targets
        and isinstance(module, (nn.Linear, nn.QuantizedLinear))
    ]
    if not paths:
        raise ValueError(
            f"no module named {list(targets)} found in layers {layers}; "
            "check lora_targets against the model's module names"
        )
    modules = dict(model.named_modules())
    smallest = min(min(linear_dims(modules[p])) for p in paths)
    if rank > smallest:
        raise ValueError(
            f"lora_rank {rank} is more than the smallest dimension ({smallest}) of the adapted "
            f"modules, so the update could not use it all; set --lora-rank at most {smallest}."
        )
    wrap_modules(model, paths, rank, scale, dropout)
    return paths


def wrap_modules(
    model: nn.Module, paths: list[str], rank: int, scale: float, dropout: float = 0.0
) -> None:
    """Freeze `model` and put a LoRALinear around each module at `paths` (full names)."""
    model.freeze()
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise ValueError(
            f"the model has no module {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; is the adapter for another architecture?"
        )
    wrapped = []
    for p in paths:
        module = modules[p]
        if isinstance(module, LoRALinear):
            module = module.linear
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            raise ValueError(f"{p} is a {type(module).__name__}, not a linear layer")
        wrapped.append((p, LoRALinear(module, rank, scale, dropout)))
    model.update_modules(tree_unflatten(wrapped))


def _layers_prefix(model: nn.Module) -> str:
    first = id(model.layers[0])
    for name, module in model.named_modules():
        if id(module) == first:
            return name.rsplit(".", 1)[0]
    raise ValueError("cannot locate the transformer layers in the model")


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model (the reference policy) inside this block."""
    modules = lora_modules(model)
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def total_count(model: nn.Module) -> int:
    """Parameters of the model, counting quantized weights at their full size."""
    total = 0
    for _, m in model.named_modules():
        own = {k: v for k, v in m.items() if isinstance(v, mx.array)}
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            own.pop("scales", None)
            own.pop("biases", None)
            total += own.pop("weight").size * 32 // m.bits
        total += sum(v.size for v in own.values())
    return total
